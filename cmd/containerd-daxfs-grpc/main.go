// Command containerd-daxfs-grpc is the daxfs snapshotter daemon and its
// operator tools. With no sub-command (or "serve") it runs the daemon.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// command is one sub-command. run gets the arguments after its name.
type command struct {
	summary string
	run     func(ctx context.Context, args []string) error
}

// commands lists every sub-command; each lives in its own file.
func commands() map[string]command {
	return map[string]command{
		"serve":   {"run the snapshotter daemon (the default)", runServe},
		"mkfs":    {"mkfs SRC OUT: make a DAXFS image from a directory or a layer tar", runMkfs},
		"convert": {"convert [--address A] [--namespace N] [--uncompressed] [--platform P | --all-platforms] SRC DST: make a pre-converted image in containerd", runConvert},
		"inspect": {"inspect [--json] IMAGE: validate an image and list its tree", runInspect},
		"view":    {"view OUT LAYER...: write a merged view followed by its layers", runView},
		"region":  {"region init|status|ls|gc|verify: operate the shared memory region", runRegion},
		"mount":   {"mount IMAGE DIR: mount an image file or region entry read-only", runMount},
		"umount":  {"umount DIR: unmount what mount mounted", runUmount},
		// fuse-serve is the long-lived FUSE serving process the daemon
		// starts; operators do not run it by hand.
		"fuse-serve": {"fuse-serve: serve FUSE mounts (started by the daemon)", runFuseServe},
	}
}

// errUsage marks a usage error: main prints the usage and exits 2.
var errUsage = errors.New("usage")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	cmds := commands()
	name, args := "serve", os.Args[1:]
	if len(args) > 0 && len(args[0]) > 0 && args[0][0] != '-' {
		name, args = args[0], args[1:]
	}
	if name == "help" {
		usage(os.Stdout, cmds)
		return
	}
	cmd, ok := cmds[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "containerd-daxfs-grpc: unknown command %q\n", name)
		usage(os.Stderr, cmds)
		os.Exit(2)
	}
	if err := cmd.run(ctx, args); err != nil {
		if errors.Is(err, errUsage) {
			fmt.Fprintf(os.Stderr, "containerd-daxfs-grpc %s: %v\nusage: %s\n", name, err, cmd.summary)
			os.Exit(2)
		}
		fmt.Fprintf(os.Stderr, "containerd-daxfs-grpc %s: %v\n", name, err)
		os.Exit(1)
	}
}

func usage(w *os.File, cmds map[string]command) {
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Fprintln(w, "usage: containerd-daxfs-grpc [COMMAND] [ARGS]")
	for _, n := range names {
		fmt.Fprintf(w, "  %-8s %s\n", n, cmds[n].summary)
	}
}
