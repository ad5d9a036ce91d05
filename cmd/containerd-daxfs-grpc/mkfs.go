package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// runMkfs makes a DAXFS image file from a directory or a layer blob (a tar,
// plain, gzip or zstd, detected from its bytes; an existing DAXFS image is
// validated and copied). Directories are read as an overlay upper would be:
// 0/0 character devices become whiteouts, opaque directories get the OCI
// marker (see converter.ConvertDir). The output appears under its name only
// once complete.
func runMkfs(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("mkfs", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	noExt := fs.Bool("no-extension", false, "omit the extension block (mtimes, xattrs, device numbers): only what the kernel module reads")
	maxSize := fs.Int64("max-size", 0, "fail if the image would exceed this many bytes (0: no limit)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("%w: want SRC and OUT", errUsage)
	}
	src, dst := fs.Arg(0), fs.Arg(1)
	wopts := daxfs.WriterOptions{NoExtension: *noExt}

	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	return writeAtomically(dst, func(out *os.File) error {
		if fi.IsDir() {
			res, err := converter.ConvertDir(ctx, src, out, converter.DirOptions{MaxSize: *maxSize, Writer: wopts})
			if err != nil {
				return err
			}
			fmt.Printf("%s: %d bytes, %d entries from directory %s\n", dst, res.Size, res.Entries, src)
			return nil
		}
		in, err := os.Open(src)
		if err != nil {
			return err
		}
		defer in.Close()
		res, err := converter.ConvertLayer(ctx, in, out, converter.LayerOptions{MaxSize: *maxSize, Writer: wopts})
		if err != nil {
			return fmt.Errorf("%s: %w", src, err)
		}
		fmt.Printf("%s: %d bytes, %d entries from %s %s (diffID %s)\n", dst, res.Size, res.Entries, res.Format, src, res.DiffID)
		return nil
	})
}

// writeAtomically runs write on a temporary file next to dst and renames it
// to dst when write succeeds; otherwise the temporary file is removed.
func writeAtomically(dst string, write func(*os.File) error) (err error) {
	f, err := os.CreateTemp(filepath.Dir(dst), "."+filepath.Base(dst)+".tmp-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := write(f); err != nil {
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), dst)
}
