package testimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// TarDir writes the tree under dir as a layer tar: names relative to dir
// without a leading "./" (dir itself is not an entry), entries in sorted
// depth-first order, numeric owners, nanosecond mtimes, hard links as
// TypeLink to the first name seen, device nodes and FIFOs, and every
// extended attribute as a PAX SCHILY.xattr record. Sockets are skipped (tar
// cannot hold them). The output is deterministic for a given tree.
func TarDir(w io.Writer, dir string) error {
	tw := tar.NewWriter(w)
	type inode struct{ dev, ino uint64 }
	links := map[inode]string{}
	var walk func(rel string) error
	walk = func(rel string) error {
		full := filepath.Join(dir, rel)
		names, err := readDirNames(full)
		if err != nil {
			return err
		}
		for _, name := range names {
			relName := name
			if rel != "" {
				relName = rel + "/" + name
			}
			p := filepath.Join(full, name)
			var st unix.Stat_t
			if err := unix.Lstat(p, &st); err != nil {
				return fmt.Errorf("lstat %s: %w", p, err)
			}
			h := &tar.Header{
				Name:    relName,
				Mode:    int64(st.Mode & 0o7777),
				Uid:     int(st.Uid),
				Gid:     int(st.Gid),
				ModTime: timespecTime(st.Mtim),
				Format:  tar.FormatPAX,
			}
			xattrs, err := readXattrs(p)
			if err != nil {
				return err
			}
			if len(xattrs) > 0 {
				h.PAXRecords = map[string]string{}
				for k, v := range xattrs {
					h.PAXRecords["SCHILY.xattr."+k] = v
				}
			}
			var content string
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				h.Typeflag = tar.TypeDir
				h.Name += "/"
			case unix.S_IFREG:
				key := inode{uint64(st.Dev), st.Ino}
				if first, ok := links[key]; ok && st.Nlink > 1 {
					h.Typeflag = tar.TypeLink
					h.Linkname = first
				} else {
					if st.Nlink > 1 {
						links[key] = relName
					}
					h.Typeflag = tar.TypeReg
					h.Size = st.Size
					content = p
				}
			case unix.S_IFLNK:
				target, err := os.Readlink(p)
				if err != nil {
					return err
				}
				h.Typeflag = tar.TypeSymlink
				h.Linkname = target
			case unix.S_IFCHR, unix.S_IFBLK:
				h.Typeflag = tar.TypeChar
				if st.Mode&unix.S_IFMT == unix.S_IFBLK {
					h.Typeflag = tar.TypeBlock
				}
				h.Devmajor = int64(unix.Major(uint64(st.Rdev)))
				h.Devminor = int64(unix.Minor(uint64(st.Rdev)))
			case unix.S_IFIFO:
				h.Typeflag = tar.TypeFifo
			default:
				continue // sockets
			}
			if err := tw.WriteHeader(h); err != nil {
				return fmt.Errorf("tar %s: %w", relName, err)
			}
			if content != "" {
				if err := copyFile(tw, content, h.Size); err != nil {
					return err
				}
			}
			if h.Typeflag == tar.TypeDir {
				if err := walk(relName); err != nil {
					return err
				}
			}
		}
		return nil
	}
	if err := walk(""); err != nil {
		return err
	}
	return tw.Close()
}

// DirLayer returns an uncompressed layer holding the tree under dir (see
// TarDir), for trees small enough to hold in memory.
func DirLayer(dir string) (Layer, error) {
	var buf bytes.Buffer
	if err := TarDir(&buf, dir); err != nil {
		return Layer{}, err
	}
	return Layer{Raw: buf.Bytes()}, nil
}

func readDirNames(dir string) ([]string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	names, err := f.Readdirnames(-1)
	if err != nil {
		return nil, fmt.Errorf("reading directory %s: %w", dir, err)
	}
	sort.Strings(names)
	return names, nil
}

func copyFile(w io.Writer, path string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	n, err := io.Copy(w, io.LimitReader(f, size))
	if err != nil {
		return fmt.Errorf("copying %s: %w", path, err)
	}
	if n != size {
		return fmt.Errorf("copying %s: file shrank from %d to %d bytes while being read", path, size, n)
	}
	return nil
}

// readXattrs returns all extended attributes of path (not following
// symlinks) that the caller may read.
func readXattrs(path string) (map[string]string, error) {
	size, err := unix.Llistxattr(path, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EOPNOTSUPP) {
			return nil, nil
		}
		return nil, fmt.Errorf("listxattr %s: %w", path, err)
	}
	if size == 0 {
		return nil, nil
	}
	buf := make([]byte, size)
	size, err = unix.Llistxattr(path, buf)
	if err != nil {
		return nil, fmt.Errorf("listxattr %s: %w", path, err)
	}
	out := map[string]string{}
	for name := range strings.SplitSeq(string(buf[:size]), "\x00") {
		if name == "" {
			continue
		}
		vsize, err := unix.Lgetxattr(path, name, nil)
		if err != nil {
			if errors.Is(err, unix.ENODATA) {
				continue
			}
			return nil, fmt.Errorf("getxattr %s %s: %w", path, name, err)
		}
		val := make([]byte, vsize)
		if vsize > 0 {
			vsize, err = unix.Lgetxattr(path, name, val)
			if err != nil {
				return nil, fmt.Errorf("getxattr %s %s: %w", path, name, err)
			}
		}
		out[name] = string(val[:vsize])
	}
	return out, nil
}

func timespecTime(ts unix.Timespec) time.Time { return time.Unix(ts.Sec, ts.Nsec) }
