package converter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// DirOptions tune ConvertDir.
type DirOptions struct {
	// MaxSize bounds the image size in bytes; 0 means no bound.
	MaxSize int64
	// Limits bound entries and paths.
	Limits Limits
	// Writer is passed to daxfs.NewWriter.
	Writer daxfs.WriterOptions
}

// DirResult describes a converted directory.
type DirResult struct {
	Size    int64 // image bytes written to out
	Entries int
}

// ConvertDir writes the DAXFS layer image of dir, a directory that
// containerd's walking differ extracted into an overlay upper, to out.
// Overlay whiteouts (0/0 character devices) become ".wh.NAME" markers,
// opaque directories (trusted.overlay.opaque or user.overlay.opaque = "y")
// get a ".wh..wh..opq" marker, and overlay xattrs are not copied; the rest
// is copied verbatim: hard links (by device and inode), xattrs, mtimes,
// devices and FIFOs. Sockets are skipped, as tar cannot hold them.
//
// Entries are given to the Writer in the order a tar writer walking the
// OCI form of the tree would list them (depth first, each directory's
// entries sorted by their OCI name), so a layer converted from such a tar
// with ConvertLayer gives byte-identical bytes. The root directory's own
// attributes are not copied, as containerd ignores a tar's root entry.
func ConvertDir(ctx context.Context, dir string, out io.WriterAt, opts DirOptions) (DirResult, error) {
	fi, err := os.Lstat(dir)
	if err != nil {
		return DirResult{}, fmt.Errorf("converting directory: %w", err)
	}
	if !fi.IsDir() {
		return DirResult{}, fmt.Errorf("converting %s: not a directory", dir)
	}
	d := &dirConverter{
		ctx:   ctx,
		root:  dir,
		b:     newLayerBuilder(out, opts.Writer, opts.MaxSize, opts.Limits),
		links: make(map[devIno]string),
	}
	opaque, err := isOpaqueDir(dir)
	if err != nil {
		return DirResult{}, fmt.Errorf("converting %s: %w", dir, err)
	}
	if err := d.walk("", opaque); err != nil {
		return DirResult{}, fmt.Errorf("converting %s: %w", dir, err)
	}
	n, err := d.b.finish()
	if err != nil {
		return DirResult{}, fmt.Errorf("converting %s: %w", dir, err)
	}
	return DirResult{Size: n, Entries: d.b.entries}, nil
}

type devIno struct{ dev, ino uint64 }

type dirConverter struct {
	ctx   context.Context
	root  string
	b     *layerBuilder
	links map[devIno]string // first path of each multiply linked inode
}

// dirChild is one entry of a directory with the name it has in OCI form.
type dirChild struct {
	name    string // on disk
	oci     string // in the image: ".wh."+name for a whiteout
	st      unix.Stat_t
	opaque  bool // an opaque directory
	marker  bool // the synthesized ".wh..wh..opq"
	isWhite bool
}

func (d *dirConverter) walk(rel string, opaque bool) error {
	if err := d.ctx.Err(); err != nil {
		return err
	}
	full := d.root
	if rel != "" {
		full = d.root + "/" + rel
	}
	f, err := os.Open(full)
	if err != nil {
		return err
	}
	names, err := f.Readdirnames(-1)
	f.Close()
	if err != nil {
		return fmt.Errorf("%s: reading directory: %w", rel, err)
	}
	kids := make([]dirChild, 0, len(names)+1)
	if opaque {
		kids = append(kids, dirChild{oci: whiteoutOpaque, marker: true})
	}
	for _, name := range names {
		c := dirChild{name: name, oci: name}
		p := full + "/" + name
		if err := unix.Lstat(p, &c.st); err != nil {
			return fmt.Errorf("%s: %w", joinPath(rel, name), err)
		}
		switch c.st.Mode & unix.S_IFMT {
		case unix.S_IFCHR:
			if c.st.Rdev == 0 {
				c.isWhite = true
				c.oci = whiteoutPrefix + name
			}
		case unix.S_IFDIR:
			if c.opaque, err = isOpaqueDir(p); err != nil {
				return fmt.Errorf("%s: %w", joinPath(rel, name), err)
			}
		case unix.S_IFSOCK:
			log.G(d.ctx).Debugf("converting %s: socket %s skipped", d.root, joinPath(rel, name))
			continue
		}
		kids = append(kids, c)
	}
	sort.Slice(kids, func(i, j int) bool { return kids[i].oci < kids[j].oci })
	for i := range kids {
		c := &kids[i]
		p := joinPath(rel, c.oci)
		if i > 0 && kids[i-1].oci == c.oci {
			// e.g. both "x" (a 0/0 device) and ".wh.x" on disk
			return fmt.Errorf("%s: two entries with OCI name %q", rel, c.oci)
		}
		if c.marker || c.isWhite {
			if err := d.b.whiteout(p); err != nil {
				return err
			}
			continue
		}
		if err := d.add(rel, c, p); err != nil {
			return err
		}
	}
	return nil
}

func (d *dirConverter) add(rel string, c *dirChild, p string) error {
	full := d.root + "/" + p
	st := &c.st
	h := &daxfs.Header{
		Path:    p,
		Mode:    st.Mode & daxfs.ModePermMask,
		UID:     st.Uid,
		GID:     st.Gid,
		ModTime: boundTime(time.Unix(st.Mtim.Sec, st.Mtim.Nsec)),
	}
	xs, err := readXattrs(full)
	if err != nil {
		return fmt.Errorf("%s: %w", p, err)
	}
	h.Xattrs = xs
	typ := st.Mode & unix.S_IFMT
	if typ != unix.S_IFDIR && st.Nlink > 1 {
		key := devIno{uint64(st.Dev), st.Ino}
		if first, ok := d.links[key]; ok {
			return d.b.link(p, first, h)
		}
		d.links[key] = p
	}
	switch typ {
	case unix.S_IFREG:
		f, err := os.Open(full)
		if err != nil {
			return err
		}
		defer f.Close()
		h.Mode |= daxfs.ModeRegular
		h.Size = st.Size
		return d.b.add(h, f)
	case unix.S_IFDIR:
		h.Mode |= daxfs.ModeDir
		if err := d.b.add(h, nil); err != nil {
			return err
		}
		return d.walk(p, c.opaque)
	case unix.S_IFLNK:
		t, err := os.Readlink(full)
		if err != nil {
			return err
		}
		h.Mode = daxfs.ModeSymlink | 0o777
		h.Linkname = t
		return d.b.add(h, nil)
	case unix.S_IFCHR, unix.S_IFBLK:
		h.Mode |= typ
		h.Rdev = st.Rdev
		return d.b.add(h, nil)
	case unix.S_IFIFO:
		h.Mode |= daxfs.ModeFIFO
		return d.b.add(h, nil)
	}
	return fmt.Errorf("%s: unsupported file type %#o", p, typ)
}

// isOpaqueDir reports whether an overlay upper directory is opaque.
func isOpaqueDir(p string) (bool, error) {
	var buf [4]byte
	for _, name := range opaqueXattrs {
		n, err := unix.Lgetxattr(p, name, buf[:])
		switch {
		case err == nil:
			if n == 1 && buf[0] == 'y' {
				return true, nil
			}
		case errors.Is(err, unix.ENODATA), errors.Is(err, unix.ENOTSUP), errors.Is(err, unix.ERANGE):
		default:
			return false, fmt.Errorf("reading %s: %w", name, err)
		}
	}
	return false, nil
}

// readXattrs returns p's extended attributes except overlay's own.
func readXattrs(p string) (map[string][]byte, error) {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, fmt.Errorf("listing xattrs: %w", err)
	}
	if sz == 0 {
		return nil, nil
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(p, buf)
	if err != nil {
		return nil, fmt.Errorf("listing xattrs: %w", err)
	}
	var xs map[string][]byte
	for _, name := range splitNul(buf[:sz]) {
		if isOverlayXattr(name) {
			continue
		}
		vsz, err := unix.Lgetxattr(p, name, nil)
		if err != nil {
			if errors.Is(err, unix.ENODATA) {
				continue
			}
			return nil, fmt.Errorf("reading xattr %s: %w", name, err)
		}
		v := make([]byte, vsz)
		if vsz > 0 {
			if vsz, err = unix.Lgetxattr(p, name, v); err != nil {
				return nil, fmt.Errorf("reading xattr %s: %w", name, err)
			}
		}
		if xs == nil {
			xs = make(map[string][]byte)
		}
		xs[name] = v[:vsz]
	}
	return xs, nil
}

func splitNul(b []byte) []string {
	var out []string
	for len(b) > 0 {
		i := 0
		for i < len(b) && b[i] != 0 {
			i++
		}
		if i > 0 {
			out = append(out, string(b[:i]))
		}
		if i < len(b) {
			i++
		}
		b = b[i:]
	}
	return out
}
