// Package mtest builds trees and DAXFS images for the mounter's tests.
package mtest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// ImageFromDir writes a DAXFS image of the tree at root to out (a file
// path): every file type, modes, owners, mtimes, device numbers, xattrs
// and hard links, as the converter would.
func ImageFromDir(root, out string) error {
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	defer f.Close()
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	type key struct{ dev, ino uint64 }
	links := map[key]string{}
	err = filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		rel = filepath.ToSlash(rel)
		if rel == "." {
			rel = ""
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return fmt.Errorf("lstat %s: %w", p, err)
		}
		h := &daxfs.Header{
			Path: rel, Mode: st.Mode, UID: st.Uid, GID: st.Gid,
			ModTime: time.Unix(st.Mtim.Sec, st.Mtim.Nsec),
		}
		xs, err := xattrs(p)
		if err != nil {
			return err
		}
		h.Xattrs = xs
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			k := key{st.Dev, st.Ino}
			if st.Nlink > 1 {
				if first, ok := links[k]; ok {
					return w.Link(rel, first, nil)
				}
				links[k] = rel
			}
			h.Size = st.Size
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			defer src.Close()
			return w.Add(h, src)
		case unix.S_IFLNK:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			h.Linkname = t
		case unix.S_IFCHR, unix.S_IFBLK:
			h.Rdev = st.Rdev
		}
		return w.Add(h, nil)
	})
	if err != nil {
		return err
	}
	_, err = w.Close()
	return err
}

func xattrs(p string) (map[string][]byte, error) {
	buf := make([]byte, 64<<10)
	n, err := unix.Llistxattr(p, buf)
	if errors.Is(err, unix.ENOTSUP) || n == 0 {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", p, err)
	}
	out := map[string][]byte{}
	for name := range strings.SplitSeq(string(buf[:n]), "\x00") {
		if name == "" {
			continue
		}
		v := make([]byte, 64<<10)
		m, err := unix.Lgetxattr(p, name, v)
		if err != nil {
			return nil, fmt.Errorf("getxattr %s %s: %w", p, name, err)
		}
		out[name] = v[:m]
	}
	return out, nil
}

// Busybox is where busybox-static installs its binary.
const Busybox = "/bin/busybox"

// WriteTree writes the conformance tree under root: every file type,
// sizes around page boundaries, odd modes and owners, setuid, long names,
// a directory of 300 entries, hard links, symlinks, devices, a FIFO, a
// socket node, xattrs in the user, trusted and security namespaces,
// nanosecond mtimes, and a copy of the static busybox binary.
func WriteTree(tb testing.TB, root string) {
	tb.Helper()
	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
	}
	rnd := rand.New(rand.NewSource(1))
	data := func(n int) []byte {
		b := make([]byte, n)
		rnd.Read(b)
		return b
	}
	file := func(rel string, mode os.FileMode, b []byte) string {
		p := filepath.Join(root, rel)
		must(os.MkdirAll(filepath.Dir(p), 0o755))
		must(os.WriteFile(p, b, 0o600))
		must(os.Chmod(p, mode))
		return p
	}
	must(os.MkdirAll(root, 0o755))
	file("empty", 0o644, nil)
	file("one", 0o644, []byte("x"))
	for _, n := range []int{4095, 4096, 4097, 65537, 1<<20 + 3} {
		file(fmt.Sprintf("sizes/f%d", n), 0o644, data(n))
	}
	p := file("suid", 0o4755, []byte("#!/bin/sh\n"))
	p2 := file("owned", 0o640, []byte("owned\n"))
	must(os.Lchown(p2, 1234, 5678))
	_ = p
	file("dir/sub/deep/file", 0o600, []byte("deep\n"))
	must(os.Chmod(filepath.Join(root, "dir/sub"), 0o1777))
	must(os.Chmod(filepath.Join(root, "dir"), 0o2750))
	must(os.MkdirAll(filepath.Join(root, "emptydir"), 0o700))
	file(strings.Repeat("n", 255), 0o644, []byte("long name\n"))
	for i := range 300 {
		file(fmt.Sprintf("many/entry-%03d", i), 0o644, []byte(fmt.Sprint(i)))
	}
	hl := file("links/hard1", 0o644, []byte("hard\n"))
	must(os.Link(hl, filepath.Join(root, "links/hard2")))
	must(os.Link(hl, filepath.Join(root, "links/hard3")))
	must(os.Symlink("hard1", filepath.Join(root, "links/sym")))
	must(os.Symlink("/"+strings.Repeat("long/", 200)+"target", filepath.Join(root, "links/longsym")))
	must(os.Symlink("../dangling", filepath.Join(root, "links/dangling")))
	must(unix.Mknod(filepath.Join(root, "dev-null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Mknod(filepath.Join(root, "dev-big"), unix.S_IFCHR|0o600, int(unix.Mkdev(511, 300000))))
	must(unix.Mknod(filepath.Join(root, "dev-block"), unix.S_IFBLK|0o660, int(unix.Mkdev(7, 0))))
	must(unix.Mknod(filepath.Join(root, "fifo"), unix.S_IFIFO|0o644, 0))
	must(unix.Mknod(filepath.Join(root, "socket"), unix.S_IFSOCK|0o755, 0))
	xf := file("xattrs/file", 0o644, []byte("attrs\n"))
	must(unix.Lsetxattr(xf, "user.comment", []byte("hello"), 0))
	must(unix.Lsetxattr(xf, "user.empty", nil, 0))
	must(unix.Lsetxattr(xf, "user.big", bytes.Repeat([]byte("v"), 3000), 0))
	must(unix.Lsetxattr(xf, "trusted.secret", []byte{0, 1, 2, 255}, 0))
	// security.capability: cap_net_bind_service+ep (VFS_CAP_REVISION_2).
	capv := []byte{0, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	must(unix.Lsetxattr(xf, "security.capability", capv, 0))
	must(unix.Lsetxattr(filepath.Join(root, "xattrs"), "user.dir", []byte("d"), 0))

	bb, err := os.ReadFile(Busybox)
	if err != nil {
		tb.Fatalf("busybox-static is needed (%v)", err)
	}
	file("bin/busybox", 0o755, bb)
	must(os.Symlink("busybox", filepath.Join(root, "bin/sh")))
	must(os.Symlink("busybox", filepath.Join(root, "bin/cat")))

	// Nanosecond mtimes, set last (children first so parents keep theirs).
	t0 := time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)
	i := 0
	var paths []string
	filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			paths = append(paths, p)
		}
		return nil
	})
	for _, path := range slices.Backward(paths) {
		ts := []unix.Timespec{unix.NsecToTimespec(t0.Add(time.Duration(i) * 1001 * time.Millisecond).UnixNano()), unix.NsecToTimespec(t0.Add(time.Duration(i) * 1001 * time.Millisecond).UnixNano())}
		i++
		must(unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW))
	}
}

// CopyFile copies src to dst.
func CopyFile(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
