package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"github.com/urfave/cli/v3"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

func mkfsCommand() *cli.Command {
	return &cli.Command{
		Name:      "mkfs",
		Usage:     "make a DAXFS image from a directory or a layer tar (plain, gzip, zstd)",
		ArgsUsage: "SRC OUT",
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "no-extension", Usage: "omit the extension block (mtimes, xattrs, device numbers): only what the kernel module reads"},
			&cli.Int64Flag{Name: "max-size", Usage: "fail if the image would exceed this many bytes (0: no limit)"},
		},
		Action: runMkfs,
	}
}

// runMkfs makes a DAXFS image file from a directory or a layer blob (a tar,
// plain, gzip or zstd, detected from its bytes; an existing DAXFS image is
// validated and copied). Directories are read as an overlay upper would be:
// 0/0 character devices become whiteouts, opaque directories get the OCI
// marker (see converter.ConvertDir). The output appears under its name only
// once complete.
func runMkfs(ctx context.Context, cmd *cli.Command) error {
	if cmd.NArg() != 2 {
		return usage("want SRC and OUT")
	}
	src, dst := cmd.Args().Get(0), cmd.Args().Get(1)
	wopts := daxfs.WriterOptions{NoExtension: cmd.Bool("no-extension")}
	maxSize := cmd.Int64("max-size")

	fi, err := os.Stat(src)
	if err != nil {
		return err
	}
	return writeAtomically(dst, func(out *os.File) error {
		if fi.IsDir() {
			res, err := converter.ConvertDir(ctx, src, out, converter.DirOptions{MaxSize: maxSize, Writer: wopts})
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
		res, err := converter.ConvertLayer(ctx, in, out, converter.LayerOptions{MaxSize: maxSize, Writer: wopts})
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
