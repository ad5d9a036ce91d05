package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/containerd/log"
	"github.com/urfave/cli/v3"

	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
)

// defaultMountState is where mount and umount keep their state: the FUSE
// serving process's sockets, locks and logs, and under erofs/ the erofs
// mounter's metadata images (as the daemon keeps them under its root).
const defaultMountState = fusesrv.DefaultStateDir

func stateFlag() cli.Flag {
	return &cli.StringFlag{
		Name:  "state",
		Value: defaultMountState,
		Usage: "state directory of image mounts: the FUSE serving process's sockets and logs, the erofs mounter's metadata images (under erofs/)",
	}
}

// mountOptions are the mounters' options for the state directory state.
func mountOptions(state string, validate bool) mounter.FUSEOptions {
	return mounter.FUSEOptions{StateDir: state, EROFSDir: filepath.Join(state, "erofs"), Validate: validate}
}

func mountCommand() *cli.Command {
	return &cli.Command{
		Name:      "mount",
		Usage:     "mount an image file (or a window of a file, such as a region extent) read-only",
		ArgsUsage: "IMAGE DIR",
		Flags: []cli.Flag{
			&cli.Int64Flag{Name: "offset", Usage: "byte offset of the image in IMAGE (a region extent)"},
			&cli.Int64Flag{Name: "length", Usage: "length of the image window (0: to the end of IMAGE)"},
			&cli.StringFlag{Name: "mode", Value: mounter.ModeAuto, Usage: "auto, kernel, erofs or fuse"},
			&cli.StringFlag{Name: "phys", Usage: "physical address of the image (kernel mounter)"},
			stateFlag(),
			&cli.BoolFlag{Name: "validate", Usage: "validate the whole image before mounting"},
		},
		Action: runMount,
	}
}

// runMount: IMAGE is an image file, or with --offset/--length a window of
// a larger file such as the shared region.
func runMount(ctx context.Context, cmd *cli.Command) error {
	if cmd.NArg() != 2 {
		return usage("want IMAGE DIR")
	}
	src := mounter.Source{Path: cmd.Args().Get(0), Offset: cmd.Int64("offset"), Length: cmd.Int64("length")}
	if phys := cmd.String("phys"); phys != "" {
		p, err := strconv.ParseUint(phys, 0, 64)
		if err != nil {
			return usage("--phys %q: %v", phys, err)
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
	m, err := mounter.New(ctx, cmd.String("mode"), mountOptions(cmd.String("state"), cmd.Bool("validate")))
	if err != nil {
		return err
	}
	return m.Mount(ctx, src, cmd.Args().Get(1))
}

func umountCommand() *cli.Command {
	return &cli.Command{
		Name:      "umount",
		Usage:     "unmount what mount mounted; the last FUSE umount stops the serving process",
		ArgsUsage: "DIR",
		Flags:     []cli.Flag{stateFlag()},
		Action:    runUmount,
	}
}

func runUmount(ctx context.Context, cmd *cli.Command) error {
	if cmd.NArg() != 1 {
		return usage("want DIR")
	}
	state := cmd.String("state")
	if err := mounter.Detach(ctx, cmd.Args().First(), mountOptions(state, false)); err != nil {
		return err
	}
	return stopIdleServer(ctx, state)
}

// idleWait is how long umount waits for the connection of a FUSE mount
// it detached to end before it leaves the serving process running.
const idleWait = 2 * time.Second

// stopIdleServer stops the FUSE serving process of state once it serves
// nothing: started by mount, it must not outlive the last umount. A
// connection still in use (an overlay over the mount, an open file) or
// another mount keeps it serving; it stops at a later umount.
func stopIdleServer(ctx context.Context, state string) error {
	c := fusesrv.NewClient(state, nil)
	deadline := time.Now().Add(idleWait)
	for {
		stopped, err := c.StopIfIdle(ctx)
		if err != nil || stopped {
			return err
		}
		recs, err := c.List(ctx)
		if err != nil {
			return nil // no server
		}
		mounted := 0
		for _, r := range recs {
			if r.State == fusesrv.StateMounted {
				mounted++
			}
		}
		if mounted > 0 || time.Now().After(deadline) {
			if mounted == 0 {
				log.G(ctx).WithField("connections", len(recs)).Info("FUSE serving process kept: detached mounts still in use; a later umount stops it")
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func fuseServeCommand() *cli.Command {
	return &cli.Command{
		Name:            "fuse-serve",
		Usage:           "serve FUSE mounts (started by the daemon and mount; not for operators): fuse-serve [--state DIR] [--holder]",
		Hidden:          true,
		SkipFlagParsing: true, // fusesrv.Main parses them: its command line is a protocol
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if err := fusesrv.Main(ctx, cmd.Args().Slice()); err != nil {
				return fmt.Errorf("fuse-serve: %w", err)
			}
			return nil
		},
	}
}
