package fusesrv

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/daxfuse"
)

// Options configure the serving process.
type Options struct {
	StateDir string
	// Command is the argv the holder runs to start a replacement server.
	// Default: this executable with this process's arguments.
	Command []string
	// HolderCommand starts the holder. Default: Command plus --holder.
	HolderCommand []string
	// Timeout is the FUSE entry/attribute/negative cache timeout.
	Timeout time.Duration
}

type served struct {
	rec    MountRecord
	devFD  int // our copy of the /dev/fuse descriptor, handed to the holder
	win    *daxfuse.Window
	conn   *daxfuse.Conn
	broken bool
}

// Server owns the FUSE connections.
type Server struct {
	opts   Options
	logger *log.Entry

	mu       sync.Mutex
	mounts   map[string]*served // by ID
	pending  map[string]bool    // targets being mounted
	hc       *holderClient      // nil while no holder is reachable
	stopping bool               // stop-idle succeeded: no more mounts

	quitting chan struct{}
	wg       sync.WaitGroup
}

// Run runs the serving process until ctx ends (mounts stay up and are
// adopted by the next server) or a quit request (mounts are detached).
func Run(ctx context.Context, opts Options) error {
	if opts.StateDir == "" {
		return errors.New("fuse-serve: no state directory")
	}
	if len(opts.Command) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return err
		}
		opts.Command = append([]string{exe}, os.Args[1:]...)
	}
	if len(opts.HolderCommand) == 0 {
		opts.HolderCommand = append(append([]string(nil), opts.Command...), "--holder")
	}
	if err := os.MkdirAll(opts.StateDir, 0o700); err != nil {
		return err
	}
	lock, err := lockServer(ctx, opts.StateDir)
	if err != nil {
		return err
	}
	defer lock.Close()

	s := &Server{
		opts: opts, logger: log.G(ctx).WithField("fuse", "serve").WithField("state", opts.StateDir),
		mounts: map[string]*served{}, pending: map[string]bool{},
		quitting: make(chan struct{}),
	}
	if err := s.connectHolder(ctx); err != nil {
		s.logger.WithError(err).Warn("no descriptor holder: mounts will not survive this process")
	} else if err := s.adoptAll(); err != nil {
		s.logger.WithError(err).Error("adopting the held connections")
	}
	if s.hc != nil {
		if _, err := s.hc.call(&holderMsg{Op: "hello", Command: opts.Command, Env: os.Environ()}, -1); err != nil {
			s.logger.WithError(err).Warn("saying hello to the holder")
		}
	}

	os.Remove(serveSock(opts.StateDir))
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: serveSock(opts.StateDir), Net: "unix"})
	if err != nil {
		return fmt.Errorf("listen on %s: %w", serveSock(opts.StateDir), err)
	}
	defer l.Close()
	os.Chmod(serveSock(opts.StateDir), 0o600)
	s.logger.WithField("pid", os.Getpid()).WithField("adopted", len(s.mounts)).Info("serving FUSE mounts")

	go s.watchHolder(ctx)
	go func() {
		select {
		case <-ctx.Done():
		case <-s.quitting:
		}
		l.Close()
	}()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			break
		}
		s.wg.Add(1)
		go s.serveControl(ctx, c)
	}
	select {
	case <-s.quitting:
		s.wg.Wait()
		return nil
	default:
	}
	// Stopped by a signal: leave every mount to the holder, whose next
	// server adopts it.
	return nil
}

func (s *Server) serveControl(ctx context.Context, c *net.UnixConn) {
	defer s.wg.Done()
	defer c.Close()
	r := bufio.NewReader(c)
	for {
		var req Request
		if err := readJSONLine(r, &req); err != nil {
			return
		}
		resp := s.handle(ctx, &req)
		if err := writeJSONLine(c, resp); err != nil {
			return
		}
		if resp.Error == "" && (req.Op == "quit" || req.Op == "stop-idle" && resp.Stopped) {
			close(s.quitting)
			return
		}
	}
}

func errResp(code string, err error) *Response {
	return &Response{Error: err.Error(), Code: code}
}

func (s *Server) handle(ctx context.Context, req *Request) *Response {
	switch req.Op {
	case "ping":
		s.mu.Lock()
		defer s.mu.Unlock()
		return &Response{PID: os.Getpid(), Holder: s.hc != nil}
	case "list":
		return &Response{PID: os.Getpid(), Mounts: s.list()}
	case "mount":
		if err := s.mount(ctx, req.Source, req.Target, req.Validate); err != nil {
			if ce, ok := errors.AsType[*codeError](err); ok {
				return errResp(ce.code, err)
			}
			return errResp("", err)
		}
		return &Response{}
	case "unmount":
		if err := s.unmount(req.Target); err != nil {
			if ce, ok := errors.AsType[*codeError](err); ok {
				return errResp(ce.code, err)
			}
			return errResp("", err)
		}
		return &Response{}
	case "quit":
		if err := s.quit(); err != nil {
			return errResp("", err)
		}
		return &Response{}
	case "stop-idle":
		stopped, err := s.stopIfIdle()
		if err != nil {
			return errResp("", err)
		}
		return &Response{Stopped: stopped}
	}
	return errResp(CodeInvalid, fmt.Errorf("unknown request %q", req.Op))
}

type codeError struct {
	code string
	err  error
}

func (e *codeError) Error() string { return e.err.Error() }
func (e *codeError) Unwrap() error { return e.err }

func newID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// openImage maps src and opens the image in it.
func openImage(src Source, validate bool) (*daxfuse.Window, *daxfs.Image, error) {
	win, err := daxfuse.MapWindow(src.Path, src.Offset, src.Length)
	if err != nil {
		return nil, nil, err
	}
	img, err := daxfs.Open(win.Bytes)
	if err == nil && validate {
		err = img.Validate()
	}
	if err == nil && img.TotalSize() > uint64(len(win.Bytes)) {
		err = fmt.Errorf("image needs a %d byte window, source gives %d", img.TotalSize(), len(win.Bytes))
	}
	if err != nil {
		win.Close()
		return nil, nil, fmt.Errorf("image at %s: %w", src, err)
	}
	return win, img, nil
}

func (s *Server) mount(ctx context.Context, src Source, target string, validate bool) (err error) {
	if !filepath.IsAbs(target) || filepath.Clean(target) != target {
		return &codeError{CodeInvalid, fmt.Errorf("mount target %q: not a clean absolute path", target)}
	}
	if src.Path == "" {
		return &codeError{CodeInvalid, errors.New("mount: no image source")}
	}
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return &codeError{CodeStopping, errors.New("mount: the server is stopping")}
	}
	if s.pending[target] || s.byTarget(target) != nil {
		s.mu.Unlock()
		return &codeError{CodeAlreadyExists, fmt.Errorf("%s: already mounted", target)}
	}
	s.pending[target] = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.pending, target)
		s.mu.Unlock()
	}()

	win, img, err := openImage(src, validate)
	if err != nil {
		return &codeError{CodeInvalid, err}
	}
	devFD, err := daxfuse.Mount(target, src.Path)
	if err != nil {
		win.Close()
		return err
	}
	fail := func(err error) error {
		unix.Unmount(target, unix.MNT_DETACH)
		unix.Close(devFD)
		win.Close()
		return err
	}
	ictx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	init, err := daxfuse.ReadInit(ictx, devFD)
	if err != nil {
		return fail(fmt.Errorf("mount %s: %w", target, err))
	}
	fs := daxfuse.NewFS(img, s.opts.Timeout)
	conn, err := daxfuse.NewConn(devFD, fs, init, s.logger.WithField("target", target))
	if err != nil {
		return fail(fmt.Errorf("mount %s: %w", target, err))
	}
	m := &served{
		rec: MountRecord{
			ID: newID(), Target: target, Source: src, State: StateMounted,
			Validate: validate, Init: init, Since: time.Now().UTC(),
		},
		devFD: devFD, win: win, conn: conn,
	}
	conn.Serve()
	if err := daxfuse.DisablePoll(target); err != nil {
		s.logger.WithError(err).Warn("tuning the mount")
	}
	if err := daxfuse.Tune(target); err != nil {
		s.logger.WithError(err).Warn("tuning the mount")
	}
	s.mu.Lock()
	s.mounts[m.rec.ID] = m
	s.mu.Unlock()
	s.store(m)
	go s.watch(m)
	s.logger.WithField("source", src.String()).WithField("target", target).WithField("id", m.rec.ID).Info("mounted")
	return nil
}

// watch cleans up after a connection ends: the mount was unmounted and
// its last user (an overlay, an open file) let go.
func (s *Server) watch(m *served) {
	<-m.conn.Done()
	if err := m.conn.Err(); err != nil {
		s.logger.WithError(err).WithField("id", m.rec.ID).WithField("target", m.rec.Target).Warn("connection ended")
	}
	s.mu.Lock()
	hc := s.hc
	s.mu.Unlock()
	if hc != nil {
		if _, err := hc.call(&holderMsg{Op: "drop", ID: m.rec.ID}, -1); err != nil {
			s.logger.WithError(err).WithField("id", m.rec.ID).Warn("dropping a connection from the holder")
		}
	}
	s.mu.Lock()
	delete(s.mounts, m.rec.ID)
	s.mu.Unlock()
	unix.Close(m.devFD)
	if m.win != nil {
		m.win.Close()
	}
	s.logger.WithField("id", m.rec.ID).WithField("source", m.rec.Source.String()).Info("released")
}

// byTarget finds the mounted (not detached) entry on target. s.mu held.
func (s *Server) byTarget(target string) *served {
	for _, m := range s.mounts {
		if m.rec.State == StateMounted && m.rec.Target == target {
			return m
		}
	}
	return nil
}

// unmount detaches target lazily: it disappears from the namespace at
// once, and the connection is served until its last user goes away.
func (s *Server) unmount(target string) error {
	target = filepath.Clean(target)
	s.mu.Lock()
	m := s.byTarget(target)
	s.mu.Unlock()
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		if m == nil && (err == unix.EINVAL || err == unix.ENOENT) {
			return &codeError{CodeNotFound, fmt.Errorf("%s: not mounted", target)}
		}
		if m == nil || err != unix.EINVAL {
			return fmt.Errorf("unmount %s: %w", target, err)
		}
		// EINVAL with a record: already gone from the namespace.
	}
	if m != nil {
		s.mu.Lock()
		m.rec.State = StateDetached
		rec := m.rec
		hc := s.hc
		s.mu.Unlock()
		if hc != nil {
			hc.call(&holderMsg{Op: "update", Record: &rec}, -1)
		}
	}
	return nil
}

func (s *Server) list() []MountRecord {
	s.mu.Lock()
	out := make([]MountRecord, 0, len(s.mounts))
	for _, m := range s.mounts {
		r := m.rec
		r.Init = nil
		out = append(out, r)
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Target < out[j].Target })
	return out
}

// quit detaches every mount, waits a while for the connections to end,
// and stops the holder when nothing is left to hold.
func (s *Server) quit() error {
	s.mu.Lock()
	var targets []string
	for _, m := range s.mounts {
		if m.rec.State == StateMounted {
			targets = append(targets, m.rec.Target)
		}
	}
	s.mu.Unlock()
	for _, t := range targets {
		if err := s.unmount(t); err != nil {
			s.logger.WithError(err).Warn("quit: detaching a mount")
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		s.mu.Lock()
		n := len(s.mounts)
		s.mu.Unlock()
		if n == 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	s.mu.Lock()
	n, hc := len(s.mounts), s.hc
	if n == 0 {
		s.stopping = true // no more mounts, and no new holder
	}
	s.mu.Unlock()
	if n > 0 {
		return fmt.Errorf("quit: %d connections still in use (detached mounts under an overlay?)", n)
	}
	if hc != nil {
		if _, err := hc.call(&holderMsg{Op: "quit"}, -1); err != nil {
			return fmt.Errorf("quit holder: %w", err)
		}
		hc.close()
		s.mu.Lock()
		s.hc = nil
		s.mu.Unlock()
	}
	return nil
}

// stopIfIdle stops the server, and its holder, when it serves no
// connection and mounts nothing: a server started for a mount command
// should not outlive that mount's last user. Once it said yes, mounts are
// refused (CodeStopping: the client starts a new server).
func (s *Server) stopIfIdle() (bool, error) {
	s.mu.Lock()
	if len(s.mounts) > 0 || len(s.pending) > 0 {
		s.mu.Unlock()
		return false, nil
	}
	s.stopping = true
	hc := s.hc
	s.hc = nil
	s.mu.Unlock()
	if hc != nil {
		// The holder holds nothing either: every connection it held
		// was one of ours, dropped when it ended.
		if _, err := hc.call(&holderMsg{Op: "quit"}, -1); err != nil {
			s.logger.WithError(err).Warn("stopping the holder")
		}
		hc.close()
	}
	s.logger.Info("stopping: no connection left to serve")
	return true, nil
}

// store hands a duplicate of m's descriptor and its record to the holder.
func (s *Server) store(m *served) {
	s.mu.Lock()
	hc := s.hc
	rec := m.rec
	s.mu.Unlock()
	if hc == nil {
		return
	}
	if _, err := hc.call(&holderMsg{Op: "store", Record: &rec}, m.devFD); err != nil {
		s.logger.WithError(err).WithField("id", rec.ID).Warn("storing a connection in the holder")
	}
}

// adoptAll takes over every connection the holder keeps.
func (s *Server) adoptAll() error {
	entries, err := s.hc.fetch()
	if err != nil {
		return err
	}
	for _, e := range entries {
		s.adopt(e.rec, e.fd)
	}
	return nil
}

func (s *Server) adopt(rec MountRecord, devFD int) {
	var fs daxfuse.FileSystem
	win, img, err := openImage(rec.Source, false)
	broken := false
	if err != nil {
		s.logger.WithError(err).WithField("id", rec.ID).WithField("target", rec.Target).Error("adopting a connection whose image cannot be opened: answering EIO")
		fs, broken = daxfuse.NewBrokenFS(), true
	} else {
		fs = daxfuse.NewFS(img, s.opts.Timeout)
	}
	conn, resent, err := daxfuse.Adopt(devFD, fs, rec.Init, s.logger.WithField("target", rec.Target))
	if err != nil {
		s.logger.WithError(err).WithField("id", rec.ID).WithField("target", rec.Target).Error("adopting a connection")
		unix.Close(devFD)
		if win != nil {
			win.Close()
		}
		return
	}
	rec.Adoptions++
	m := &served{rec: rec, devFD: devFD, win: win, conn: conn, broken: broken}
	conn.Serve()
	s.mu.Lock()
	s.mounts[rec.ID] = m
	hc := s.hc
	s.mu.Unlock()
	if hc != nil {
		hc.call(&holderMsg{Op: "update", Record: &rec}, -1)
	}
	go s.watch(m)
	s.logger.WithField("source", rec.Source.String()).WithField("target", rec.Target).WithField("id", rec.ID).WithField("resend", resent).Info("adopted")
}

// connectHolder connects to the holder, starting one if none runs.
func (s *Server) connectHolder(ctx context.Context) error {
	s.mu.Lock()
	stopping := s.stopping
	s.mu.Unlock()
	if stopping {
		return errors.New("the server is stopping")
	}
	hc, err := dialHolder(s.opts.StateDir)
	if err != nil {
		if err := spawn(s.opts.HolderCommand, nil, logPath(s.opts.StateDir, "holder.log")); err != nil {
			return err
		}
		deadline := time.Now().Add(10 * time.Second)
		for {
			hc, err = dialHolder(s.opts.StateDir)
			if err == nil {
				break
			}
			if time.Now().After(deadline) || ctx.Err() != nil {
				return fmt.Errorf("holder did not start: %w", err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	s.mu.Lock()
	stopping = s.stopping
	if !stopping {
		s.hc = hc
	}
	s.mu.Unlock()
	if stopping {
		// Stopped meanwhile: the holder we reached has nothing to hold.
		_, _ = hc.call(&holderMsg{Op: "quit"}, -1)
		hc.close()
		return errors.New("the server is stopping")
	}
	return nil
}

// watchHolder pings the holder; if it died, it starts a new one and gives
// it every connection again.
func (s *Server) watchHolder(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.quitting:
			return
		case <-t.C:
		}
		s.mu.Lock()
		hc, stopping := s.hc, s.stopping
		s.mu.Unlock()
		if stopping {
			return // the holder was told to quit: do not start another
		}
		if hc != nil {
			if _, err := hc.call(&holderMsg{Op: "ping"}, -1); err == nil {
				continue
			}
			hc.close()
			s.mu.Lock()
			s.hc = nil
			s.mu.Unlock()
			s.logger.Warn("holder gone: starting a new one")
		}
		if err := s.connectHolder(ctx); err != nil {
			s.logger.WithError(err).Error("starting the holder")
			continue
		}
		s.mu.Lock()
		ms := make([]*served, 0, len(s.mounts))
		for _, m := range s.mounts {
			ms = append(ms, m)
		}
		hc = s.hc
		s.mu.Unlock()
		for _, m := range ms {
			s.store(m)
		}
		hc.call(&holderMsg{Op: "hello", Command: s.opts.Command, Env: os.Environ()}, -1)
	}
}

// holderClient is the server's connection to the holder; calls are
// serialised.
type holderClient struct {
	mu sync.Mutex
	c  *net.UnixConn
}

type fetched struct {
	rec MountRecord
	fd  int
}

func dialHolder(dir string) (*holderClient, error) {
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: holderSock(dir), Net: "unixpacket"})
	if err != nil {
		return nil, err
	}
	return &holderClient{c: c}, nil
}

func (h *holderClient) call(m *holderMsg, fd int) (*holderMsg, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.c.SetDeadline(time.Now().Add(5 * time.Second))
	defer h.c.SetDeadline(time.Time{})
	if err := sendMsg(h.c, m, fd); err != nil {
		return nil, err
	}
	r, rfd, err := recvMsg(h.c)
	if err != nil {
		return nil, err
	}
	if rfd >= 0 {
		unix.Close(rfd)
	}
	if r.Op == "error" {
		return r, errors.New(r.Error)
	}
	return r, nil
}

func (h *holderClient) fetch() ([]fetched, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.c.SetDeadline(time.Now().Add(10 * time.Second))
	defer h.c.SetDeadline(time.Time{})
	if err := sendMsg(h.c, &holderMsg{Op: "fetch"}, -1); err != nil {
		return nil, err
	}
	var out []fetched
	for {
		r, fd, err := recvMsg(h.c)
		if err != nil {
			for _, e := range out {
				unix.Close(e.fd)
			}
			return nil, err
		}
		switch r.Op {
		case "end":
			return out, nil
		case "entry":
			if r.Record == nil || fd < 0 {
				if fd >= 0 {
					unix.Close(fd)
				}
				continue
			}
			out = append(out, fetched{rec: *r.Record, fd: fd})
		default:
			if fd >= 0 {
				unix.Close(fd)
			}
		}
	}
}

func (h *holderClient) close() {
	h.c.Close()
}
