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
	// parent and name place a directory in the tree, for error messages:
	// paths are made only for those, never per entry (a path per entry
	// costs time quadratic in the tree's depth).
	parent *vnode
	name   string
}

// path is n's path in the merged tree, made on demand.
func (n *vnode) path() string {
	if n == nil || n.parent == nil {
		return ""
	}
	return joinPath(n.parent.path(), n.name)
}

// pathOf is the path of name in directory n.
func (n *vnode) pathOf(name string) string { return joinPath(n.path(), name) }

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
		if err := m.merge(root, daxfs.RootIno); err != nil {
			return nil, fmt.Errorf("view: layer %d: %w", i, err)
		}
	}

	p := &ViewPlan{layers: layers, out: &deferredWriterAt{}}
	p.w = daxfs.NewWriter(p.out, daxfs.WriterOptions{})
	ew := emitter{p: p, links: make(map[linkKey]daxfs.Node)}
	if err := ew.emit(root, nil, daxfs.Node{}, ""); err != nil {
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

func (m *merger) merge(dst *vnode, dir uint32) error {
	if m.seen[dir] {
		return fmt.Errorf("%q: directory inode %d reached twice", dst.path(), dir)
	}
	m.seen[dir] = true
	ents, err := m.im.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("%q: %w", dst.path(), err)
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
			return fmt.Errorf("%q: %w", dst.pathOf(e.Name), err)
		}
		if in.IsDir() {
			c := dst.children[e.Name]
			if c == nil || c.children == nil {
				c = &vnode{children: map[string]*vnode{}, parent: dst, name: e.Name}
				dst.children[e.Name] = c
				c.layer, c.ino, c.mode = m.layer, e.Ino, in.Mode
			} else if implicit, err := m.isImplicit(e.Ino); err != nil {
				return fmt.Errorf("%q: %w", dst.pathOf(e.Name), err)
			} else if !implicit {
				c.layer, c.ino, c.mode = m.layer, e.Ino, in.Mode
			}
			if err := m.merge(c, e.Ino); err != nil {
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
	links map[linkKey]daxfs.Node // first view entry of each layer inode
}

// emit adds n as name in directory parent, up in the merged tree (the
// root when name is "") and
// its subtree, depth first in name order (so the view is the same whatever
// order maps iterate in). Entries are added by directory and name: no path
// is resolved.
func (e *emitter) emit(n, up *vnode, parent daxfs.Node, name string) error {
	e.p.nodes++
	im := e.p.layers[n.layer]
	where := func() string {
		if name == "" {
			return "/"
		}
		return up.pathOf(name)
	}
	in, err := im.Inode(n.ino)
	if err != nil {
		return fmt.Errorf("%q: layer %d: %w", where(), n.layer, err)
	}
	h := &daxfs.Header{Mode: in.Mode, UID: in.UID, GID: in.GID}
	if ts, ok := im.ModTime(n.ino); ok && (ts.Sec != 0 || ts.Nsec != 0) {
		h.ModTime = time.Unix(ts.Sec, int64(ts.Nsec))
	}
	xs, err := im.Xattrs(n.ino)
	if err != nil {
		return fmt.Errorf("%q: layer %d: %w", where(), n.layer, err)
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
		dir := e.p.w.Root()
		if name == "" {
			err = e.p.w.Add(h, nil) // the root's attributes
		} else {
			dir, err = e.p.w.AddChild(parent, name, h, nil)
		}
		if err != nil {
			return fmt.Errorf("%q: %w", where(), err)
		}
		names := make([]string, 0, len(n.children))
		for name := range n.children {
			names = append(names, name)
		}
		sort.Strings(names)
		for _, cn := range names {
			if err := e.emit(n.children[cn], n, dir, cn); err != nil {
				return err
			}
		}
		return nil
	}
	key := linkKey{n.layer, n.ino}
	if in.Nlink > 1 {
		if first, ok := e.links[key]; ok {
			if err := e.p.w.LinkChild(parent, name, first); err != nil {
				return fmt.Errorf("%q: %w", where(), err)
			}
			return nil
		}
	}
	var added daxfs.Node
	switch in.Mode & daxfs.ModeTypeMask {
	case daxfs.ModeRegular:
		h.Size = int64(in.Size)
		off := uint64(0)
		if in.Size > 0 {
			off = in.DataOffset + daxfs.BaseOffset
		}
		added, err = e.p.w.AddExternalChild(parent, name, h, n.layer, off)
	case daxfs.ModeSymlink:
		t, lerr := im.Readlink(n.ino)
		if lerr != nil {
			return fmt.Errorf("%q: layer %d: %w", where(), n.layer, lerr)
		}
		h.Linkname = string(t)
		added, err = e.p.w.AddChild(parent, name, h, nil)
	case daxfs.ModeChar, daxfs.ModeBlock:
		h.Rdev = im.Rdev(n.ino)
		added, err = e.p.w.AddChild(parent, name, h, nil)
	default:
		added, err = e.p.w.AddChild(parent, name, h, nil)
	}
	if err != nil {
		return fmt.Errorf("%q: %w", where(), err)
	}
	if in.Nlink > 1 {
		e.links[key] = added
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
