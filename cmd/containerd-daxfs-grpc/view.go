package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v3"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

func viewCommand() *cli.Command {
	return &cli.Command{
		Name:      "view",
		Usage:     "write the merged view of layers (tars, images or directories, bottom first) followed by them, in one file",
		ArgsUsage: "OUT LAYER...",
		Action:    runView,
	}
}

// runView writes one file holding the merged view of a layer chain
// followed by its layer images, each page aligned: the layout a view has in
// the region, so inspect and mount read the file as the merged tree. Each
// LAYER (bottom first) is a layer tar in any compression, a DAXFS layer
// image, or a directory in overlay-upper form (as mkfs reads it).
func runView(ctx context.Context, cmd *cli.Command) error {
	if cmd.NArg() < 2 {
		return usage("want OUT and at least one LAYER")
	}
	dst, srcs := cmd.Args().First(), cmd.Args().Tail()

	tmpDir, err := os.MkdirTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".layers-*")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmpDir)

	layers := make([]*daxfs.Image, len(srcs))
	for i, src := range srcs {
		b, unmap, err := layerImage(ctx, src, filepath.Join(tmpDir, fmt.Sprintf("layer%d", i)))
		if err != nil {
			return fmt.Errorf("layer %d (%s): %w", i, src, err)
		}
		defer unmap()
		if layers[i], err = daxfs.Open(b); err != nil {
			return fmt.Errorf("layer %d (%s): %w", i, src, err)
		}
	}

	plan, err := converter.PlanView(layers)
	if err != nil {
		return err
	}
	bases := make([]uint64, len(layers))
	end := uint64(plan.Size())
	for i, l := range layers {
		end = (end + daxfs.BlockSize - 1) &^ (daxfs.BlockSize - 1)
		bases[i] = end
		end += uint64(len(l.Bytes()))
	}
	err = writeAtomically(dst, func(out *os.File) error {
		if err := out.Truncate(int64(end)); err != nil {
			return err
		}
		for i, l := range layers {
			if _, err := out.WriteAt(l.Bytes(), int64(bases[i])); err != nil {
				return fmt.Errorf("writing layer %d: %w", i, err)
			}
		}
		return plan.Write(out, bases, end)
	})
	if err != nil {
		return err
	}
	fmt.Printf("%s: view of %d bytes (%d entries) and %d layers, %d bytes in all\n", dst, plan.Size(), plan.Entries(), len(layers), end)
	return nil
}

// layerImage returns the validated layer image of src, mapped read-only:
// src itself when it is a DAXFS image, else its conversion written to tmp.
func layerImage(ctx context.Context, src, tmp string) ([]byte, func(), error) {
	if fi, err := os.Stat(src); err == nil && fi.IsDir() {
		// An overlay upper directory, as mkfs reads one.
		out, err := os.Create(tmp)
		if err != nil {
			return nil, nil, err
		}
		_, err = converter.ConvertDir(ctx, src, out, converter.DirOptions{})
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, nil, err
		}
		return mapValidated(tmp)
	}
	in, err := os.Open(src)
	if err != nil {
		return nil, nil, err
	}
	defer in.Close()
	var head [4]byte
	n, _ := io.ReadFull(in, head[:])
	path := src
	if converter.DetectFormat(head[:n]) != converter.FormatDAXFS {
		if _, err := in.Seek(0, io.SeekStart); err != nil {
			return nil, nil, err
		}
		out, err := os.Create(tmp)
		if err != nil {
			return nil, nil, err
		}
		_, err = converter.ConvertLayer(ctx, in, out, converter.LayerOptions{})
		if cerr := out.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return nil, nil, err
		}
		path = tmp
	}
	return mapValidated(path)
}

// mapValidated maps an image file read-only and validates it.
func mapValidated(path string) ([]byte, func(), error) {
	b, unmap, err := mapReadOnly(path)
	if err != nil {
		return nil, nil, err
	}
	if err := daxfs.Validate(b); err != nil {
		unmap()
		return nil, nil, err
	}
	return b, unmap, nil
}

// mapReadOnly maps a whole file read-only.
func mapReadOnly(path string) ([]byte, func(), error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, nil, err
	}
	if st.Size() == 0 || int64(int(st.Size())) != st.Size() {
		return nil, nil, errors.New(path + ": empty or too large to map")
	}
	b, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("mmap %s: %w", path, err)
	}
	return b, func() { unix.Munmap(b) }, nil
}
