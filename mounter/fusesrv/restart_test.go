package fusesrv

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// readDirect reads p with O_DIRECT, so every read is a FUSE request and
// not a page cache hit.
func readDirect(p string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var out []byte
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, err
		}
		if n == 0 {
			return out, nil
		}
		out = append(out, buf[:n]...)
	}
}

// killServer kills the serving process with SIGKILL and waits until the
// holder has started a replacement that answers; it returns the new pid.
func killServer(t *testing.T, c *Client) int {
	t.Helper()
	probe := NewClient(c.StateDir(), nil) // never starts a server itself
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := probe.Ensure(ctx)
	if err != nil {
		t.Fatal(err)
	}
	old := r.PID
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	for {
		r, err := probe.Ensure(ctx)
		if err == nil && r.PID != old {
			return r.PID
		}
		if ctx.Err() != nil {
			t.Fatalf("no replacement server after killing pid %d", old)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServerKilled is restart test (b): readers reading in a loop, on the
// FUSE mount and through an overlay over it, see not a single error while
// the serving process is killed with SIGKILL and replaced, three times.
func TestServerKilled(t *testing.T) {
	c := startServer(t)
	src, img := testImage(t)
	dir := t.TempDir()
	mnt := mkdir(t, filepath.Join(dir, "lower"))
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	merged, _ := mountOverlay(t, mnt, dir)

	files := []string{"sizes/f4097", "sizes/f65537", "sizes/f1048579", "bin/busybox", "links/hard2"}
	want := map[string][]byte{}
	for _, f := range files {
		want[f] = mustRead(t, filepath.Join(src, f))
	}
	var ops atomic.Int64
	var mu sync.Mutex
	var errs []string
	var maxStall time.Duration
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, root := range []string{mnt, merged} {
		wg.Go(func() {
			buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
			if err != nil {
				panic(err)
			}
			defer unix.Munmap(buf)
			for {
				select {
				case <-stop:
					return
				default:
				}
				for _, f := range files {
					start := time.Now()
					got, err := readDirect(filepath.Join(root, f), buf)
					if err == nil && !bytes.Equal(got, want[f]) {
						err = fmt.Errorf("wrong contents (%d bytes)", len(got))
					}
					var st unix.Stat_t
					if err == nil {
						err = unix.Lstat(filepath.Join(root, f), &st)
					}
					d := time.Since(start)
					mu.Lock()
					if err != nil {
						errs = append(errs, fmt.Sprintf("%s/%s: %v", root, f, err))
					}
					maxStall = max(maxStall, d)
					mu.Unlock()
					ops.Add(1)
				}
			}
		})
	}
	waitOps := func(n int64) {
		t.Helper()
		target := ops.Load() + n
		waitFor(t, fmt.Sprintf("%d more reads", n), func() bool { return ops.Load() >= target })
	}
	waitOps(50)
	for round := 1; round <= 3; round++ {
		pid := killServer(t, c)
		waitOps(50) // reads go on against the replacement
		t.Logf("round %d: replacement server pid %d, %d reads so far", round, pid, ops.Load())
	}
	close(stop)
	wg.Wait()
	if len(errs) > 0 {
		t.Errorf("%d read errors while the server was replaced, first: %s", len(errs), strings.Join(errs[:min(5, len(errs))], "; "))
	}
	t.Logf("%d reads, longest read %v", ops.Load(), maxStall)
	ms := listMounts(t, c)
	if len(ms) != 1 || ms[0].Adoptions != 3 || ms[0].Target != mnt {
		t.Errorf("after three replacements: %s", describe(ms))
	}
	// Every replacement asked the kernel to resend what its predecessor
	// had taken but not answered (Linux >= 6.9).
	if log := string(mustRead(t, filepath.Join(c.StateDir(), "serve.log"))); strings.Count(log, "resend=true") != 3 {
		t.Errorf("serve.log does not show three adoptions with FUSE_NOTIFY_RESEND:\n%s", log)
	}
}

// TestHolderKilled: when the holder dies, the server starts a new one and
// hands it every connection again, so a later server death is survived.
func TestHolderKilled(t *testing.T) {
	c := startServer(t)
	src, img := testImage(t)
	dir := t.TempDir()
	mnt := mkdir(t, filepath.Join(dir, "mnt"))
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	pidOf := func(lock string) int {
		// The holder's pid, from the process holding its lock.
		out, err := exec.Command("fuser", lock).Output()
		if err == nil {
			var pid int
			fmt.Sscan(strings.TrimSpace(string(out)), &pid)
			return pid
		}
		return holderPIDFromProc(t, lock)
	}
	hp := pidOf(holderLock(c.StateDir()))
	if hp <= 0 {
		t.Fatal("cannot find the holder process")
	}
	syscall.Kill(hp, syscall.SIGKILL)
	waitFor(t, "a new holder", func() bool {
		p := holderPIDFromProc(t, holderLock(c.StateDir()))
		return p > 0 && p != hp
	})
	waitFor(t, "the holder to hold the connection again", func() bool {
		hc, err := dialHolder(c.StateDir())
		if err != nil {
			return false
		}
		defer hc.close()
		r, err := hc.call(&holderMsg{Op: "ping"}, -1)
		return err == nil && r.Count == 1
	})
	killServer(t, c)
	buf := make([]byte, 1<<20)
	got, err := readDirect(filepath.Join(mnt, "sizes/f65537"), buf)
	if err != nil || !bytes.Equal(got, mustRead(t, filepath.Join(src, "sizes/f65537"))) {
		t.Errorf("read after holder and server were replaced: %v", err)
	}
}

// holderPIDFromProc finds the process that has lock open.
func holderPIDFromProc(t *testing.T, lock string) int {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join("/proc", e.Name(), "fd"))
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join("/proc", e.Name(), "fd", fd.Name())); err == nil && l == lock {
				return pid
			}
		}
	}
	return 0
}

// TestRuncContainer runs a real runc container whose root is an overlay
// over a served image; it reads files in a loop (O_DIRECT, checking
// checksums) while the serving process is killed twice, and must exit 0.
func TestRuncContainer(t *testing.T) {
	runc := testenv.Bin(t, "runc")
	c := startServer(t)
	src, img := testImage(t)
	dir := t.TempDir()
	mnt := mkdir(t, filepath.Join(dir, "lower"))
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	merged, _ := mountOverlay(t, mnt, dir)

	var checks []string
	for _, f := range []string{"sizes/f65537", "sizes/f1048579", "bin/busybox"} {
		sum := sha256.Sum256(mustRead(t, filepath.Join(src, f)))
		checks = append(checks, fmt.Sprintf(
			`s=$(/bin/busybox dd if=/%s iflag=direct bs=65536 2>/dev/null | /bin/busybox sha256sum) || exit 1; [ "${s%%%% *}" = %s ] || { echo "bad /%s: $s"; exit 1; }`,
			f, hex.EncodeToString(sum[:]), f))
	}
	script := `set -o pipefail; i=0; end=$(( $(/bin/busybox date +%s) + 6 ))
while [ $(/bin/busybox date +%s) -lt $end ]; do
` + strings.Join(checks, "\n") + `
i=$((i+1)); done; echo "iterations $i"`

	bundle := mkdir(t, filepath.Join(dir, "bundle"))
	if out, err := exec.Command(runc, "spec", "--bundle", bundle).CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v: %s", err, out)
	}
	var spec map[string]any
	b := mustRead(t, filepath.Join(bundle, "config.json"))
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	proc := spec["process"].(map[string]any)
	proc["args"] = []string{"/bin/sh", "-c", script}
	proc["terminal"] = false
	spec["root"] = map[string]any{"path": merged, "readonly": false}
	b, _ = json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}
	state := mkdir(t, filepath.Join(dir, "runc-state"))
	id := fmt.Sprintf("daxfs-mounter-%d", os.Getpid())
	cmd := exec.Command(runc, "--root", state, "run", "--bundle", bundle, id)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		exec.Command(runc, "--root", state, "delete", "--force", id).Run()
	})
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	time.Sleep(1500 * time.Millisecond)
	killServer(t, c)
	time.Sleep(1500 * time.Millisecond)
	killServer(t, c)
	var err error
	select {
	case err = <-done:
	case <-time.After(60 * time.Second):
		cmd.Process.Kill()
		err = <-done
	}
	if err != nil || !strings.Contains(out.String(), "iterations ") {
		t.Fatalf("container: %v\n%s", err, out.String())
	}
	t.Logf("container: %s", strings.TrimSpace(out.String()))
	var n int
	fmt.Sscanf(strings.TrimSpace(out.String()[strings.Index(out.String(), "iterations "):]), "iterations %d", &n)
	if n < 2 {
		t.Errorf("container did only %d iterations", n)
	}
	_ = io.Discard
}

// TestRemountOverDeadMount: if the server and the holder both die, the
// mount is dead (ENOTCONN); mounting on its directory again replaces it.
func TestRemountOverDeadMount(t *testing.T) {
	c := startServer(t)
	src, img := testImage(t)
	mnt := mkdir(t, filepath.Join(t.TempDir(), "mnt"))
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	probe := NewClient(c.StateDir(), nil)
	r, err := probe.Ensure(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	hp := holderPIDFromProc(t, holderLock(c.StateDir()))
	syscall.Kill(hp, syscall.SIGKILL)
	syscall.Kill(r.PID, syscall.SIGKILL)
	waitFor(t, "the mount to die", func() bool {
		_, err := os.Stat(filepath.Join(mnt, "one"))
		return err != nil
	})
	if _, err := c.Ensure(context.Background()); err != nil { // starts a new server
		t.Fatal(err)
	}
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatalf("mount over a dead mount: %v", err)
	}
	if got := mustRead(t, filepath.Join(mnt, "sizes/f4097")); !bytes.Equal(got, mustRead(t, filepath.Join(src, "sizes/f4097"))) {
		t.Errorf("wrong contents after remount")
	}
}
