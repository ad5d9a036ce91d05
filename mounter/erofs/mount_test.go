package erofs

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

// shmDir is a fresh directory in /dev/shm (where the region lives in
// production), removed at the end of the test.
func shmDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("/dev/shm", "erofs-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// region is a DAXFS image placed inside a bigger file, as in the shared
// region: the image's byte 0 at off.
type region struct {
	path string
	off  int64
	size int64
}

// placeImage writes img at off into a new region file of at least size
// bytes (rounded up to cover the image and to 4096).
func placeImage(t testing.TB, dir string, img []byte, off, size int64) region {
	t.Helper()
	p := filepath.Join(dir, "region")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(img, off); err != nil {
		t.Fatal(err)
	}
	size = max(size, off+int64(len(img)))
	size = (size + blockSize - 1) &^ (blockSize - 1)
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return region{path: p, off: off, size: size}
}

// openRegion opens the region's DAXFS image over a mapping of the region
// from the image on, as the mounter maps a window (a view's image needs
// the layer images after it); the mapping goes at the end of the test.
func openRegion(t testing.TB, r region) *daxfs.Image {
	t.Helper()
	rf, err := os.Open(r.path)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	win, err := unix.Mmap(int(rf.Fd()), r.off, int(r.size-r.off), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(win) })
	im, err := daxfs.Open(win)
	if err != nil {
		t.Fatal(err)
	}
	return im
}

// writeMeta writes the EROFS image of the region's DAXFS image to a file.
func writeMeta(t testing.TB, dir string, r region) string {
	t.Helper()
	im := openRegion(t, r)
	p := filepath.Join(dir, "meta.erofs")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := Write(f, im, Options{DataOffset: r.off, DataSize: r.size})
	if err != nil {
		t.Fatalf("Write: %v", err)
	}
	if fi, _ := f.Stat(); fi.Size() != n || n%blockSize != 0 {
		t.Fatalf("Write returned %d, file has %d bytes", n, fi.Size())
	}
	return p
}

// attachLoop attaches file read-only to a free loop device; cleanup
// detaches it.
func attachLoop(t testing.TB, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// mountErofs mounts the metadata image with the region as its extra
// device and returns the mount point; cleanup unmounts (before the loop
// devices are detached).
func mountErofs(t testing.TB, meta, data string) string {
	t.Helper()
	dataDev := attachLoop(t, data)
	metaDev := attachLoop(t, meta)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(metaDev, mnt, "erofs", unix.MS_RDONLY, "device="+dataDev); err != nil {
		t.Fatalf("mount erofs %s (device=%s) on %s: %v\n%s", metaDev, dataDev, mnt, err, dmesgTail())
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	return mnt
}

func dmesgTail() string {
	out, _ := exec.Command("dmesg").Output()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return "dmesg:\n" + strings.Join(lines[max(0, len(lines)-8):], "\n")
}

// treeSetup builds the conformance tree, its DAXFS image placed at a
// nonzero offset of a region, the EROFS image, and mounts it.
type treeSetup struct {
	src, mnt, meta string
	r              region
}

func mountTree(t *testing.T, write func(testing.TB, string)) treeSetup {
	t.Helper()
	testenv.RequireRoot(t)
	dir := shmDir(t)
	src := filepath.Join(t.TempDir(), "src")
	write(t, src)
	imgPath := filepath.Join(dir, "image.daxfs")
	if err := mtest.ImageFromDir(src, imgPath); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(imgPath)
	// 3 blocks of something else before the image, 5 after.
	r := placeImage(t, dir, img, 3*blockSize, 3*blockSize+int64(len(img))+5*blockSize)
	meta := writeMeta(t, dir, r)
	return treeSetup{src: src, mnt: mountErofs(t, meta, r.path), meta: meta, r: r}
}

// TestConformance mounts the conformance tree through erofs, its DAXFS
// image at a nonzero offset of the region, and checks it against the
// source tree.
func TestConformance(t *testing.T) {
	s := mountTree(t, mtest.WriteTree)
	mtest.Conformance(t, s.src, s.mnt)

	t.Run("hard-links", func(t *testing.T) {
		var a unix.Stat_t
		for i, name := range []string{"hard1", "hard2", "hard3"} {
			var st unix.Stat_t
			if err := unix.Lstat(filepath.Join(s.mnt, "links", name), &st); err != nil {
				t.Fatal(err)
			}
			if i == 0 {
				a = st
			} else if st.Ino != a.Ino {
				t.Errorf("links/%s: inode %d, links/hard1 has %d", name, st.Ino, a.Ino)
			}
		}
	})

	t.Run("mmap", func(t *testing.T) {
		name := "sizes/f65537"
		want, err := os.ReadFile(filepath.Join(s.src, name))
		if err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(filepath.Join(s.mnt, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		m, err := unix.Mmap(int(f.Fd()), 4096, len(want)-4096, unix.PROT_READ, unix.MAP_SHARED)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Munmap(m)
		if !bytes.Equal(m, want[4096:]) {
			t.Errorf("mmap of %s at 4096: wrong bytes", name)
		}
	})

	t.Run("exec", func(t *testing.T) {
		out, err := exec.Command(filepath.Join(s.mnt, "bin/busybox"), "echo", "hello from erofs").CombinedOutput()
		if err != nil || string(out) != "hello from erofs\n" {
			t.Errorf("busybox on the mount: %q, %v", out, err)
		}
	})

	t.Run("statfs", func(t *testing.T) {
		var st unix.Statfs_t
		if err := unix.Statfs(s.mnt, &st); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(s.meta)
		if err != nil {
			t.Fatal(err)
		}
		// f_blocks counts the metadata device and the data device.
		blocks := uint64(fi.Size()+s.r.size) / blockSize
		if st.Type != superMagic || st.Bsize != blockSize || st.Blocks != blocks || st.Namelen != 255 {
			t.Errorf("statfs = type %#x bsize %d blocks %d (want %d) namelen %d", st.Type, st.Bsize, st.Blocks, blocks, st.Namelen)
		}
		if st.Flags&unix.ST_RDONLY == 0 || st.Flags&unix.ST_NODEV != 0 || st.Flags&unix.ST_NOSUID != 0 {
			t.Errorf("mount flags %#x: want read-only, dev, suid", st.Flags)
		}
	})

	t.Run("metadata-only", func(t *testing.T) {
		// No file data is copied: a run of the random bytes of a file
		// is nowhere in the metadata image, and the image is small.
		meta, err := os.ReadFile(s.meta)
		if err != nil {
			t.Fatal(err)
		}
		data, err := os.ReadFile(filepath.Join(s.src, "sizes/f65537"))
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(meta, data[1000:1064]) {
			t.Error("the metadata image holds file data")
		}
		if len(meta) > 256<<10 {
			t.Errorf("metadata image of %d bytes for a tree of a few hundred inodes", len(meta))
		}
	})

	t.Run("fsck", func(t *testing.T) {
		// erofs-utils' checker reads every inode and every file through
		// the device table, independently of the kernel.
		out, err := exec.Command("fsck.erofs", "--device="+s.r.path, s.meta).CombinedOutput()
		if err != nil {
			t.Errorf("fsck.erofs: %v\n%s", err, out)
		}
	})
}

// TestUpstreamFixture mounts the upstream tool's image through erofs and
// compares every path with the fixture's expected.json.
func TestUpstreamFixture(t *testing.T) {
	testenv.RequireRoot(t)
	img, err := os.ReadFile(filepath.Join(mtest.FixtureDir(), "static.daxfs"))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	dir := shmDir(t)
	r := placeImage(t, dir, img, 16*blockSize, 0)
	mtest.UpstreamFixture(t, mountErofs(t, writeMeta(t, dir, r), r.path))
}

// TestOverlayOnErofs: an overlay whose lower layer is the erofs mount reads
// through, and copies a file up (with its xattrs) on write.
func TestOverlayOnErofs(t *testing.T) {
	s := mountTree(t, mtest.WriteTree)
	d := t.TempDir()
	upper, work, merged := filepath.Join(d, "upper"), filepath.Join(d, "work"), filepath.Join(d, "merged")
	for _, p := range []string{upper, work, merged} {
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	opts := "lowerdir=" + s.mnt + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v\n%s", opts, err, dmesgTail())
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil {
			t.Errorf("unmount %s: %v", merged, err)
			unix.Unmount(merged, unix.MNT_DETACH)
		}
	})
	want, _ := os.ReadFile(filepath.Join(s.src, "sizes/f4097"))
	if got, err := os.ReadFile(filepath.Join(merged, "sizes/f4097")); err != nil || !bytes.Equal(got, want) {
		t.Errorf("read through the overlay: %d bytes, %v", len(got), err)
	}
	// Copy-up: append to a file with xattrs.
	p := filepath.Join(merged, "xattrs/file")
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString("more\n"); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(p); string(got) != "attrs\nmore\n" {
		t.Errorf("after the write the overlay shows %q", got)
	}
	if got, _ := os.ReadFile(filepath.Join(s.mnt, "xattrs/file")); string(got) != "attrs\n" {
		t.Errorf("the lower layer changed: %q", got)
	}
	buf := make([]byte, 64)
	n, err := unix.Lgetxattr(filepath.Join(upper, "xattrs/file"), "user.comment", buf)
	if err != nil || string(buf[:n]) != "hello" {
		t.Errorf("copied-up file's user.comment = %q, %v", buf[:max(n, 0)], err)
	}
	n, err = unix.Lgetxattr(filepath.Join(upper, "xattrs/file"), "trusted.secret", buf)
	if err != nil || string(buf[:n]) != "\x00\x01\x02\xff" {
		t.Errorf("copied-up file's trusted.secret = %q, %v", buf[:max(n, 0)], err)
	}
	// (security.capability is gone: a write drops file capabilities.)
	// A new file and a removal (whiteout) work on top.
	if err := os.WriteFile(filepath.Join(merged, "new"), []byte("new"), 0o644); err != nil {
		t.Error(err)
	}
	if err := os.Remove(filepath.Join(merged, "one")); err != nil {
		t.Error(err)
	}
	if _, err := os.Lstat(filepath.Join(merged, "one")); !os.IsNotExist(err) {
		t.Errorf("removed file still visible: %v", err)
	}
}

// TestLargeFile: a view-style image whose one file lives past its own end
// (as a view's files live in the layer images after it) at a device offset
// past 4 GiB, the file itself over 4 GiB, so both the block address and
// the chunk size need more than 32 bits of bytes. The region is sparse.
func TestLargeFile(t *testing.T) {
	testenv.RequireRoot(t)
	dir := shmDir(t)
	p := filepath.Join(dir, "image")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	const size = 4<<30 + 8192 + 5
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	if err := w.AddExternal(&daxfs.Header{Path: "huge", Mode: daxfs.ModeRegular | 0o644, Size: size}, 0, 4096); err != nil {
		t.Fatal(err)
	}
	for _, n := range []int{0, 1, 4095, 4096, 4097} {
		data := bytes.Repeat([]byte{byte(n)}, n)
		if err := w.Add(&daxfs.Header{Path: "small/f" + strconv.Itoa(n), Mode: daxfs.ModeRegular | 0o600, Size: int64(n)}, bytes.NewReader(data)); err != nil {
			t.Fatal(err)
		}
	}
	n, err := w.Layout()
	if err != nil {
		t.Fatal(err)
	}
	base := uint64(n+4095)&^4095 + 5<<30 // the "layer" starts 5 GiB after the image
	window := (base + 4096 + size + 4095) &^ 4095
	if err := w.SetExternalBases([]uint64{base}, window); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	img, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(p)
	const off = 7 * blockSize
	img = img[:n] // the window past the image is the region's business
	r := placeImage(t, dir, img, off, off+int64(window))
	rf, err := os.OpenFile(r.path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Close()
	// The file's byte 0 is at region byte off + base + 4096 (the
	// layer's base image) + 0.
	fileAt := int64(off + base + 4096)
	marks := map[int64]string{0: "first", 4<<30 - 3: "straddles-4GiB", 4<<30 + 4096: "past-4GiB", size - 4: "end!"}
	for o, m := range marks {
		if _, err := rf.WriteAt([]byte(m), fileAt+o); err != nil {
			t.Fatal(err)
		}
	}
	mnt := mountErofs(t, writeMeta(t, dir, r), r.path)
	hf, err := os.Open(filepath.Join(mnt, "huge"))
	if err != nil {
		t.Fatal(err)
	}
	defer hf.Close()
	if st, _ := hf.Stat(); st.Size() != size {
		t.Errorf("size %d, want %d", st.Size(), size)
	}
	for o, m := range marks {
		buf := make([]byte, len(m))
		if _, err := hf.ReadAt(buf, o); err != nil || string(buf) != m {
			t.Errorf("ReadAt(%d) = %q, %v; want %q", o, buf, err, m)
		}
	}
	if k, _ := hf.ReadAt(make([]byte, 10), size-2); k != 2 {
		t.Errorf("read across the end returned %d bytes", k)
	}
	for _, n := range []int{0, 1, 4095, 4096, 4097} {
		got, err := os.ReadFile(filepath.Join(mnt, "small/f"+strconv.Itoa(n)))
		if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{byte(n)}, n)) {
			t.Errorf("small/f%d: %d bytes, %v", n, len(got), err)
		}
	}
}

// TestMountWithoutDevice: mounted without device= (the kernel then looks
// for device 1's chunks on the metadata device), reading a file fails with
// EIO rather than returning metadata bytes as its content.
func TestMountWithoutDevice(t *testing.T) {
	s := mountTree(t, mtest.WriteTree)
	metaDev := attachLoop(t, s.meta)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(metaDev, mnt, "erofs", unix.MS_RDONLY, ""); err != nil {
		return // refusing the mount is fine too
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	for _, name := range []string{"one", "sizes/f4097", "bin/busybox"} {
		if b, err := os.ReadFile(filepath.Join(mnt, name)); !errors.Is(err, unix.EIO) {
			t.Errorf("%s without the data device: %d bytes, %v; want EIO", name, len(b), err)
		}
	}
}

// TestPosixACL: POSIX ACLs (system.posix_acl_access and _default, stored
// under their own erofs name indexes) read back and are enforced.
func TestPosixACL(t *testing.T) {
	// version 2; USER_OBJ rw-, USER 1000 r--, GROUP_OBJ r--, MASK r--,
	// OTHER ---
	acl := []byte{
		2, 0, 0, 0,
		1, 0, 6, 0, 0xff, 0xff, 0xff, 0xff,
		2, 0, 4, 0, 0xe8, 0x03, 0, 0,
		4, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
		0x10, 0, 4, 0, 0xff, 0xff, 0xff, 0xff,
		0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff,
	}
	s := mountTree(t, func(tb testing.TB, root string) {
		if err := os.MkdirAll(filepath.Join(root, "d"), 0o755); err != nil {
			tb.Fatal(err)
		}
		f := filepath.Join(root, "d/secret")
		if err := os.WriteFile(f, []byte("for uid 1000\n"), 0o600); err != nil {
			tb.Fatal(err)
		}
		if err := unix.Setxattr(f, "system.posix_acl_access", acl, 0); err != nil {
			tb.Fatalf("setting an ACL on the source: %v", err)
		}
		if err := unix.Setxattr(filepath.Join(root, "d"), "system.posix_acl_default", acl, 0); err != nil {
			tb.Fatalf("setting a default ACL on the source: %v", err)
		}
	})
	got := requireSameTree(t, s.src, s.mnt)
	if _, ok := got["/d/secret"].Xattrs["system.posix_acl_access"]; !ok {
		t.Errorf("no ACL on the mounted file: %v", got["/d/secret"].Xattrs)
	}
	// Enforced: uid 1000 (named in the ACL) may read the 0600 root file,
	// uid 1001 may not. (The test's temporary directories are 0700.)
	for p := filepath.Dir(s.mnt); p != os.TempDir() && p != "/"; p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for uid, ok := range map[uint32]bool{1000: true, 1001: false} {
		cmd := exec.Command("cat", filepath.Join(s.mnt, "d/secret"))
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		if (err == nil) != ok {
			t.Errorf("uid %d reading the file: %q, %v; want allowed=%v", uid, out, err, ok)
		}
	}
}

// requireSameTree fails unless the tree at mnt equals the one at src, path
// for path (showing at most 30 differences), and returns mnt's tree.
func requireSameTree(t *testing.T, src, mnt string) map[string]testenv.FileInfo {
	t.Helper()
	want, err := testenv.Snapshot(src)
	if err != nil {
		t.Fatal(err)
	}
	got, err := testenv.Snapshot(mnt)
	if err != nil {
		t.Fatal(err)
	}
	if d := testenv.Diff(want, got); len(d) > 0 {
		t.Errorf("mounted tree differs from the source (%d paths):\n%s", len(want), strings.Join(d[:min(len(d), 30)], "\n"))
	}
	return got
}
