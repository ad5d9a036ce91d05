package daxfuse

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

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
	logger := log.New(os.Stderr, "daxfuse-test: ", 0)
	c, err := NewConn(fd, NewFS(im, 0, logger), init, logger)
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

	t.Run("tree", func(t *testing.T) {
		want, err := testenv.Snapshot(src)
		if err != nil {
			t.Fatal(err)
		}
		got, err := testenv.Snapshot(mnt)
		if err != nil {
			t.Fatal(err)
		}
		if d := testenv.Diff(want, got); len(d) > 0 {
			t.Errorf("mounted tree differs from the source:\n%s", strings.Join(d, "\n"))
		}
	})

	t.Run("stat", func(t *testing.T) {
		// Fields Snapshot does not cover: st_blocks, st_blksize, st_ino
		// stability, and that readdir's d_ino and d_type agree with stat.
		err := filepath.WalkDir(mnt, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(mnt, p)
			var a, b, s unix.Stat_t
			if err := unix.Lstat(p, &a); err != nil {
				return err
			}
			if err := unix.Lstat(filepath.Join(src, rel), &s); err != nil {
				return err
			}
			// Allocated 512-byte blocks of the data, as a local file
			// system reports for a file that is not sparse (the
			// source's count can include an xattr block).
			if want := (a.Size + 4095) / 4096 * 8; a.Mode&unix.S_IFMT == unix.S_IFREG && a.Blocks != want {
				t.Errorf("%s: st_blocks %d, want %d (source %d)", rel, a.Blocks, want, s.Blocks)
			}
			if typ := a.Mode & unix.S_IFMT; (typ == unix.S_IFREG || typ == unix.S_IFDIR) && a.Blksize != 4096 {
				t.Errorf("%s: st_blksize %d", rel, a.Blksize)
			}
			if err := unix.Lstat(p, &b); err != nil {
				return err
			}
			if a.Ino != b.Ino || a.Ino == 0 {
				t.Errorf("%s: unstable inode number %d then %d", rel, a.Ino, b.Ino)
			}
			if rel != "." {
				if got, want := d.Type(), fs.FileMode(0); got.Type() != modeType(a.Mode) {
					_ = want
					t.Errorf("%s: d_type gives %v, stat gives %o", rel, got, a.Mode&unix.S_IFMT)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	})

	t.Run("readdir-dtype", func(t *testing.T) {
		// getdents directly, so DT_UNKNOWN would be seen (Go's ReadDir
		// falls back to lstat for it).
		for _, dir := range []string{"", "many", "links", "bin"} {
			f, err := os.Open(filepath.Join(mnt, dir))
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 4096)
			names := map[string]uint8{}
			for {
				n, err := unix.Getdents(int(f.Fd()), buf)
				if err != nil {
					t.Fatal(err)
				}
				if n == 0 {
					break
				}
				for off := 0; off < n; {
					reclen := int(buf[off+16]) | int(buf[off+17])<<8
					typ := buf[off+18]
					name := buf[off+19 : off+reclen]
					name = name[:bytes.IndexByte(name, 0)]
					names[string(name)] = typ
					off += reclen
				}
			}
			f.Close()
			ents, err := os.ReadDir(filepath.Join(src, dir))
			if err != nil {
				t.Fatal(err)
			}
			if len(names) != len(ents)+2 {
				t.Errorf("%s: %d entries (with . and ..), source has %d", dir, len(names), len(ents))
			}
			for _, e := range ents {
				var st unix.Stat_t
				unix.Lstat(filepath.Join(src, dir, e.Name()), &st)
				if want := uint8(st.Mode & unix.S_IFMT >> 12); names[e.Name()] != want {
					t.Errorf("%s/%s: d_type %d, want %d", dir, e.Name(), names[e.Name()], want)
				}
			}
		}
	})

	t.Run("read-offsets", func(t *testing.T) {
		for _, n := range []int{4095, 4096, 4097, 65537, 1<<20 + 3} {
			name := fmt.Sprintf("sizes/f%d", n)
			want, err := os.ReadFile(filepath.Join(src, name))
			if err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(filepath.Join(mnt, name))
			if err != nil {
				t.Fatal(err)
			}
			for _, off := range []int{0, 1, 511, 4095, 4096, 4097, n - 1, n, n + 100} {
				for _, size := range []int{1, 3, 4096, 8191, 200000} {
					buf := make([]byte, size)
					k, err := f.ReadAt(buf, int64(off))
					end := min(off+size, n)
					wantN := max(end-off, 0)
					if k != wantN || (err != nil && k == size) {
						t.Errorf("%s: ReadAt(%d, %d) = %d, %v; want %d", name, size, off, k, err, wantN)
						continue
					}
					if !bytes.Equal(buf[:k], want[min(off, n):end]) {
						t.Errorf("%s: ReadAt(%d, %d): wrong bytes", name, size, off)
					}
				}
			}
			f.Close()
		}
	})

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

	t.Run("xattrs", func(t *testing.T) {
		p := filepath.Join(mnt, "xattrs/file")
		buf := make([]byte, 4096)
		n, err := unix.Lgetxattr(p, "user.comment", buf)
		if err != nil || string(buf[:n]) != "hello" {
			t.Errorf("getxattr user.comment = %q, %v", buf[:n], err)
		}
		n, err = unix.Lgetxattr(p, "user.big", nil)
		if err != nil || n != 3000 {
			t.Errorf("getxattr size query = %d, %v", n, err)
		}
		if _, err := unix.Lgetxattr(p, "user.big", make([]byte, 10)); !errors.Is(err, unix.ERANGE) {
			t.Errorf("getxattr into a short buffer: %v, want ERANGE", err)
		}
		if _, err := unix.Lgetxattr(p, "user.none", buf); !errors.Is(err, unix.ENODATA) {
			t.Errorf("getxattr of a missing name: %v, want ENODATA", err)
		}
		n, err = unix.Llistxattr(p, buf)
		if err != nil {
			t.Fatal(err)
		}
		names := strings.Split(strings.TrimSuffix(string(buf[:n]), "\x00"), "\x00")
		sort.Strings(names)
		want := []string{"security.capability", "trusted.secret", "user.big", "user.comment", "user.empty"}
		if strings.Join(names, ",") != strings.Join(want, ",") {
			t.Errorf("listxattr = %q, want %q", names, want)
		}
		if n, err := unix.Llistxattr(filepath.Join(mnt, "one"), buf); err != nil || n != 0 {
			t.Errorf("listxattr of a file without attributes = %d, %v", n, err)
		}
	})

	t.Run("devices", func(t *testing.T) {
		// The mount is not nodev: a device node in the image works.
		f, err := os.Open(filepath.Join(mnt, "dev-null"))
		if err != nil {
			t.Fatalf("open a character device on the mount: %v", err)
		}
		n, err := f.Read(make([]byte, 10))
		f.Close()
		if n != 0 {
			t.Errorf("read /dev/null through the mount: %d, %v", n, err)
		}
	})

	t.Run("read-only", func(t *testing.T) {
		for _, try := range []func() error{
			func() error { return os.WriteFile(filepath.Join(mnt, "one"), []byte("y"), 0o644) },
			func() error { return os.Mkdir(filepath.Join(mnt, "newdir"), 0o755) },
			func() error { return os.Remove(filepath.Join(mnt, "one")) },
			func() error { return unix.Setxattr(filepath.Join(mnt, "one"), "user.x", []byte("1"), 0) },
		} {
			if err := try(); !errors.Is(err, unix.EROFS) {
				t.Errorf("mutation: %v, want EROFS", err)
			}
		}
	})

	t.Run("negative", func(t *testing.T) {
		for i := 0; i < 3; i++ {
			if _, err := os.Lstat(filepath.Join(mnt, "dir/absent")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("lookup of a missing name: %v", err)
			}
		}
		if _, err := os.Lstat(filepath.Join(mnt, "one/below")); !errors.Is(err, unix.ENOTDIR) {
			t.Errorf("lookup below a file: %v, want ENOTDIR", err)
		}
	})

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

func modeType(m uint32) fs.FileMode {
	switch m & unix.S_IFMT {
	case unix.S_IFDIR:
		return fs.ModeDir
	case unix.S_IFLNK:
		return fs.ModeSymlink
	case unix.S_IFCHR:
		return fs.ModeDevice | fs.ModeCharDevice
	case unix.S_IFBLK:
		return fs.ModeDevice
	case unix.S_IFIFO:
		return fs.ModeNamedPipe
	case unix.S_IFSOCK:
		return fs.ModeSocket
	}
	return 0
}

// expectedEntry is one record of the upstream fixture's expected.json.
type expectedEntry struct {
	Path    string   `json:"path"`
	Mode    string   `json:"mode"`
	Type    string   `json:"type"`
	UID     uint32   `json:"uid"`
	GID     uint32   `json:"gid"`
	Size    *int64   `json:"size"`
	SHA256  string   `json:"sha256"`
	Nlink   *uint64  `json:"nlink"`
	Target  string   `json:"target"`
	Entries []string `json:"entries"`
}

// TestUpstreamFixture serves the image made by the upstream tool and
// compares every path with the fixture's expected.json.
func TestUpstreamFixture(t *testing.T) {
	requireFUSE(t)
	// The project's shared material lies beside the repository, in a
	// developer's tree and in CI's clone alike.
	dir := filepath.Join(filepath.Dir(testenv.ModuleRoot()), "shared", "fixtures", "upstream-v5")
	b, err := os.ReadFile(filepath.Join(dir, "expected.json"))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	var want []expectedEntry
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
	mnt := serveImage(t, filepath.Join(dir, "static.daxfs"))
	seen := 0
	for _, e := range want {
		p := filepath.Join(mnt, e.Path)
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Errorf("%s: %v", e.Path, err)
			continue
		}
		seen++
		mode, _ := strconv.ParseUint(strings.TrimPrefix(e.Mode, "0o"), 8, 32)
		if uint64(st.Mode&0o7777) != mode || st.Uid != e.UID || st.Gid != e.GID {
			t.Errorf("%s: mode %o uid %d gid %d, want %s %d %d", e.Path, st.Mode&0o7777, st.Uid, st.Gid, e.Mode, e.UID, e.GID)
		}
		wantType := map[string]uint32{"dir": unix.S_IFDIR, "file": unix.S_IFREG, "symlink": unix.S_IFLNK}[e.Type]
		if st.Mode&unix.S_IFMT != wantType {
			t.Errorf("%s: type %o, want %s", e.Path, st.Mode&unix.S_IFMT, e.Type)
		}
		if e.Nlink != nil && uint64(st.Nlink) != *e.Nlink {
			t.Errorf("%s: nlink %d, want %d", e.Path, st.Nlink, *e.Nlink)
		}
		switch e.Type {
		case "file":
			data, err := os.ReadFile(p)
			if err != nil {
				t.Errorf("%s: %v", e.Path, err)
				continue
			}
			sum := sha256.Sum256(data)
			if hex.EncodeToString(sum[:]) != e.SHA256 || (e.Size != nil && int64(len(data)) != *e.Size) || st.Size != int64(len(data)) {
				t.Errorf("%s: %d bytes (stat %d) with sha256 %x, want %v %s", e.Path, len(data), st.Size, sum, e.Size, e.SHA256)
			}
		case "symlink":
			if got, err := os.Readlink(p); err != nil || got != e.Target {
				t.Errorf("%s: readlink %q, %v; want %q", e.Path, got, err, e.Target)
			}
		case "dir":
			ents, err := os.ReadDir(p)
			if err != nil {
				t.Errorf("%s: %v", e.Path, err)
				continue
			}
			var names []string
			for _, d := range ents {
				names = append(names, d.Name())
			}
			if strings.Join(names, "/") != strings.Join(e.Entries, "/") {
				t.Errorf("%s: entries %q, want %q", e.Path, names, e.Entries)
			}
		}
	}
	if seen != len(want) || seen == 0 {
		t.Errorf("checked %d of %d paths", seen, len(want))
	}
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
	for _, line := range strings.Split(string(ms), "\n") {
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
