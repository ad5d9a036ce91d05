package mounter

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

// regionWith writes the image file img into a new region-like file in
// /dev/shm at byte off, with free space after it, and returns the file.
func regionWith(t *testing.T, img string, off int64) string {
	t.Helper()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	shm, err := os.MkdirTemp("/dev/shm", "mounter-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(shm) })
	p := filepath.Join(shm, "region")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(off + int64(len(b)) + 1<<20); err != nil {
		t.Fatal(err)
	}
	return p
}

// loopDevicesOf lists the loop devices whose backing file contains needle.
func loopDevicesOf(t *testing.T, needle string) []string {
	t.Helper()
	ents, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	var out []string
	for _, e := range ents {
		b, err := os.ReadFile(e)
		if err == nil && strings.Contains(string(b), needle) {
			out = append(out, strings.TrimSpace(string(b)))
		}
	}
	return out
}

// TestAutoMountsWithEROFS: without the daxfs kernel module, auto mode
// mounts with erofs (even a source with a physical address); the mount
// is the source tree exactly; a second Mounter (a restarted daemon) lists
// it; Unmount removes it and both loop devices detach by themselves.
func TestAutoMountsWithEROFS(t *testing.T) {
	testenv.RequireRoot(t)
	if ok, _ := KernelAvailable(); ok {
		t.Fatal("this test expects no daxfs kernel module")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	state := t.TempDir()
	fo := FUSEOptions{StateDir: state}
	m, err := New(ctx, ModeAuto, fo)
	if err != nil {
		t.Fatal(err)
	}
	if m.(*imageMounter).erofs == nil {
		t.Fatal("auto mode did not pick erofs on a kernel with erofs and loop devices")
	}
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	mtest.WriteTree(t, src)
	img := filepath.Join(dir, "img")
	if err := mtest.ImageFromDir(src, img); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(img)
	// The image sits 3 pages into a region file, as region extents do.
	const off = 3 * 4096
	region := regionWith(t, img, off)
	target := filepath.Join(dir, "mnt")
	os.Mkdir(target, 0o755)
	if err := m.Mount(ctx, Source{Path: region, Offset: off, Length: st.Size(), PhysAddr: 0x100000000, HasPhys: true}, target); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Unmount(target, unix.MNT_DETACH) })
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ms {
		if e.Mountpoint == target && e.FSType != EROFSFSType {
			t.Fatalf("%s is mounted as %s, want erofs", target, e.FSType)
		}
	}
	mtest.Conformance(t, src, target)
	if got := loopDevicesOf(t, region); len(got) != 1 {
		t.Fatalf("loop devices over the region: %v, want one", got)
	}
	if ents, _ := os.ReadDir(filepath.Join(state, erofsDirName)); len(ents) != 0 {
		t.Errorf("metadata images left in the state directory: %v", ents)
	}

	m2, err := New(ctx, ModeAuto, fo)
	if err != nil {
		t.Fatal(err)
	}
	infos, err := m2.Mounted(ctx)
	if err != nil || len(infos) != 1 || infos[0].Target != target || infos[0].Kind != KindEROFS {
		t.Fatalf("Mounted = %+v, %v", infos, err)
	}
	if err := m2.Unmount(ctx, target); err != nil {
		t.Fatal(err)
	}
	if err := m2.Unmount(ctx, target); !errdefs.IsNotFound(err) {
		t.Errorf("second unmount: %v, want not found", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for len(loopDevicesOf(t, region)) > 0 || len(loopDevicesOf(t, filepath.Join(state, erofsDirName))) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("loop devices still attached after the unmount: %v %v", loopDevicesOf(t, region), loopDevicesOf(t, state))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if infos, err := m.Mounted(ctx); err != nil || len(infos) != 0 {
		t.Fatalf("Mounted after unmount = %+v, %v", infos, err)
	}
}

// TestAutoFallsBackToFUSE: an image erofs cannot index (an xattr value of
// 65536 bytes: DAXFS allows it, erofs stops at 65535) is served with FUSE
// in auto mode, and reads the same.
func TestAutoFallsBackToFUSE(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, fo := testMounterOptions(t)
	m, err := New(ctx, ModeAuto, fo)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	img := filepath.Join(dir, "img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	big := strings.Repeat("v", 65536)
	if err := w.Add(&daxfs.Header{Path: "f", Mode: daxfs.ModeRegular | 0o644, Size: 2, Xattrs: map[string][]byte{"user.big": []byte(big)}}, strings.NewReader("ok")); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	target := filepath.Join(dir, "mnt")
	os.Mkdir(target, 0o755)
	if err := m.Mount(ctx, Source{Path: img}, target); err != nil {
		t.Fatal(err)
	}
	defer m.Unmount(context.Background(), target)
	infos, err := m.Mounted(ctx)
	if err != nil || len(infos) != 1 || infos[0].Kind != KindFUSE {
		t.Fatalf("Mounted = %+v, %v; want one FUSE mount", infos, err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "f")); err != nil || string(b) != "ok" {
		t.Fatalf("read through the fallback mount: %q %v", b, err)
	}
	v := make([]byte, 70000)
	if n, err := unix.Getxattr(filepath.Join(target, "f"), "user.big", v); err != nil || string(v[:n]) != big {
		t.Fatalf("xattr through the fallback mount: %d bytes, %v", n, err)
	}
	// Forcing erofs instead gives the writer's error, naming the limit.
	e, err := New(ctx, ModeEROFS, fo)
	if err != nil {
		t.Fatal(err)
	}
	os.Mkdir(target+"2", 0o755)
	if err := e.Mount(ctx, Source{Path: img}, target+"2"); err == nil || !strings.Contains(err.Error(), "user.big") {
		unix.Unmount(target+"2", unix.MNT_DETACH)
		t.Fatalf("erofs mount of an unrepresentable image: %v, want an error naming the xattr", err)
	}
}
