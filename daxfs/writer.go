package daxfs

import (
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"time"
)

// Header describes one entry given to Writer.Add.
type Header struct {
	// Path is slash separated and relative to the image root; a leading
	// "/" or "./" is accepted and "" or "/" names the root. A component
	// ".." is an error (ErrInvalidPath), never resolved.
	Path     string
	Mode     uint32 // full st_mode: type bits | permission bits (incl. setuid/setgid/sticky)
	UID, GID uint32
	Size     int64     // regular files: exactly this many bytes are read from the data reader
	Linkname string    // symlinks: the target
	ModTime  time.Time // stored in the extension block; the zero time is stored as 0
	Rdev     uint64    // character and block devices, in Linux dev_t encoding (unix.Mkdev)
	Xattrs   map[string][]byte
}

// WriterOptions tune a Writer. The zero value is what mkfs uses.
type WriterOptions struct {
	// NoExtension omits the extension block (mtimes, xattrs, rdev): the
	// image then holds exactly what the kernel module understands.
	NoExtension bool
	// ImplicitDirXattr, when set, is an xattr (value "1") given to every
	// directory the Writer created as a missing parent and that no later
	// Add of a directory at its path gave attributes. Marking them here,
	// by node, costs nothing per path: a caller tracking them by path
	// would pay for every ancestor of every entry.
	ImplicitDirXattr string
}

// Writer builds a DAXFS image in one pass. Entries come in any order (tar
// order); later entries for a path replace earlier ones with the semantics
// of extracting a tar into a directory: a directory over a directory keeps
// the children and takes the new attributes, anything else replaces the
// node (and drops a replaced directory's subtree); parents that were never
// added are created as 0755 root-owned directories. Adding under an
// existing non-directory (a/b when a is a file or symlink) is an error
// (ErrNotDir) naming the path.
//
// File bytes are copied to the output as they arrive, page aligned, through
// one copy buffer; only metadata (names, attributes) is held in memory.
// Close writes the metadata and the superblocks. Output is deterministic for
// a given sequence of calls.
//
// Errors about one entry (bad name, bad header, short data) leave the
// Writer usable; an error writing the output is sticky. A Writer is not
// safe for concurrent use.
type Writer struct {
	out  io.WriterAt
	opts WriterOptions

	ents   chunked[wentry]
	nodes  chunked[wnode]
	dirs   [][]int32 // per directory inode: child entry indices
	extras []wextra
	index  map[childKey]int32
	names  arena

	buf []byte
	pos uint64 // next free data offset, relative to the base start
	err error  // sticky output error

	// The directory of the previous Add, to skip resolving it again:
	// tar streams list a directory's entries together.
	lastDir    string
	lastDirEnt int32

	maxNodes int // inode limit; a field so tests can lower it

	hasExternal bool
	laidOut     bool
	closed      bool
	lay         layout
	bases       []uint64
	window      uint64
	basesSet    bool
}

// NewWriter returns a Writer that writes the image to out starting at offset
// 0. out may be a file or a Window over a byte slice.
func NewWriter(out io.WriterAt, opts WriterOptions) *Writer {
	w := &Writer{
		out:        out,
		opts:       opts,
		index:      make(map[childKey]int32),
		pos:        BlockSize,
		lastDirEnt: -1,
		maxNodes:   math.MaxInt32 - 1,
	}
	w.nodes.push(wnode{mode: ModeDir | 0o755, ref: -1, dir: 0, extra: -1})
	w.dirs = append(w.dirs, nil)
	w.ents.push(wentry{parent: -1, node: 0})
	return w
}

// Names is the number of names added so far, the root included: entries,
// hard links and the directories made as missing parents, replaced ones
// included until Layout drops them.
func (w *Writer) Names() int { return w.ents.n }

func (w *Writer) usable() error {
	if w.err != nil {
		return w.err
	}
	if w.closed {
		return errors.New("daxfs: writer is closed")
	}
	if w.laidOut {
		return errors.New("daxfs: writer is laid out: no more entries")
	}
	return nil
}

// Add adds or replaces the entry h.Path. For a regular file, data must yield
// at least h.Size bytes; for other types data is ignored and may be nil.
func (w *Writer) Add(h *Header, data io.Reader) error {
	if err := w.usable(); err != nil {
		return err
	}
	_, err := w.add(h, data, -1, 0)
	return err
}

// AddExternal adds a regular file whose h.Size bytes are not copied but live
// outside this image's own data: at offset within external blob `ref`, whose
// position is given later by SetExternalBases. Views use it to point at file
// bytes inside layer images.
func (w *Writer) AddExternal(h *Header, ref int, offset uint64) error {
	if err := w.usable(); err != nil {
		return err
	}
	if h.Mode&ModeTypeMask != ModeRegular {
		return fmt.Errorf("daxfs: %s: %w: external data for a non-regular file", h.Path, ErrInvalidHeader)
	}
	if ref < 0 || ref > math.MaxInt32 {
		return fmt.Errorf("daxfs: %s: %w: external ref %d", h.Path, ErrInvalidHeader, ref)
	}
	_, err := w.add(h, nil, int32(ref), offset)
	return err
}

func (w *Writer) add(h *Header, data io.Reader, ref int32, extOff uint64) (int32, error) {
	p, err := cleanPath(h.Path)
	if err != nil {
		return -1, fmt.Errorf("daxfs: %w", err)
	}
	n, ex, err := w.prepare(h, p)
	if err != nil {
		return -1, err
	}
	if p == "" {
		if n.mode&ModeTypeMask != ModeDir {
			return -1, fmt.Errorf("daxfs: %q: %w: the root must be a directory", h.Path, ErrInvalidHeader)
		}
		root := w.nodes.at(0)
		if err := w.attrs(h, root, &ex); err != nil {
			return -1, err
		}
		w.setExtra(root, ex)
		return 0, nil
	}
	dir, base := splitPath(p)
	parent, err := w.dirFor(dir, p)
	if err != nil {
		return -1, err
	}
	return w.put(parent, base, p, n, ex, data, ref, extOff)
}

// prepare validates h's type and attributes into a new node and its
// extras; what names the entry in errors.
func (w *Writer) prepare(h *Header, what string) (wnode, wextra, error) {
	typ := h.Mode & ModeTypeMask
	n := wnode{mode: typ, ref: -1, dir: -1, extra: -1}
	var ex wextra
	if !checkType(h.Mode) {
		return n, ex, fmt.Errorf("daxfs: %s: %w: unknown file type in mode %#o", what, ErrInvalidHeader, h.Mode)
	}
	if err := w.attrs(h, &n, &ex); err != nil {
		return n, ex, fmt.Errorf("daxfs: %s: %w", what, err)
	}
	switch typ {
	case ModeRegular:
		if h.Size < 0 {
			return n, ex, fmt.Errorf("daxfs: %s: %w: negative size %d", what, ErrInvalidHeader, h.Size)
		}
		n.size = uint64(h.Size)
	case ModeSymlink:
		t := h.Linkname
		switch {
		case t == "":
			return n, ex, fmt.Errorf("daxfs: %s: %w: empty symlink target", what, ErrInvalidHeader)
		case len(t) > MaxSymlinkLen:
			return n, ex, fmt.Errorf("daxfs: %s: %w: symlink target of %d bytes", what, ErrInvalidHeader, len(t))
		case strings.IndexByte(t, 0) >= 0:
			return n, ex, fmt.Errorf("daxfs: %s: %w: NUL in symlink target", what, ErrInvalidHeader)
		}
		ex.target = w.names.clone(t)
		n.size = uint64(len(t))
	case ModeChar, ModeBlock:
		if !w.opts.NoExtension {
			ex.rdev = h.Rdev
		}
	}
	return n, ex, nil
}

// put binds node n (prepared) as base in directory entry parent and
// returns its entry; what names it in errors.
func (w *Writer) put(parent int32, base, what string, n wnode, ex wextra, data io.Reader, ref int32, extOff uint64) (int32, error) {
	typ := n.mode & ModeTypeMask
	// A directory over a directory keeps its children.
	if typ == ModeDir {
		if e, ok := w.index[childKey{parent, base}]; ok && w.isDirEnt(e) {
			old := w.nodes.at(w.ents.at(e).node)
			old.mode, old.uid, old.gid, old.mtimeSec, old.mtimeNsec = n.mode, n.uid, n.gid, n.mtimeSec, n.mtimeNsec
			old.implicit = false
			w.setExtra(old, ex)
			return e, nil
		}
		n.dir = int32(len(w.dirs))
	}
	if typ == ModeRegular {
		var err error
		if ref >= 0 {
			n.ref, n.data = ref, extOff
			w.hasExternal = true
		} else if n.data, err = w.copyData(what, int64(n.size), data); err != nil {
			return -1, err
		}
	}
	w.setExtra(&n, ex)
	id, err := w.newNode(n)
	if err != nil {
		return -1, fmt.Errorf("daxfs: %s: %w", what, err)
	}
	if typ == ModeDir {
		w.dirs = append(w.dirs, nil)
	}
	return w.bind(parent, base, id), nil
}

// Node is an entry of the image being written, to add entries under a
// directory by name: a caller walking a tree (a view) would otherwise
// have every ancestor of every entry resolved again, quadratic in depth.
type Node struct{ ent int32 }

// Root is the root directory.
func (w *Writer) Root() Node { return Node{0} }

// checkName checks one path component given to the *Child methods.
func checkName(name string) error {
	switch {
	case name == "" || name == "." || name == ".." || strings.IndexByte(name, '/') >= 0:
		return fmt.Errorf("%w: name %q", ErrInvalidPath, name)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: name of %d bytes", ErrNameTooLong, len(name))
	case strings.IndexByte(name, 0) >= 0:
		return fmt.Errorf("%w: NUL byte in name", ErrInvalidPath)
	}
	return nil
}

// child resolves directory dir for adding name under it.
func (w *Writer) child(dir Node, name string) (int32, error) {
	if err := w.usable(); err != nil {
		return -1, err
	}
	if err := checkName(name); err != nil {
		return -1, fmt.Errorf("daxfs: %w", err)
	}
	if dir.ent < 0 || int(dir.ent) >= w.ents.n || w.ents.at(dir.ent).dead || !w.isDirEnt(dir.ent) {
		return -1, fmt.Errorf("daxfs: %s: %w: not a live directory of this image", name, ErrNotDir)
	}
	return dir.ent, nil
}

// AddChild adds or replaces entry name in directory dir, as Add does for
// the path of dir joined with name (h.Path is ignored), and returns it.
func (w *Writer) AddChild(dir Node, name string, h *Header, data io.Reader) (Node, error) {
	parent, err := w.child(dir, name)
	if err != nil {
		return Node{-1}, err
	}
	n, ex, err := w.prepare(h, name)
	if err != nil {
		return Node{-1}, err
	}
	e, err := w.put(parent, name, name, n, ex, data, -1, 0)
	return Node{e}, err
}

// AddExternalChild is AddExternal by directory and name.
func (w *Writer) AddExternalChild(dir Node, name string, h *Header, ref int, offset uint64) (Node, error) {
	parent, err := w.child(dir, name)
	if err != nil {
		return Node{-1}, err
	}
	if h.Mode&ModeTypeMask != ModeRegular {
		return Node{-1}, fmt.Errorf("daxfs: %s: %w: external data for a non-regular file", name, ErrInvalidHeader)
	}
	if ref < 0 || ref > math.MaxInt32 {
		return Node{-1}, fmt.Errorf("daxfs: %s: %w: external ref %d", name, ErrInvalidHeader, ref)
	}
	n, ex, err := w.prepare(h, name)
	if err != nil {
		return Node{-1}, err
	}
	e, err := w.put(parent, name, name, n, ex, nil, int32(ref), offset)
	return Node{e}, err
}

// LinkChild adds name in directory dir as another name of target's inode
// (not a directory), as Link does without attributes.
func (w *Writer) LinkChild(dir Node, name string, target Node) error {
	parent, err := w.child(dir, name)
	if err != nil {
		return err
	}
	if target.ent < 0 || int(target.ent) >= w.ents.n || w.ents.at(target.ent).dead {
		return fmt.Errorf("daxfs: link %s: %w: target is not a live entry", name, ErrNotExist)
	}
	node := w.ents.at(target.ent).node
	if w.nodes.at(node).dir >= 0 {
		return fmt.Errorf("daxfs: link %s: %w: hard link to a directory", name, ErrInvalidHeader)
	}
	w.bind(parent, name, node)
	return nil
}

// Link makes path another name of the regular file (or symlink, device,
// FIFO) already at target, sharing its inode and data; nlink counts names.
// If h is not nil it sets the shared inode's attributes (a tar hard-link
// header does that); h.Path and the type bits of h.Mode are ignored.
func (w *Writer) Link(path, target string, h *Header) error {
	if err := w.usable(); err != nil {
		return err
	}
	p, err := cleanPath(path)
	if err != nil {
		return fmt.Errorf("daxfs: link: %w", err)
	}
	t, err := cleanPath(target)
	if err != nil {
		return fmt.Errorf("daxfs: link %s: target: %w", p, err)
	}
	te, err := w.find(t)
	if err != nil {
		return fmt.Errorf("daxfs: link %s to %s: %w", p, t, err)
	}
	node := w.ents.at(te).node
	if w.nodes.at(node).dir >= 0 {
		return fmt.Errorf("daxfs: link %s to %s: %w: hard link to a directory", p, t, ErrInvalidHeader)
	}
	if p == "" {
		return fmt.Errorf("daxfs: link %q to %s: %w: the root cannot be a link", path, t, ErrInvalidPath)
	}
	dir, base := splitPath(p)
	parent, err := w.dirFor(dir, p)
	if err != nil {
		return err
	}
	if h != nil {
		n := *w.nodes.at(node)
		ex := wextra{}
		if n.extra >= 0 {
			ex = w.extras[n.extra]
		}
		xs := ex.xattrs
		ex.xattrs = nil
		perm := n.mode & ModePermMask
		if err := w.attrs(h, &n, &ex); err != nil {
			return fmt.Errorf("daxfs: link %s: %w", p, err)
		}
		if n.mode&ModeTypeMask == ModeSymlink {
			// A symlink's permission bits cannot be changed (lchmod
			// does nothing on Linux): a hard link to one keeps them.
			n.mode = ModeSymlink | perm
		}
		if len(h.Xattrs) == 0 {
			ex.xattrs = xs
		}
		w.setExtra(&n, ex)
		*w.nodes.at(node) = n
	}
	w.bind(parent, base, node)
	return nil
}

// Remove deletes path and, for a directory, its subtree. Removing a path
// that does not exist is not an error.
func (w *Writer) Remove(path string) error {
	if err := w.usable(); err != nil {
		return err
	}
	p, err := cleanPath(path)
	if err != nil {
		return fmt.Errorf("daxfs: remove: %w", err)
	}
	if p == "" {
		return fmt.Errorf("daxfs: remove %q: %w: cannot remove the root", path, ErrInvalidPath)
	}
	e, err := w.find(p)
	if err != nil {
		return nil
	}
	en := w.ents.at(e)
	en.dead = true
	delete(w.index, childKey{en.parent, en.name})
	if w.nodes.at(en.node).dir >= 0 {
		w.killSubtree(en.node)
	}
	return nil
}

// Close writes the metadata and superblocks and returns the image size (not
// counting an external window). The Writer cannot be used afterwards.
func (w *Writer) Close() (int64, error) {
	size, err := w.Layout()
	if err != nil {
		return 0, err
	}
	if w.hasExternal && !w.basesSet {
		return 0, errors.New("daxfs: image has external files but SetExternalBases was not called")
	}
	w.closed = true
	err = w.writeMeta()
	// Drop the metadata: the Writer cannot be used again.
	w.ents, w.nodes, w.dirs, w.extras, w.names, w.buf, w.lay = chunked[wentry]{}, chunked[wnode]{}, nil, nil, arena{}, nil, layout{}
	if err != nil {
		w.err = err
		return 0, err
	}
	return size, nil
}
