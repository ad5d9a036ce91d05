// Command containerd-daxfs-grpc is the daxfs snapshotter daemon and its
// operator tools. With no sub-command (or "serve") it runs the daemon.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/urfave/cli/v3"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem/regioncmd"
)

const name = "containerd-daxfs-grpc"

// app is the command line: the daemon's flags at the top (it is the
// default command) and one sub-command per operator tool, each in its own
// file. Every command prints its usage and flags with --help.
func app() *cli.Command {
	c := &cli.Command{
		Name:   name,
		Usage:  "the daxfs snapshotter daemon (the default command) and its operator tools",
		Flags:  serveFlags(true),
		Action: runServe,
		Commands: []*cli.Command{
			serveCommand(),
			regioncmd.Command(),
			mkfsCommand(),
			inspectCommand(),
			viewCommand(),
			mountCommand(),
			umountCommand(),
			convertCommand(),
			fuseServeCommand(),
		},
	}
	nameErrors(c)
	return c
}

// errUsage marks a usage error: main prints it with a pointer to the
// command's --help and exits 2.
var errUsage = errors.New("usage")

// cmdError is an error of a command, named by its full name.
type cmdError struct {
	cmd string
	err error
}

func (e *cmdError) Error() string { return e.cmd + ": " + e.err.Error() }
func (e *cmdError) Unwrap() error { return e.err }

// nameErrors makes every error of c and its sub-commands a cmdError, and
// flag errors usage errors.
func nameErrors(c *cli.Command) {
	if action := c.Action; action != nil {
		c.Action = func(ctx context.Context, cmd *cli.Command) error {
			if err := action(ctx, cmd); err != nil {
				return &cmdError{cmd.FullName(), err}
			}
			return nil
		}
	}
	c.OnUsageError = func(_ context.Context, cmd *cli.Command, err error, _ bool) error {
		return &cmdError{cmd.FullName(), fmt.Errorf("%w: %v", errUsage, err)}
	}
	for _, sub := range c.Commands {
		nameErrors(sub)
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := execute(ctx, os.Args, os.Stderr)
	stop()
	os.Exit(code)
}

// execute runs the command line args and returns the exit status: 0, 1 for a
// failure, 2 for a usage error.
func execute(ctx context.Context, args []string, stderr io.Writer) int {
	err := app().Run(ctx, args)
	if err == nil {
		return 0
	}
	fmt.Fprintln(stderr, err)
	if errors.Is(err, errUsage) || errors.Is(err, regioncmd.ErrUsage) {
		cmd := name
		if ce, ok := errors.AsType[*cmdError](err); ok {
			cmd = ce.cmd
		}
		fmt.Fprintf(stderr, "Run '%s --help' for its usage.\n", cmd)
		return 2
	}
	return 1
}

// usage returns a usage error.
func usage(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{errUsage}, args...)...)
}
