package fusesrv

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ErrRunning is returned when another process already holds the lock.
var ErrRunning = errors.New("already running")

// lockFile takes an exclusive flock on path, or fails with ErrRunning.
func lockFile(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, fmt.Errorf("%s: %w", path, ErrRunning)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	return f, nil
}

// lockServer takes the server lock of stateDir. A server that is stopping
// holds it for a moment after closing its socket: wait for that one, but
// fail at once with ErrRunning while a server answers on the socket.
func lockServer(ctx context.Context, stateDir string) (*os.File, error) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		f, err := lockFile(serveLock(stateDir))
		if !errors.Is(err, ErrRunning) || alive(serveSock(stateDir)) || time.Now().After(deadline) {
			return f, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func logPath(dir, name string) string { return filepath.Join(dir, name) }

// spawn starts argv in its own session, detached from the caller's
// terminal and process group, with output appended to logFile. The child
// is reaped by a goroutine if it exits while we live; after our death it
// is re-parented.
func spawn(argv, env []string, logFile string) error {
	if len(argv) == 0 {
		return errors.New("empty command")
	}
	lf, err := os.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	defer lf.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = env
	if cmd.Env == nil {
		cmd.Env = os.Environ()
	}
	cmd.Stdout, cmd.Stderr = lf, lf
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %q: %w", argv, err)
	}
	go cmd.Wait()
	return nil
}

// alive reports whether something accepts connections on the unix socket.
func alive(sock string) bool {
	c, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return false
	}
	c.Close()
	return true
}
