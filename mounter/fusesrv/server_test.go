package fusesrv

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

func TestMountListUnmount(t *testing.T) {
	c := startServer(t)
	src, img := testImage(t)
	dir := t.TempDir()
	mnt := mkdir(t, filepath.Join(dir, "mnt"))
	ctx := context.Background()

	if err := mountImage(t, c, Source{Path: img}, mnt, true); err != nil {
		t.Fatal(err)
	}
	want, _ := testenv.Snapshot(src)
	got, err := testenv.Snapshot(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if d := testenv.Diff(want, got); len(d) > 0 {
		t.Errorf("served tree differs:\n%s", strings.Join(d, "\n"))
	}
	// Exec of a static binary from the mount, directly and through a
	// symlink.
	if out, err := exec.Command(filepath.Join(mnt, "bin/busybox"), "echo", "hello from daxfs").CombinedOutput(); err != nil || string(out) != "hello from daxfs\n" {
		t.Errorf("exec busybox from the mount: %q, %v", out, err)
	}
	if out, err := exec.Command(filepath.Join(mnt, "bin/sh"), "-c", "cat "+filepath.Join(mnt, "one")).CombinedOutput(); err != nil || string(out) != "x" {
		t.Errorf("exec through a symlink: %q, %v", out, err)
	}
	ms := listMounts(t, c)
	if len(ms) != 1 || ms[0].Target != mnt || ms[0].State != StateMounted || ms[0].Source.Path != img {
		t.Errorf("list = %s", describe(ms))
	}
	if err := c.Mount(ctx, Source{Path: img}, mnt, false); !errdefs.IsAlreadyExists(err) {
		t.Errorf("second mount on %s: %v, want already exists", mnt, err)
	}

	// A window of a larger file: the same image at offset 8192 of a
	// "region" file with garbage around it.
	b, _ := os.ReadFile(img)
	region := filepath.Join(dir, "region")
	pad := bytes.Repeat([]byte{0xee}, 8192)
	os.WriteFile(region, append(append(append([]byte{}, pad...), b...), pad...), 0o600)
	mnt2 := mkdir(t, filepath.Join(dir, "mnt2"))
	if err := mountImage(t, c, Source{Path: region, Offset: 8192, Length: int64(len(b))}, mnt2, true); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt2, "sizes/f4097")); err != nil || !bytes.Equal(got, mustRead(t, filepath.Join(src, "sizes/f4097"))) {
		t.Errorf("read through a region window: %v", err)
	}

	// Bad input: a clear error naming the source, nothing mounted.
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, bytes.Repeat([]byte{1}, 8192), 0o600)
	mnt3 := mkdir(t, filepath.Join(dir, "mnt3"))
	err = c.Mount(ctx, Source{Path: bad}, mnt3, false)
	if !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), bad) {
		t.Errorf("mount of garbage: %v", err)
	}
	if err := c.Mount(ctx, Source{Path: region, Offset: 8192, Length: 4096}, mnt3, false); err == nil {
		t.Errorf("mount of a truncated window succeeded")
	}
	if len(listMounts(t, c)) != 2 {
		t.Errorf("failed mounts left records: %s", describe(listMounts(t, c)))
	}

	for _, m := range []string{mnt, mnt2} {
		if err := c.Unmount(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Unmount(ctx, mnt); !errdefs.IsNotFound(err) {
		t.Errorf("second unmount: %v, want not found", err)
	}
	waitFor(t, "connections released", func() bool { return len(listMounts(t, c)) == 0 })
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestOverlayLower uses a served image as the lower layer of a real
// overlay mount: reads, exec, copy-up, delete and rename of lower files,
// and an unmount of the FUSE directory while the overlay still uses it.
func TestOverlayLower(t *testing.T) {
	c := startServer(t)
	src, img := testImage(t)
	dir := t.TempDir()
	mnt := mkdir(t, filepath.Join(dir, "lower"))
	ctx := context.Background()
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	merged, upper := mountOverlay(t, mnt, dir)

	want, _ := testenv.Snapshot(src)
	got, err := testenv.Snapshot(merged)
	if err != nil {
		t.Fatal(err)
	}
	// overlayfs shows directories with its own nlink, and its root
	// directory is the upper directory.
	delete(want, "/")
	delete(got, "/")
	if d := testenv.Diff(want, got, testenv.FieldDirNlink); len(d) > 0 {
		t.Errorf("overlay over the served image differs from the source:\n%s", strings.Join(d, "\n"))
	}
	if out, err := exec.Command(filepath.Join(merged, "bin/busybox"), "echo", "ok").CombinedOutput(); err != nil || string(out) != "ok\n" {
		t.Errorf("exec from the overlay: %q %v", out, err)
	}

	// Copy-up on write.
	f, err := os.OpenFile(filepath.Join(merged, "sizes/f4097"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte("appended"))
	f.Close()
	orig := mustRead(t, filepath.Join(src, "sizes/f4097"))
	if got := mustRead(t, filepath.Join(merged, "sizes/f4097")); !bytes.Equal(got, append(append([]byte{}, orig...), "appended"...)) {
		t.Errorf("copied-up file has wrong contents")
	}
	if got := mustRead(t, filepath.Join(mnt, "sizes/f4097")); !bytes.Equal(got, orig) {
		t.Errorf("the lower changed")
	}
	if _, err := os.Stat(filepath.Join(upper, "sizes/f4097")); err != nil {
		t.Errorf("no copy-up in the upper: %v", err)
	}
	// Delete and rename lower files.
	if err := os.Remove(filepath.Join(merged, "one")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(merged, "one")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("deleted file still visible: %v", err)
	}
	if err := os.Rename(filepath.Join(merged, "links/hard1"), filepath.Join(merged, "renamed")); err != nil {
		t.Fatal(err)
	}
	if got := mustRead(t, filepath.Join(merged, "renamed")); string(got) != "hard\n" {
		t.Errorf("renamed file reads %q", got)
	}
	if _, err := os.Lstat(filepath.Join(merged, "links/hard1")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("rename source still visible: %v", err)
	}
	if _, err := os.Lstat(filepath.Join(mnt, "one")); err != nil {
		t.Errorf("delete through the overlay touched the lower: %v", err)
	}

	// Unmount the lower under the overlay: succeeds, the overlay keeps
	// working, the connection is reported detached until the overlay goes.
	if err := c.Unmount(ctx, mnt); err != nil {
		t.Fatalf("unmount of a lower in use: %v", err)
	}
	if got := mustRead(t, filepath.Join(merged, "sizes/f65537")); !bytes.Equal(got, mustRead(t, filepath.Join(src, "sizes/f65537"))) {
		t.Errorf("overlay read after the lower was detached: wrong bytes")
	}
	if ms := listMounts(t, c); len(ms) != 1 || ms[0].State != StateDetached {
		t.Errorf("list after detaching a lower in use = %s", describe(ms))
	}
	if err := unix.Unmount(merged, 0); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the detached connection to end", func() bool { return len(listMounts(t, c)) == 0 })
}

var _ = mtest.Busybox

// TestStopIfIdle: stop-idle leaves a server that serves a mount alone,
// stops an idle one and its holder (both processes exit), and a later
// mount starts a new server.
func TestStopIfIdle(t *testing.T) {
	c := startServer(t)
	_, img := testImage(t)
	mnt := mkdir(t, filepath.Join(t.TempDir(), "mnt"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	first := serverPID(t, c)
	if stopped, err := c.StopIfIdle(ctx); err != nil || stopped {
		t.Fatalf("stop-idle with a mount: stopped %v, %v; want it to keep serving", stopped, err)
	}
	if err := c.Unmount(ctx, mnt); err != nil {
		t.Fatal(err)
	}
	// The connection ends once the kernel lets it go.
	for deadline := time.Now().Add(10 * time.Second); len(listMounts(t, c)) > 0; {
		if time.Now().After(deadline) {
			t.Fatalf("connection still served after unmount: %s", describe(listMounts(t, c)))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if stopped, err := c.StopIfIdle(ctx); err != nil || !stopped {
		t.Fatalf("stop-idle of an idle server: stopped %v, %v", stopped, err)
	}
	waitFree(t, serveLock(c.StateDir()))
	waitFree(t, holderLock(c.StateDir()))
	if alive(serveSock(c.StateDir())) {
		t.Fatal("the stopped server still answers")
	}
	if stopped, err := c.StopIfIdle(ctx); err != nil || stopped {
		t.Fatalf("stop-idle with no server: stopped %v, %v; want false and no error", stopped, err)
	}
	// The next mount starts a new server.
	if err := mountImage(t, c, Source{Path: img}, mnt, false); err != nil {
		t.Fatal(err)
	}
	if pid := serverPID(t, c); pid == first {
		t.Fatalf("mount after stop-idle served by the old server (pid %d)", pid)
	}
	if _, err := os.Stat(filepath.Join(mnt, "one")); err != nil {
		t.Fatal(err)
	}
}
