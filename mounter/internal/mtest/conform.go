package mtest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// Conformance checks that mnt, a read-only mount of an image of the tree
// WriteTree wrote at src, shows that tree: every path's type, mode, owner,
// size, content, link, nlink, mtime, rdev and xattrs; st_blocks,
// st_blksize, stable inode numbers, readdir's d_type; reads at odd offsets;
// getxattr and listxattr semantics; device nodes; read-only errors and
// negative lookups. Each check is a subtest. What depends on the mount
// (statfs, mmap, exec) is left to the caller.
func Conformance(t *testing.T, src, mnt string) {
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
			if rel != "." && d.Type() != modeType(a.Mode) {
				t.Errorf("%s: d_type gives %v, stat gives %o", rel, d.Type(), a.Mode&unix.S_IFMT)
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
					// linux_dirent64: ino, off, reclen (u16 @16), type
					// (@18), NUL-terminated name (@19).
					rec := buf[off:n]
					if len(rec) < 20 {
						t.Fatalf("getdents: record at %d of %d bytes", off, n)
					}
					reclen := int(binary.LittleEndian.Uint16(rec[16:18]))
					if reclen < 20 || reclen > len(rec) {
						t.Fatalf("getdents: record length %d at %d of %d bytes", reclen, off, n)
					}
					rec = rec[:reclen]
					typ := rec[18]
					name := rec[19:]
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
		for range 3 {
			if _, err := os.Lstat(filepath.Join(mnt, "dir/absent")); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("lookup of a missing name: %v", err)
			}
		}
		if _, err := os.Lstat(filepath.Join(mnt, "one/below")); !errors.Is(err, unix.ENOTDIR) {
			t.Errorf("lookup below a file: %v, want ENOTDIR", err)
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

// FixtureDir is where the upstream tool's image of tree.tar and its
// expected tree lie: the project's shared material is beside the
// repository, in a developer's tree and in CI's clone alike.
func FixtureDir() string {
	return filepath.Join(filepath.Dir(testenv.ModuleRoot()), "shared", "fixtures", "upstream-v5")
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

// UpstreamFixture compares every path of mnt, a mount of the fixture's
// static.daxfs, with the fixture's expected.json.
func UpstreamFixture(t *testing.T, mnt string) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(FixtureDir(), "expected.json"))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	var want []expectedEntry
	if err := json.Unmarshal(b, &want); err != nil {
		t.Fatal(err)
	}
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
