package fusesrv

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
)

// DefaultStateDir is where fuse-serve keeps its sockets unless told
// otherwise: under /run, so it survives the daemon but not a reboot (the
// mounts do not survive one either).
const DefaultStateDir = "/run/containerd-daxfs/fuse"

// Main is the fuse-serve sub-command: `fuse-serve [--state DIR] [--holder]`.
func Main(ctx context.Context, args []string) error {
	fl := flag.NewFlagSet("fuse-serve", flag.ContinueOnError)
	state := fl.String("state", DefaultStateDir, "state directory (sockets, locks, logs)")
	holderMode := fl.Bool("holder", false, "run the descriptor holder instead of the server")
	timeout := fl.Duration("cache-timeout", 0, "FUSE entry/attribute cache timeout (default 24h)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if fl.NArg() > 0 {
		return fmt.Errorf("fuse-serve: unexpected arguments %q", fl.Args())
	}
	// Our output is the state directory's serve.log or holder.log.
	if err := log.SetFormat(log.TextFormat); err != nil {
		return err
	}
	if os.Getenv("DAXFUSE_DEBUG") != "" {
		// daxfuse then logs every request, at debug level.
		if err := log.SetLevel("debug"); err != nil {
			return err
		}
	}
	if *holderMode {
		err := RunHolder(ctx, *state)
		if errors.Is(err, ErrRunning) {
			return nil
		}
		return err
	}
	err := Run(ctx, Options{StateDir: *state, Timeout: *timeout})
	if errors.Is(err, ErrRunning) {
		// Another server owns the state directory: nothing to do.
		return nil
	}
	return err
}

// Client talks to the serving process of one state directory, starting
// it when it does not run.
type Client struct {
	stateDir string
	command  []string
}

// NewClient returns a client for stateDir. command is the argv that starts
// the server (e.g. containerd-daxfs-grpc fuse-serve --state DIR); nil means
// never start one.
func NewClient(stateDir string, command []string) *Client {
	return &Client{stateDir: stateDir, command: command}
}

// StateDir returns the state directory.
func (c *Client) StateDir() string { return c.stateDir }

// Ensure makes sure a server runs, starting it if needed, and returns its
// ping answer.
func (c *Client) Ensure(ctx context.Context) (*Response, error) {
	// A server that is starting (or one we just started while a dying one
	// still held the socket) can drop a first connection; a ping is
	// idempotent, so retry those for a while.
	deadline := time.Now().Add(10 * time.Second)
	for {
		resp, err := c.call(ctx, &Request{Op: "ping"})
		if err == nil || !transient(err) || time.Now().After(deadline) {
			return resp, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// transient reports connection errors a retry can cure.
func transient(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF)
}

func (c *Client) dial(ctx context.Context) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", serveSock(c.stateDir))
	if err == nil || len(c.command) == 0 {
		return conn, err
	}
	if err := os.MkdirAll(c.stateDir, 0o700); err != nil {
		return nil, err
	}
	if err := spawn(c.command, nil, logPath(c.stateDir, "serve.log")); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		conn, err = d.DialContext(ctx, "unix", serveSock(c.stateDir))
		if err == nil {
			return conn, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("fuse-serve did not start (see %s): %w", logPath(c.stateDir, "serve.log"), err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (c *Client) call(ctx context.Context, req *Request) (*Response, error) {
	conn, err := c.dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("connect to fuse-serve in %s: %w", c.stateDir, err)
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := writeJSONLine(conn, req); err != nil {
		return nil, fmt.Errorf("fuse-serve %s: %w", req.Op, err)
	}
	var resp Response
	if err := readJSONLine(bufio.NewReader(conn), &resp); err != nil {
		return nil, fmt.Errorf("fuse-serve %s: %w", req.Op, err)
	}
	if resp.Error != "" {
		err := errors.New(resp.Error)
		switch resp.Code {
		case CodeNotFound:
			err = fmt.Errorf("%w: %s", errdefs.ErrNotFound, resp.Error)
		case CodeAlreadyExists:
			err = fmt.Errorf("%w: %s", errdefs.ErrAlreadyExists, resp.Error)
		case CodeInvalid:
			err = fmt.Errorf("%w: %s", errdefs.ErrInvalidArgument, resp.Error)
		case CodeStopping:
			err = fmt.Errorf("%w: %s", errStopping, resp.Error)
		}
		return &resp, err
	}
	return &resp, nil
}

// Mount mounts the image at src on target. A server that is stopping
// (stop-idle) refuses; the call then waits for it to go and asks the
// next one, which it starts.
func (c *Client) Mount(ctx context.Context, src Source, target string, validate bool) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := c.call(ctx, &Request{Op: "mount", Source: src, Target: target, Validate: validate})
		if !errors.Is(err, errStopping) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

var errStopping = errors.New("server stopping")

// Unmount detaches target; the connection is served until its last user
// (an overlay using it as a lower) goes away.
func (c *Client) Unmount(ctx context.Context, target string) error {
	_, err := c.call(ctx, &Request{Op: "unmount", Target: target})
	return err
}

// List returns every connection the server serves.
func (c *Client) List(ctx context.Context) ([]MountRecord, error) {
	resp, err := c.call(ctx, &Request{Op: "list"})
	if err != nil {
		return nil, err
	}
	return resp.Mounts, nil
}

// StopIfIdle stops the server and its holder if the server serves no
// connection, and reports whether it did. It does not start a server: with
// none running it reports false and no error.
func (c *Client) StopIfIdle(ctx context.Context) (bool, error) {
	q := *c
	q.command = nil
	resp, err := q.call(ctx, &Request{Op: "stop-idle"})
	if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return false, nil // no server
	}
	if err != nil {
		return false, err
	}
	return resp.Stopped, nil
}

// Quit detaches every mount and stops the server and the holder. It does
// not start a server that is not running.
func (c *Client) Quit(ctx context.Context) error {
	q := *c
	q.command = nil
	_, err := q.call(ctx, &Request{Op: "quit"})
	return err
}
