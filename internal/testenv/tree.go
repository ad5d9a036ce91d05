package testenv

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// FileInfo is what Snapshot records about one path. Paths are keys of the
// map Snapshot returns: "/" for the root, "/a/b" below it.
type FileInfo struct {
	Type   string // "file", "dir", "symlink", "char", "block", "fifo", "socket"
	Mode   uint32 // permission bits plus setuid, setgid and sticky (07777)
	UID    uint32
	GID    uint32
	Size   int64  // regular files and symlinks; 0 for others (directory sizes are filesystem specific)
	SHA256 string // hex digest of a regular file's content
	Link   string // symlink target
	Nlink  uint64
	Xattrs map[string]string // every attribute root can read, all namespaces (trusted.*, security.*, user.*)
	Mtime  int64             // modification time, nanoseconds since the epoch
	Rdev   uint64            // device number of char and block devices
}

func (fi FileInfo) String() string {
	s := fmt.Sprintf("%s %04o %d:%d", fi.Type, fi.Mode, fi.UID, fi.GID)
	switch fi.Type {
	case "file":
		s += fmt.Sprintf(" size=%d sha256=%.12s", fi.Size, fi.SHA256)
	case "symlink":
		s += " -> " + fi.Link
	case "char", "block":
		s += fmt.Sprintf(" rdev=%d:%d", unix.Major(fi.Rdev), unix.Minor(fi.Rdev))
	}
	return s
}

// Snapshot walks the tree under root without following symlinks and
// records every path (see FileInfo). File contents are hashed, so it reads
// every byte: it is also a read test of a mounted filesystem. Errors name
// the path.
func Snapshot(root string) (map[string]FileInfo, error) { return snapshot(root, false) }

// SnapshotOneFS is Snapshot restricted to the file system mounted on root:
// mount points below it (per /proc/self/mountinfo: a container's /proc,
// /sys, /dev, bind-mounted files) and what is below them are left out. (Not
// by device number: overlayfs reports a lower file's own device when its
// layers are on different file systems.) A name its directory lists but
// lstat does not find (overlayfs lists a lower's whiteout-like entries in
// a directory it does not merge) is recorded with Type "vanished".
func SnapshotOneFS(root string) (map[string]FileInfo, error) { return snapshot(root, true) }

func snapshot(root string, oneFS bool) (map[string]FileInfo, error) {
	out := map[string]FileInfo{}
	skip := map[string]bool{}
	if oneFS {
		real, err := filepath.EvalSymlinks(root)
		if err != nil {
			return nil, err
		}
		real, err = filepath.Abs(real)
		if err != nil {
			return nil, err
		}
		ms, err := mountinfo.GetMounts(nil)
		if err != nil {
			return nil, err
		}
		for _, m := range ms {
			rel, err := filepath.Rel(real, m.Mountpoint)
			if err != nil || rel == "." || strings.HasPrefix(rel, "..") {
				continue
			}
			skip["/"+filepath.ToSlash(rel)] = true
		}
	}
	var walk func(rel string) error
	walk = func(rel string) error {
		full := filepath.Join(root, filepath.FromSlash(rel))
		if skip[rel] {
			return nil
		}
		if oneFS && rel != "/" {
			var st unix.Stat_t
			if err := unix.Lstat(full, &st); errors.Is(err, unix.ENOENT) {
				out[rel] = FileInfo{Type: "vanished"}
				return nil
			}
		}
		fi, err := statPath(full)
		if err != nil {
			return err
		}
		out[rel] = fi
		if fi.Type != "dir" {
			return nil
		}
		f, err := os.Open(full)
		if err != nil {
			return fmt.Errorf("opening directory %s: %w", full, err)
		}
		names, err := f.Readdirnames(-1)
		f.Close()
		if err != nil {
			return fmt.Errorf("reading directory %s: %w", full, err)
		}
		sort.Strings(names)
		for _, name := range names {
			child := rel + "/" + name
			if rel == "/" {
				child = "/" + name
			}
			if err := walk(child); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk("/"); err != nil {
		return nil, err
	}
	return out, nil
}

func statPath(p string) (FileInfo, error) {
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		return FileInfo{}, fmt.Errorf("lstat %s: %w", p, err)
	}
	fi := FileInfo{
		Mode:  st.Mode & 0o7777,
		UID:   st.Uid,
		GID:   st.Gid,
		Nlink: uint64(st.Nlink),
		Mtime: st.Mtim.Sec*1e9 + st.Mtim.Nsec,
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		fi.Type = "file"
		fi.Size = st.Size
		sum, err := hashFile(p)
		if err != nil {
			return FileInfo{}, err
		}
		fi.SHA256 = sum
	case unix.S_IFDIR:
		fi.Type = "dir"
	case unix.S_IFLNK:
		fi.Type = "symlink"
		target, err := os.Readlink(p)
		if err != nil {
			return FileInfo{}, fmt.Errorf("readlink %s: %w", p, err)
		}
		fi.Link = target
		fi.Size = st.Size
	case unix.S_IFCHR:
		fi.Type = "char"
		fi.Rdev = uint64(st.Rdev)
	case unix.S_IFBLK:
		fi.Type = "block"
		fi.Rdev = uint64(st.Rdev)
	case unix.S_IFIFO:
		fi.Type = "fifo"
	case unix.S_IFSOCK:
		fi.Type = "socket"
	default:
		fi.Type = fmt.Sprintf("mode%o", st.Mode&unix.S_IFMT)
	}
	xattrs, err := listXattrs(p)
	if err != nil {
		return FileInfo{}, err
	}
	fi.Xattrs = xattrs
	return fi, nil
}

func hashFile(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", fmt.Errorf("opening %s: %w", p, err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("reading %s: %w", p, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// listXattrs reads all extended attributes of p without following
// symlinks; nil when there are none or the filesystem has no xattrs.
func listXattrs(p string) (map[string]string, error) {
	buf := make([]byte, 4096)
	var size int
	for {
		n, err := unix.Llistxattr(p, buf)
		if errors.Is(err, unix.ERANGE) {
			buf = make([]byte, len(buf)*4)
			continue
		}
		if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("listxattr %s: %w", p, err)
		}
		size = n
		break
	}
	if size == 0 {
		return nil, nil
	}
	out := map[string]string{}
	for name := range strings.SplitSeq(string(buf[:size]), "\x00") {
		if name == "" {
			continue
		}
		val := make([]byte, 256)
		for {
			n, err := unix.Lgetxattr(p, name, val)
			if errors.Is(err, unix.ERANGE) {
				val = make([]byte, len(val)*16)
				continue
			}
			if errors.Is(err, unix.ENODATA) {
				break // removed meanwhile
			}
			if err != nil {
				return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
			}
			out[name] = string(val[:n])
			break
		}
	}
	return out, nil
}

// Field names a FileInfo field for Diff to ignore.
type Field uint

const (
	FieldType Field = 1 << iota
	FieldMode
	FieldOwner // UID and GID
	FieldSize
	FieldContent // SHA256
	FieldLink
	FieldNlink    // of every path
	FieldDirNlink // of directories only (filesystems count subdirectories differently)
	FieldXattrs
	FieldMtime    // of every path
	FieldDirMtime // of directories only
	FieldRdev
)

// Diff compares two snapshots and returns one readable line per
// difference, sorted by path: paths only in a or only in b, and each field
// that differs, e.g.
//
//	/etc/hosts: mode 0644 != 0600
//	/bin/ls: only in a (symlink 0777 0:0 -> busybox)
//
// Fields listed in ignore are not compared. An empty result means equal.
func Diff(a, b map[string]FileInfo, ignore ...Field) []string {
	var skip Field
	for _, f := range ignore {
		skip |= f
	}
	var out []string
	for p, fa := range a {
		fb, ok := b[p]
		if !ok {
			out = append(out, fmt.Sprintf("%s: only in a (%s)", p, fa))
			continue
		}
		out = append(out, diffInfo(p, fa, fb, skip)...)
	}
	for p, fb := range b {
		if _, ok := a[p]; !ok {
			out = append(out, fmt.Sprintf("%s: only in b (%s)", p, fb))
		}
	}
	sort.Strings(out)
	return out
}

func diffInfo(p string, a, b FileInfo, skip Field) []string {
	var out []string
	add := func(f Field, name string, va, vb any, format string) {
		if skip&f != 0 {
			return
		}
		if va != vb {
			out = append(out, fmt.Sprintf("%s: %s "+format+" != "+format, p, name, va, vb))
		}
	}
	isDir := a.Type == "dir" && b.Type == "dir"
	add(FieldType, "type", a.Type, b.Type, "%v")
	add(FieldMode, "mode", a.Mode, b.Mode, "%04o")
	add(FieldOwner, "uid", a.UID, b.UID, "%d")
	add(FieldOwner, "gid", a.GID, b.GID, "%d")
	add(FieldSize, "size", a.Size, b.Size, "%d")
	add(FieldContent, "sha256", a.SHA256, b.SHA256, "%s")
	add(FieldLink, "link", a.Link, b.Link, "%q")
	if !isDir || skip&FieldDirNlink == 0 {
		add(FieldNlink, "nlink", a.Nlink, b.Nlink, "%d")
	}
	if !isDir || skip&FieldDirMtime == 0 {
		add(FieldMtime, "mtime", a.Mtime, b.Mtime, "%d")
	}
	add(FieldRdev, "rdev", a.Rdev, b.Rdev, "%d")
	if skip&FieldXattrs == 0 {
		names := map[string]bool{}
		for k := range a.Xattrs {
			names[k] = true
		}
		for k := range b.Xattrs {
			names[k] = true
		}
		sorted := make([]string, 0, len(names))
		for k := range names {
			sorted = append(sorted, k)
		}
		slices.Sort(sorted)
		for _, k := range sorted {
			va, oka := a.Xattrs[k]
			vb, okb := b.Xattrs[k]
			switch {
			case !okb:
				out = append(out, fmt.Sprintf("%s: xattr %s only in a (%q)", p, k, va))
			case !oka:
				out = append(out, fmt.Sprintf("%s: xattr %s only in b (%q)", p, k, vb))
			case va != vb:
				out = append(out, fmt.Sprintf("%s: xattr %s %q != %q", p, k, va, vb))
			}
		}
	}
	return out
}
