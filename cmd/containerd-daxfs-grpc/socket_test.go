package main

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// TestListenSocket: the daemon's socket is 0660, owned by root and the
// configured group, whatever the umask; a stale socket is replaced.
func TestListenSocket(t *testing.T) {
	testenv.RequireRoot(t)
	old := syscall.Umask(0)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "run", "d.sock")
	for _, tc := range []struct {
		group string
		gid   uint32
	}{{"", 0}, {"4242", 4242}} {
		l, err := listenSocket(path, tc.group)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		st := fi.Sys().(*syscall.Stat_t)
		if fi.Mode().Perm() != 0o660 || fi.Mode()&os.ModeSocket == 0 || st.Uid != 0 || st.Gid != tc.gid {
			t.Errorf("group %q: socket %v uid %d gid %d, want srw-rw---- 0:%d", tc.group, fi.Mode(), st.Uid, st.Gid, tc.gid)
		}
		c, err := net.Dial("unix", path)
		if err != nil {
			t.Fatalf("dialing the socket: %v", err)
		}
		c.Close()
		l.Close()
		if left, _ := filepath.Glob(filepath.Join(dir, "run", ".d.sock.*")); len(left) != 0 {
			t.Errorf("temporary sockets left: %v", left)
		}
	}
	if _, err := listenSocket(path, "no-such-group-here"); err == nil {
		t.Error("an unknown socket_group was accepted")
	}
}

func TestMetricsListenAddress(t *testing.T) {
	for in, want := range map[string]string{
		":9100":          "127.0.0.1:9100",
		"9100":           "127.0.0.1:9100",
		"0.0.0.0:9100":   "0.0.0.0:9100",
		"[::1]:9100":     "[::1]:9100",
		"localhost:9100": "localhost:9100",
	} {
		if got := metricsListenAddress(in); got != want {
			t.Errorf("metricsListenAddress(%q) = %q, want %q", in, got, want)
		}
	}
}
