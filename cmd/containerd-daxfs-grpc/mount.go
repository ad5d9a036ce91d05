package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strconv"

	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
)

// runMount: mount [--offset N --length N] [--mode M] [--phys ADDR] IMAGE DIR.
// IMAGE is an image file, or with --offset/--length a window of a larger
// file such as the shared region.
func runMount(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("mount", flag.ContinueOnError)
	offset := fl.Int64("offset", 0, "byte offset of the image in IMAGE (a region extent)")
	length := fl.Int64("length", 0, "length of the image window (0: to the end of IMAGE)")
	mode := fl.String("mode", mounter.ModeAuto, "auto, kernel, erofs or fuse")
	phys := fl.String("phys", "", "physical address of the image (kernel mounter)")
	state := fl.String("fuse-state", fusesrv.DefaultStateDir, "state directory of the FUSE serving process")
	validate := fl.Bool("validate", false, "validate the whole image before mounting")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fl.NArg() != 2 {
		return fmt.Errorf("%w: want IMAGE DIR", errUsage)
	}
	src := mounter.Source{Path: fl.Arg(0), Offset: *offset, Length: *length}
	if *phys != "" {
		p, err := strconv.ParseUint(*phys, 0, 64)
		if err != nil {
			return fmt.Errorf("%w: --phys %q: %v", errUsage, *phys, err)
		}
		src.PhysAddr, src.HasPhys = p, true
		if src.Length == 0 {
			st, err := os.Stat(src.Path)
			if err != nil {
				return err
			}
			src.Length = st.Size() - src.Offset
		}
	}
	m, err := mounter.New(ctx, *mode, mounter.FUSEOptions{StateDir: *state, Validate: *validate})
	if err != nil {
		return err
	}
	return m.Mount(ctx, src, fl.Arg(1))
}

// runUmount: umount [--fuse-state DIR] DIR.
func runUmount(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("umount", flag.ContinueOnError)
	state := fl.String("fuse-state", fusesrv.DefaultStateDir, "state directory of the FUSE serving process")
	if err := fl.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fl.NArg() != 1 {
		return fmt.Errorf("%w: want DIR", errUsage)
	}
	return mounter.Detach(ctx, fl.Arg(0), mounter.FUSEOptions{StateDir: *state})
}

// runFuseServe runs the FUSE serving process (or, with --holder, its
// descriptor holder). The daemon starts it; it outlives the daemon.
func runFuseServe(ctx context.Context, args []string) error {
	return fusesrv.Main(ctx, args)
}
