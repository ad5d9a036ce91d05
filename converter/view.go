package converter

import (
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// ViewPlan is the merged tree of a layer chain, laid out as a view image
// but not yet written. Size is known before the caller claims the region
// extent the view goes to; Write then writes it there once the layers'
// positions relative to it are known.
type ViewPlan struct {
	layers []*daxfs.Image
	w      *daxfs.Writer
	out    *deferredWriterAt
	size   int64
	nodes  int
	done   bool
}

// vnode is one node of the merged tree: the layer and inode providing it.
type vnode struct {
	layer    int
	ino      uint32
	mode     uint32
	children map[string]*vnode // directories only
}

// PlanView merges layers (bottom first, each a validated layer image) with
// the OCI rules: a ".wh.NAME" entry removes NAME of the layers below, a
// ".wh..wh..opq" entry hides everything the layers below hold in its
// directory, an entry replaces the lower one with the same name unless both
// are directories (then their contents merge, and the upper directory's
// attributes win unless the upper layer only made it as a missing parent,
// see ImplicitDirXattr), and no whiteout entry is left. Hard links within a layer
// stay links. The view holds metadata only: every regular file refers to
// its bytes in the layer image that provides it. Cost is proportional to
// the number of entries, not to file sizes.
func PlanView(layers []*daxfs.Image) (*ViewPlan, error) {
	if len(layers) == 0 {
		return nil, errors.New("view: no layers")
	}
	root := &vnode{layer: -1, ino: daxfs.RootIno, mode: daxfs.ModeDir, children: map[string]*vnode{}}
	for i, im := range layers {
		if im == nil {
			return nil, fmt.Errorf("view: layer %d: no image", i)
		}
		m := merger{im: im, layer: i, seen: make(map[uint32]bool)}
		in, err := im.Inode(daxfs.RootIno)
		if err != nil {
			return nil, fmt.Errorf("view: layer %d: root: %w", i, err)
		}
		if !in.IsDir() {
			return nil, fmt.Errorf("view: layer %d: root is not a directory", i)
		}
		root.layer, root.ino, root.mode = i, daxfs.RootIno, in.Mode
		if err := m.merge(root, daxfs.RootIno, ""); err != nil {
			return nil, fmt.Errorf("view: layer %d: %w", i, err)
		}
	}

	p := &ViewPlan{layers: layers, out: &deferredWriterAt{}}
	p.w = daxfs.NewWriter(p.out, daxfs.WriterOptions{})
	ew := emitter{p: p, links: make(map[linkKey]string)}
	if err := ew.emit(root, ""); err != nil {
		return nil, fmt.Errorf("view: %w", err)
	}
	size, err := p.w.Layout()
	if err != nil {
		return nil, fmt.Errorf("view: laying out: %w", err)
	}
	p.size = size
	return p, nil
}

// Size is the number of bytes the view image occupies (page aligned); the
// layers go after it.
func (p *ViewPlan) Size() int64 { return p.size }

// Entries is the number of names in the merged tree, root included.
func (p *ViewPlan) Entries() int { return p.nodes }

// Write writes the view image to out (from offset 0). layerBases[i] is the
// offset of layer i's first byte relative to the view's first byte (each at
// least Size() and page aligned), and windowSize the size of the window
// the view is mounted with, from its start to the end of the last layer.
// Write can be called once.
func (p *ViewPlan) Write(out io.WriterAt, layerBases []uint64, windowSize uint64) error {
	if p.done {
		return errors.New("view: already written")
	}
	p.done = true
	if len(layerBases) != len(p.layers) {
		return fmt.Errorf("view: %d layer bases for %d layers", len(layerBases), len(p.layers))
	}
	for i, b := range layerBases {
		if b < uint64(p.size) || b%daxfs.BlockSize != 0 {
			return fmt.Errorf("view: layer %d at %d: must be page aligned and after the view's %d bytes", i, b, p.size)
		}
		if b+uint64(len(p.layers[i].Bytes())) > windowSize {
			return fmt.Errorf("view: layer %d at %d (%d bytes) ends past the window of %d bytes", i, b, len(p.layers[i].Bytes()), windowSize)
		}
	}
	if err := p.w.SetExternalBases(layerBases, windowSize); err != nil {
		return fmt.Errorf("view: %w", err)
	}
	if err := p.out.setTarget(out); err != nil {
		return fmt.Errorf("view: %w", err)
	}
	if _, err := p.w.Close(); err != nil {
		return fmt.Errorf("view: writing: %w", err)
	}
	return nil
}

type merger struct {
	im    *daxfs.Image
	layer int
	seen  map[uint32]bool // directory inodes visited: guards against cycles
}

func (m *merger) merge(dst *vnode, dir uint32, path string) error {
	if m.seen[dir] {
		return fmt.Errorf("%q: directory inode %d reached twice", path, dir)
	}
	m.seen[dir] = true
	ents, err := m.im.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("%q: %w", path, err)
	}
	// Whiteouts and the opaque marker act on the layers below only, so
	// apply them before this layer's own entries.
	for _, e := range ents {
		if !strings.HasPrefix(e.Name, whiteoutPrefix) {
			continue
		}
		if e.Name == whiteoutOpaque {
			clear(dst.children)
			continue
		}
		if strings.HasPrefix(e.Name, whiteoutMeta) {
			continue // reserved names: nothing below can have them
		}
		delete(dst.children, e.Name[len(whiteoutPrefix):])
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name, whiteoutPrefix) {
			continue
		}
		in, err := m.im.Inode(e.Ino)
		if err != nil {
			return fmt.Errorf("%q: %w", joinPath(path, e.Name), err)
		}
		if in.IsDir() {
			c := dst.children[e.Name]
			if c == nil || c.children == nil {
				c = &vnode{children: map[string]*vnode{}}
				dst.children[e.Name] = c
				c.layer, c.ino, c.mode = m.layer, e.Ino, in.Mode
			} else if implicit, err := m.isImplicit(e.Ino); err != nil {
				return fmt.Errorf("%q: %w", joinPath(path, e.Name), err)
			} else if !implicit {
				c.layer, c.ino, c.mode = m.layer, e.Ino, in.Mode
			}
			if err := m.merge(c, e.Ino, joinPath(path, e.Name)); err != nil {
				return err
			}
			continue
		}
		dst.children[e.Name] = &vnode{layer: m.layer, ino: e.Ino, mode: in.Mode}
	}
	return nil
}

// isImplicit reports whether directory ino was made as a missing parent:
// then the directory below keeps its attributes.
func (m *merger) isImplicit(ino uint32) (bool, error) {
	xs, err := m.im.Xattrs(ino)
	if err != nil {
		return false, err
	}
	for _, x := range xs {
		if x.Name == ImplicitDirXattr {
			return true, nil
		}
	}
	return false, nil
}

type linkKey struct {
	layer int
	ino   uint32
}

type emitter struct {
	p     *ViewPlan
	links map[linkKey]string // first view path of each layer inode
}

// emit adds n at path and its subtree, depth first in name order (so the
// view is the same whatever order maps iterate in).
func (e *emitter) emit(n *vnode, path string) error {
	e.p.nodes++
	im := e.p.layers[n.layer]
	in, err := im.Inode(n.ino)
	if err != nil {
		return fmt.Errorf("%q: layer %d: %w", path, n.layer, err)
	}
	h := &daxfs.Header{Path: path, Mode: in.Mode, UID: in.UID, GID: in.GID}
	if ts, ok := im.ModTime(n.ino); ok && (ts.Sec != 0 || ts.Nsec != 0) {
		h.ModTime = time.Unix(ts.Sec, int64(ts.Nsec))
	}
	xs, err := im.Xattrs(n.ino)
	if err != nil {
		return fmt.Errorf("%q: layer %d: %w", path, n.layer, err)
	}
	for _, x := range xs {
		if x.Name == ImplicitDirXattr {
			continue
		}
		if h.Xattrs == nil {
			h.Xattrs = make(map[string][]byte, len(xs))
		}
		h.Xattrs[x.Name] = x.Value
	}
	if n.children != nil {
		if err := e.p.w.Add(h, nil); err != nil {
			return fmt.Errorf("%q: %w", path, err)
		}
		names := make([]string, 0, len(n.children))
		for name := range n.children {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, name := range names {
			if err := e.emit(n.children[name], joinPath(path, name)); err != nil {
				return err
			}
		}
		return nil
	}
	key := linkKey{n.layer, n.ino}
	if in.Nlink > 1 {
		if first, ok := e.links[key]; ok {
			if err := e.p.w.Link(path, first, nil); err != nil {
				return fmt.Errorf("%q: %w", path, err)
			}
			return nil
		}
		e.links[key] = path
	}
	switch in.Mode & daxfs.ModeTypeMask {
	case daxfs.ModeRegular:
		h.Size = int64(in.Size)
		off := uint64(0)
		if in.Size > 0 {
			off = in.DataOffset + daxfs.BaseOffset
		}
		err = e.p.w.AddExternal(h, n.layer, off)
	case daxfs.ModeSymlink:
		t, lerr := im.Readlink(n.ino)
		if lerr != nil {
			return fmt.Errorf("%q: layer %d: %w", path, n.layer, lerr)
		}
		h.Linkname = string(t)
		err = e.p.w.Add(h, nil)
	case daxfs.ModeChar, daxfs.ModeBlock:
		h.Rdev = im.Rdev(n.ino)
		err = e.p.w.Add(h, nil)
	default:
		err = e.p.w.Add(h, nil)
	}
	if err != nil {
		return fmt.Errorf("%q: %w", path, err)
	}
	return nil
}

// deferredWriterAt is the Writer's output before the view's destination is
// known: writes are kept (a view's Writer writes nothing before Close, but
// nothing here relies on that) and replayed when the target is set.
type deferredWriterAt struct {
	target  io.WriterAt
	pending []pendingWrite
}

type pendingWrite struct {
	off int64
	b   []byte
}

func (d *deferredWriterAt) WriteAt(p []byte, off int64) (int, error) {
	if d.target != nil {
		return d.target.WriteAt(p, off)
	}
	d.pending = append(d.pending, pendingWrite{off, append([]byte(nil), p...)})
	return len(p), nil
}

func (d *deferredWriterAt) setTarget(w io.WriterAt) error {
	d.target = w
	for _, pw := range d.pending {
		if _, err := w.WriteAt(pw.b, pw.off); err != nil {
			return err
		}
	}
	d.pending = nil
	return nil
}
