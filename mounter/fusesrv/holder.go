package fusesrv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// holder keeps a duplicate of every served /dev/fuse descriptor with the
// mount's record, and restarts the server when its connection drops while
// descriptors are held. It never reads from the descriptors: it only keeps
// the kernel connections alive and hands them over.
type holder struct {
	dir    string
	logger *log.Entry

	mu      sync.Mutex
	entries map[string]holderEntry
	server  *net.UnixConn // the connection that said hello
	command []string
	env     []string
	gen     int // bumped on every hello, to cancel stale restarts
	quit    chan struct{}
}

type holderEntry struct {
	rec MountRecord
	fd  int
}

// restartDelay is how long the holder waits after the server's connection
// drops before starting a new one (a server being replaced on purpose
// reconnects within it).
const restartDelay = 100 * time.Millisecond

// RunHolder runs the descriptor holder for stateDir until ctx ends or a
// quit request arrives with nothing held. It returns ErrRunning if another
// holder runs.
func RunHolder(ctx context.Context, stateDir string) error {
	logger := log.G(ctx).WithField("fuse", "holder").WithField("state", stateDir)
	lock, err := lockFile(holderLock(stateDir))
	if err != nil {
		return err
	}
	defer lock.Close()
	os.Remove(holderSock(stateDir))
	l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: holderSock(stateDir), Net: "unixpacket"})
	if err != nil {
		return fmt.Errorf("listen on %s: %w", holderSock(stateDir), err)
	}
	h := &holder{dir: stateDir, logger: logger, entries: map[string]holderEntry{}, quit: make(chan struct{})}
	go func() {
		select {
		case <-ctx.Done():
		case <-h.quit:
		}
		l.Close()
	}()
	logger.WithField("pid", os.Getpid()).Info("holding FUSE descriptors")
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			select {
			case <-h.quit:
				return nil
			default:
			}
			if ctx.Err() != nil {
				// Stopped by a signal: the descriptors die with us and
				// so do the connections that only we kept.
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		go h.serve(c)
	}
}

func (h *holder) serve(c *net.UnixConn) {
	defer c.Close()
	isServer := false
	defer func() {
		if isServer {
			h.serverGone(c)
		}
	}()
	for {
		m, fd, err := recvMsg(c)
		if err != nil {
			if !errors.Is(err, errEOF) {
				h.logger.WithError(err).Warn("reading from a client")
			}
			return
		}
		reply := &holderMsg{Op: "ok"}
		switch m.Op {
		case "hello":
			isServer = true
			h.mu.Lock()
			h.server, h.command, h.env = c, m.Command, m.Env
			h.gen++
			n := len(h.entries)
			h.mu.Unlock()
			reply.Count = n
			h.logger.WithField("held", n).Info("server connected")
		case "store":
			if fd < 0 || m.Record == nil || m.Record.ID == "" {
				reply = &holderMsg{Op: "error", Error: "store needs a record with an id and a descriptor"}
				if fd >= 0 {
					unix.Close(fd)
				}
				break
			}
			h.mu.Lock()
			if old, ok := h.entries[m.Record.ID]; ok {
				unix.Close(old.fd)
			}
			h.entries[m.Record.ID] = holderEntry{rec: *m.Record, fd: fd}
			h.mu.Unlock()
			fd = -1
		case "update":
			h.mu.Lock()
			if m.Record != nil {
				if e, ok := h.entries[m.Record.ID]; ok {
					e.rec = *m.Record
					h.entries[m.Record.ID] = e
				}
			}
			h.mu.Unlock()
		case "drop":
			h.mu.Lock()
			if e, ok := h.entries[m.ID]; ok {
				unix.Close(e.fd)
				delete(h.entries, m.ID)
			}
			h.mu.Unlock()
		case "fetch":
			if err := h.fetch(c); err != nil {
				h.logger.WithError(err).Warn("handing the descriptors to the server")
				return
			}
			continue
		case "ping":
			h.mu.Lock()
			reply.Count = len(h.entries)
			h.mu.Unlock()
		case "quit":
			h.mu.Lock()
			n := len(h.entries)
			h.mu.Unlock()
			if n > 0 {
				reply = &holderMsg{Op: "error", Error: fmt.Sprintf("still holding %d connections", n)}
				break
			}
			sendMsg(c, reply, -1)
			close(h.quit)
			return
		default:
			reply = &holderMsg{Op: "error", Error: fmt.Sprintf("unknown op %q", m.Op)}
		}
		if fd >= 0 {
			unix.Close(fd)
		}
		if err := sendMsg(c, reply, -1); err != nil {
			return
		}
	}
}

// fetch sends every held entry with its descriptor, then "end".
func (h *holder) fetch(c *net.UnixConn) error {
	h.mu.Lock()
	ids := make([]string, 0, len(h.entries))
	for id := range h.entries {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	entries := make([]holderEntry, 0, len(ids))
	for _, id := range ids {
		entries = append(entries, h.entries[id])
	}
	h.mu.Unlock()
	for _, e := range entries {
		rec := e.rec
		if err := sendMsg(c, &holderMsg{Op: "entry", Record: &rec}, e.fd); err != nil {
			return err
		}
	}
	return sendMsg(c, &holderMsg{Op: "end", Count: len(entries)}, -1)
}

// serverGone restarts the server if it went away while connections are
// held and no new server said hello in the meantime.
func (h *holder) serverGone(c *net.UnixConn) {
	h.mu.Lock()
	if h.server != c {
		h.mu.Unlock()
		return
	}
	h.server = nil
	gen := h.gen
	h.mu.Unlock()
	delay := restartDelay
	for attempt := 0; ; attempt++ {
		time.Sleep(delay)
		h.mu.Lock()
		n, cmd, env, stale := len(h.entries), h.command, h.env, h.gen != gen
		h.mu.Unlock()
		if stale || n == 0 || len(cmd) == 0 {
			return
		}
		if attempt > 0 && alive(serveSock(h.dir)) {
			return // someone else started one; it will say hello
		}
		h.logger.WithField("held", n).WithField("command", cmd).Warn("server gone: starting a new one")
		if err := spawn(cmd, env, logPath(h.dir, "serve.log")); err != nil {
			h.logger.WithError(err).Error("starting the server")
		}
		delay = min(delay*2, 5*time.Second)
		// Wait for its hello; try again if it does not come.
		deadline := time.Now().Add(10 * time.Second)
		for time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
			h.mu.Lock()
			stale = h.gen != gen
			h.mu.Unlock()
			if stale {
				return
			}
		}
	}
}
