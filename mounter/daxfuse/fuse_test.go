package daxfuse

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

// mmapHelperEnv makes the test binary map FILE at OFF for LEN bytes and
// print the sha256 of the mapped bytes.
const mmapHelperEnv = "DAXFUSE_TEST_MMAP"

func TestMain(m *testing.M) {
	if os.Getenv(mmapHelperEnv) == "1" {
		os.Exit(mmapHelper(os.Args[1:]))
	}
	os.Exit(m.Run())
}

func mmapHelper(args []string) int {
	if len(args) != 3 {
		return 2
	}
	off, _ := strconv.ParseInt(args[1], 10, 64)
	n, _ := strconv.Atoi(args[2])
	f, err := os.Open(args[0])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	m, err := unix.Mmap(int(f.Fd()), off, n, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	sum := sha256.Sum256(m)
	fmt.Println(hex.EncodeToString(sum[:]))
	return 0
}

func requireFUSE(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatalf("/dev/fuse is needed: %v", err)
	}
}

// serveImage mounts the image file at img on a new directory, served by a
// Conn in this process, and returns the directory. Cleanup unmounts it and
// checks that the connection ended.
func serveImage(t *testing.T, img string) string {
	t.Helper()
	win, err := MapWindow(img, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	im, err := daxfs.Open(win.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	fd, err := Mount(mnt, img)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	init, err := ReadInit(ctx, fd)
	if err != nil {
		unix.Unmount(mnt, unix.MNT_DETACH)
		t.Fatal(err)
	}
	c, err := NewConn(fd, NewFS(im, 0), init, log.L)
	if err != nil {
		unix.Unmount(mnt, unix.MNT_DETACH)
		t.Fatal(err)
	}
	c.Serve()
	if err := DisablePoll(mnt); err != nil {
		t.Error(err)
	}
	// A test that deadlocks on its own mount would hang in the kernel
	// forever (unkillable); abort the connection instead, so it fails.
	watchdog := time.AfterFunc(2*time.Minute, func() {
		t.Errorf("watchdog: aborting the FUSE connection of %s", mnt)
		abortConnection(mnt)
	})
	t.Cleanup(func() {
		watchdog.Stop()
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
		select {
		case <-c.Done():
		case <-time.After(10 * time.Second):
			t.Errorf("connection did not end after unmount")
		}
		if err := c.Err(); err != nil {
			t.Errorf("connection: %v", err)
		}
		unix.Close(fd)
		win.Close()
	})
	return mnt
}

// buildTree writes the conformance tree and its image.
func buildTree(t *testing.T) (src, img string) {
	t.Helper()
	dir := t.TempDir()
	src = filepath.Join(dir, "src")
	mtest.WriteTree(t, src)
	img = filepath.Join(dir, "image.daxfs")
	if err := mtest.ImageFromDir(src, img); err != nil {
		t.Fatal(err)
	}
	return src, img
}

func TestConformance(t *testing.T) {
	requireFUSE(t)
	src, img := buildTree(t)
	mnt := serveImage(t, img)

	mtest.Conformance(t, src, mnt)

	t.Run("mmap", func(t *testing.T) {
		// The mapping is read by a child process: a page fault on a FUSE
		// file served by this very process could block a goroutine
		// that a garbage collection then waits for, forever.
		name := "sizes/f65537"
		want, _ := os.ReadFile(filepath.Join(src, name))
		exe, _ := os.Executable()
		cmd := exec.Command(exe, filepath.Join(mnt, name), "4096", strconv.Itoa(len(want)-4096))
		cmd.Env = append(os.Environ(), mmapHelperEnv+"=1")
		out, err := cmd.Output()
		sum := sha256.Sum256(want[4096:])
		if err != nil || strings.TrimSpace(string(out)) != hex.EncodeToString(sum[:]) {
			t.Errorf("mmap of %s: %q, %v; want sha256 %x", name, out, err, sum)
		}
	})

	// Exec of binaries on the mount is tested in package fusesrv, where
	// the server is another process: here the kernel would ask this
	// process for security.capability in the middle of a vfork+execve,
	// which can deadlock the test.

	t.Run("statfs", func(t *testing.T) {
		var st unix.Statfs_t
		if err := unix.Statfs(mnt, &st); err != nil {
			t.Fatal(err)
		}
		fi, _ := os.Stat(img)
		if st.Type != 0x65735546 || st.Bsize != 4096 || st.Blocks != uint64((fi.Size()+4095)/4096) || st.Namelen != 255 || st.Files == 0 {
			t.Errorf("statfs = type %#x bsize %d blocks %d (image %d bytes) namelen %d files %d",
				st.Type, st.Bsize, st.Blocks, fi.Size(), st.Namelen, st.Files)
		}
		if st.Flags&unix.ST_RDONLY == 0 || st.Flags&unix.ST_NODEV != 0 || st.Flags&unix.ST_NOSUID != 0 {
			t.Errorf("mount flags %#x: want read-only, dev, suid", st.Flags)
		}
	})
}

// TestUpstreamFixture serves the image made by the upstream tool and
// compares every path with the fixture's expected.json.
func TestUpstreamFixture(t *testing.T) {
	requireFUSE(t)
	mtest.UpstreamFixture(t, serveImage(t, filepath.Join(mtest.FixtureDir(), "static.daxfs")))
}

func TestEncodeDev(t *testing.T) {
	for _, tc := range []struct{ major, minor uint32 }{{0, 0}, {1, 3}, {8, 17}, {259, 0}, {511, 300000}, {4095, 1<<20 - 1}} {
		got := encodeDev(unix.Mkdev(tc.major, tc.minor))
		// The kernel's new_decode_dev.
		major := (got & 0xfff00) >> 8
		minor := (got & 0xff) | ((got >> 12) & 0xfff00)
		if major != tc.major || minor != tc.minor {
			t.Errorf("encodeDev(%d:%d) decodes to %d:%d", tc.major, tc.minor, major, minor)
		}
	}
}

// TestLargeFileInWindow serves a view-style image whose one file lives
// outside the image itself, in the window after it (as a view's files live
// in the layer images after the view), at offsets past 4 GiB. The backing
// file is sparse, so the test is cheap.
func TestLargeFileInWindow(t *testing.T) {
	requireFUSE(t)
	p := filepath.Join(t.TempDir(), "window")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const size = 4<<30 + 8192 + 5
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	if err := w.AddExternal(&daxfs.Header{Path: "huge", Mode: daxfs.ModeRegular | 0o644, Size: size}, 0, 4096); err != nil {
		t.Fatal(err)
	}
	n, err := w.Layout()
	if err != nil {
		t.Fatal(err)
	}
	base := uint64(n+4095)&^4095 + 1<<30 // the "layer" starts 1 GiB after the image
	window := (base + 4096 + size + 4095) &^ 4095
	if err := w.SetExternalBases([]uint64{base}, window); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(window)); err != nil {
		t.Fatal(err)
	}
	marks := map[int64]string{0: "first", 4<<30 - 3: "straddles-4GiB", 4<<30 + 4096: "past-4GiB", size - 4: "end!"}
	for off, m := range marks {
		if _, err := f.WriteAt([]byte(m), int64(base)+4096+off); err != nil {
			t.Fatal(err)
		}
	}
	mnt := serveImage(t, p)
	hf, err := os.Open(filepath.Join(mnt, "huge"))
	if err != nil {
		t.Fatal(err)
	}
	defer hf.Close()
	st, _ := hf.Stat()
	if st.Size() != size {
		t.Errorf("size %d, want %d", st.Size(), size)
	}
	for off, m := range marks {
		buf := make([]byte, len(m))
		if _, err := hf.ReadAt(buf, off); err != nil || string(buf) != m {
			t.Errorf("ReadAt(%d) = %q, %v; want %q", off, buf, err, m)
		}
	}
	buf := make([]byte, 10)
	if k, _ := hf.ReadAt(buf, size-2); k != 2 {
		t.Errorf("read across the end returned %d bytes", k)
	}
}

// TestTruncatedSource: when the mapped source shrinks under a mount (a
// fault on the mapping, SIGBUS in user space), requests fail with EIO and
// the serving process lives on.
func TestTruncatedSource(t *testing.T) {
	requireFUSE(t)
	_, img := buildTree(t)
	cp := filepath.Join(t.TempDir(), "copy.daxfs")
	if err := mtest.CopyFile(img, cp); err != nil {
		t.Fatal(err)
	}
	mnt := serveImage(t, cp)
	if err := os.Truncate(cp, 4096); err != nil {
		t.Fatal(err)
	}
	// A lookup reads the inode table (a fault in Go code), a read makes
	// the kernel copy from the mapping (EFAULT in writev).
	if _, err := os.Lstat(filepath.Join(mnt, "sizes/f65537")); !errors.Is(err, unix.EIO) {
		t.Errorf("lookup on a truncated source: %v, want EIO", err)
	}
	if _, err := os.ReadFile(filepath.Join(mnt, "one")); !errors.Is(err, unix.EIO) {
		t.Errorf("read on a truncated source: %v, want EIO", err)
	}
	// This process (the server) is still alive and serving.
	if _, err := os.Stat(mnt); err != nil {
		t.Errorf("stat of the root after faults: %v", err)
	}
}

// abortConnection aborts the FUSE connection mounted on mnt through the
// fusectl file system.
func abortConnection(mnt string) {
	ms, _ := os.ReadFile("/proc/self/mountinfo")
	for line := range strings.SplitSeq(string(ms), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == mnt {
			_, minor, _ := strings.Cut(f[2], ":")
			if _, err := os.Stat("/sys/fs/fuse/connections/" + minor); err != nil {
				unix.Mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, "")
			}
			os.WriteFile("/sys/fs/fuse/connections/"+minor+"/abort", []byte("1"), 0o200)
		}
	}
}
