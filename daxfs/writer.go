package daxfs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"slices"
	"strings"
	"time"
	"unsafe"
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

// copyBufSize is the size of the Writer's one copy buffer; a multiple of
// BlockSize so that a file's zero padding usually goes out in the same
// WriteAt as its last bytes.
const copyBufSize = 256 << 10

// wnode is an inode under construction. It is kept small: a Debian rootfs
// has ~20k of them and some images 500k.
type wnode struct {
	mode, uid, gid uint32
	mtimeNsec      uint32
	mtimeSec       int64
	size           uint64
	data           uint64 // own file data (relative to base), external blob offset, or laid-out metadata offset
	ref            int32  // external blob for AddExternal files, else -1
	dir            int32  // index into Writer.dirs for directories, else -1
	extra          int32  // index into Writer.extras, else -1
	ino            uint32 // assigned by Layout; 0 = not reached
	nlink          uint32 // computed by Layout
	implicit       bool   // a directory made as a missing parent, attributes never given
}

// wextra holds the attributes few inodes have.
type wextra struct {
	target string
	rdev   uint64
	xattrs []Xattr
}

// wentry is one name: a directory entry under construction.
type wentry struct {
	name   string
	parent int32 // entry index of the parent directory; -1 for the root
	node   int32
	dead   bool // removed (or inside a removed subtree); skipped by Layout
}

// chunked is an append-only array in fixed-size chunks: growing it never
// copies (a 500k-entry image would otherwise copy and fault in its node
// array several times over).
type chunked[T any] struct {
	chunks [][]T
	n      int
}

const chunkBits = 10

func (c *chunked[T]) at(i int32) *T { return &c.chunks[i>>chunkBits][i&(1<<chunkBits-1)] }

func (c *chunked[T]) push(v T) int32 {
	if c.n>>chunkBits == len(c.chunks) {
		c.chunks = append(c.chunks, make([]T, 1<<chunkBits))
	}
	c.chunks[c.n>>chunkBits][c.n&(1<<chunkBits-1)] = v
	c.n++
	return int32(c.n - 1)
}

// arena copies names into shared chunks: one allocation per 64 KiB of
// names instead of one per name.
type arena struct{ cur []byte }

const arenaChunk = 64 << 10

func (a *arena) clone(s string) string {
	if s == "" {
		return ""
	}
	if len(s) > cap(a.cur)-len(a.cur) {
		if len(s) > arenaChunk/4 {
			return strings.Clone(s)
		}
		a.cur = make([]byte, 0, arenaChunk)
	}
	start := len(a.cur)
	a.cur = append(a.cur, s...)
	return unsafe.String(&a.cur[start], len(s))
}

type childKey struct {
	parent int32
	name   string
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

// layout is the result of Layout.
type layout struct {
	order     []int32 // nodes in inode order
	inodeOff  uint64
	extOff    uint64
	extSize   uint64
	xattrSize uint64
	end       uint64 // own base image size (page aligned)
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

// cleanPath returns p without leading "/" and "./", trailing "/", empty and
// "." components, and checks every component: ".." is ErrInvalidPath, a
// name over 255 bytes ErrNameTooLong, a NUL byte ErrInvalidPath. The root
// is "".
func cleanPath(p string) (string, error) {
	q := p
	for {
		if strings.HasPrefix(q, "/") {
			q = q[1:]
		} else if strings.HasPrefix(q, "./") {
			q = q[2:]
		} else {
			break
		}
	}
	for strings.HasSuffix(q, "/") {
		q = q[:len(q)-1]
	}
	if q == "." {
		q = ""
	}
	if strings.Contains(q, "//") || strings.Contains(q, "/./") || strings.HasSuffix(q, "/.") {
		parts := strings.Split(q, "/")
		keep := parts[:0]
		for _, c := range parts {
			if c != "" && c != "." {
				keep = append(keep, c)
			}
		}
		q = strings.Join(keep, "/")
	}
	for rest := q; rest != ""; {
		c := rest
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			c, rest = rest[:i], rest[i+1:]
		} else {
			rest = ""
		}
		switch {
		case c == "..":
			return "", fmt.Errorf("%w: %q: component \"..\"", ErrInvalidPath, p)
		case len(c) > MaxNameLen:
			return "", fmt.Errorf("%w: %q: component of %d bytes", ErrNameTooLong, p, len(c))
		case strings.IndexByte(c, 0) >= 0:
			return "", fmt.Errorf("%w: %q: NUL byte in name", ErrInvalidPath, p)
		}
	}
	return q, nil
}

func splitPath(p string) (dir, base string) {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i], p[i+1:]
	}
	return "", p
}

func (w *Writer) newNode(n wnode) (int32, error) {
	// Node indices are int32, below the format's own limit of 2^32-1.
	if w.nodes.n >= w.maxNodes {
		return -1, ErrTooManyNodes
	}
	return w.nodes.push(n), nil
}

func (w *Writer) isDirEnt(e int32) bool { return w.nodes.at(w.ents.at(e).node).dir >= 0 }

// dirFor resolves (creating missing directories) the directory dir and
// returns its entry index. full is the caller's path, for errors.
func (w *Writer) dirFor(dir, full string) (int32, error) {
	if dir == "" {
		return 0, nil
	}
	if w.lastDirEnt >= 0 && dir == w.lastDir {
		return w.lastDirEnt, nil
	}
	cur := int32(0)
	for rest, done := dir, 0; rest != ""; {
		c := rest
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			c, rest = rest[:i], rest[i+1:]
		} else {
			rest = ""
		}
		done += len(c) + 1
		e, ok := w.index[childKey{cur, c}]
		if !ok {
			n, err := w.newNode(wnode{mode: ModeDir | 0o755, ref: -1, dir: int32(len(w.dirs)), extra: -1, implicit: true})
			if err != nil {
				return -1, fmt.Errorf("daxfs: %s: %w", full, err)
			}
			w.dirs = append(w.dirs, nil)
			e = w.addEntry(cur, w.names.clone(c), n)
		} else if !w.isDirEnt(e) {
			return -1, fmt.Errorf("daxfs: %s: %w: %s is not a directory", full, ErrNotDir, dir[:done-1])
		}
		cur = e
	}
	w.lastDir, w.lastDirEnt = dir, cur
	return cur, nil
}

func (w *Writer) addEntry(parent int32, name string, node int32) int32 {
	e := w.ents.push(wentry{name: name, parent: parent, node: node})
	w.index[childKey{parent, name}] = e
	pd := w.nodes.at(w.ents.at(parent).node).dir
	w.dirs[pd] = append(w.dirs[pd], e)
	return e
}

// kill marks the subtree of directory node n dead and forgets its names.
func (w *Writer) killSubtree(n int32) {
	stack := []int32{n}
	for len(stack) > 0 {
		d := w.nodes.at(stack[len(stack)-1]).dir
		stack = stack[:len(stack)-1]
		for _, c := range w.dirs[d] {
			ce := w.ents.at(c)
			if ce.dead {
				continue
			}
			ce.dead = true
			delete(w.index, childKey{ce.parent, ce.name})
			if w.nodes.at(ce.node).dir >= 0 {
				stack = append(stack, ce.node)
			}
		}
		w.dirs[d] = nil
	}
	w.lastDirEnt = -1
}

// bind makes name in parent refer to node, replacing what was there.
func (w *Writer) bind(parent int32, name string, node int32) int32 {
	if e, ok := w.index[childKey{parent, name}]; ok {
		old := w.ents.at(e).node
		if old == node {
			return e
		}
		if w.nodes.at(old).dir >= 0 {
			w.killSubtree(old)
		}
		w.ents.at(e).node = node
		return e
	}
	return w.addEntry(parent, w.names.clone(name), node)
}

func checkType(mode uint32) bool {
	switch mode & ModeTypeMask {
	case ModeRegular, ModeDir, ModeSymlink, ModeChar, ModeBlock, ModeFIFO, ModeSocket:
		return true
	}
	return false
}

// attrs validates h's attributes into n (type bits excepted) and returns
// the extras it needs.
func (w *Writer) attrs(h *Header, n *wnode, ex *wextra) error {
	n.mode = n.mode&ModeTypeMask | h.Mode&ModePermMask
	n.uid, n.gid = h.UID, h.GID
	n.mtimeSec, n.mtimeNsec = 0, 0
	if !h.ModTime.IsZero() {
		n.mtimeSec, n.mtimeNsec = h.ModTime.Unix(), uint32(h.ModTime.Nanosecond())
	}
	if len(h.Xattrs) > 0 && !w.opts.NoExtension {
		xs := make([]Xattr, 0, len(h.Xattrs))
		for k, v := range h.Xattrs {
			switch {
			case k == "" || len(k) > MaxNameLen || strings.IndexByte(k, 0) >= 0:
				return fmt.Errorf("%w: xattr name %q", ErrInvalidHeader, k)
			case len(v) > MaxXattrValue:
				return fmt.Errorf("%w: xattr %s: value of %d bytes", ErrInvalidHeader, k, len(v))
			}
			xs = append(xs, Xattr{Name: k, Value: slices.Clone(v)})
		}
		slices.SortFunc(xs, func(a, b Xattr) int { return strings.Compare(a.Name, b.Name) })
		ex.xattrs = xs
	}
	return nil
}

func (w *Writer) setExtra(n *wnode, ex wextra) {
	if ex.target == "" && ex.rdev == 0 && ex.xattrs == nil {
		n.extra = -1
		return
	}
	if n.extra >= 0 {
		w.extras[n.extra] = ex
		return
	}
	w.extras = append(w.extras, ex)
	n.extra = int32(len(w.extras) - 1)
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

// copyData copies size bytes from r to the next page-aligned run of the
// data area, zero padding its last page (mapped pages are visible to user
// space whole), and returns the run's offset relative to the base.
func (w *Writer) copyData(path string, size int64, r io.Reader) (uint64, error) {
	if size == 0 {
		return 0, nil
	}
	if r == nil {
		return 0, fmt.Errorf("daxfs: %s: %w: no data reader for %d bytes", path, io.ErrUnexpectedEOF, size)
	}
	padded := alignUp(uint64(size), BlockSize)
	if padded < uint64(size) || w.pos+padded < w.pos || w.pos+padded > math.MaxInt64-BaseOffset {
		return 0, fmt.Errorf("daxfs: %s: %w: file of %d bytes", path, ErrNoSpace, size)
	}
	start := w.pos
	if win, ok := w.out.(*Window); ok && win.file == nil {
		return start, w.copyToWindow(win, path, size, padded, r)
	}
	if w.buf == nil {
		w.buf = make([]byte, copyBufSize)
	}
	off := int64(BaseOffset + start)
	var done int64
	for done < size {
		n := min(int64(len(w.buf)), size-done)
		k, err := io.ReadFull(r, w.buf[:n])
		done += int64(k)
		if err != nil {
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				return 0, fmt.Errorf("daxfs: %s: data ends after %d of %d bytes: %w", path, done, size, io.ErrUnexpectedEOF)
			}
			return 0, fmt.Errorf("daxfs: %s: reading data: %w", path, err)
		}
		wn := k
		if done == size {
			// Pad in the same write when the buffer has room.
			pad := int(padded - uint64(size))
			if k+pad <= len(w.buf) {
				clear(w.buf[k : k+pad])
				wn = k + pad
			}
		}
		if _, err := w.out.WriteAt(w.buf[:wn], off); err != nil {
			w.err = fmt.Errorf("daxfs: %s: writing data at %d: %w", path, off, err)
			return 0, w.err
		}
		off += int64(wn)
	}
	if end := int64(BaseOffset + start + padded); off < end {
		clear(w.buf[:end-off])
		if _, err := w.out.WriteAt(w.buf[:end-off], off); err != nil {
			w.err = fmt.Errorf("daxfs: %s: writing data at %d: %w", path, off, err)
			return 0, w.err
		}
	}
	w.pos += padded
	return start, nil
}

// copyToWindow reads a file straight into the Window's memory: no copy
// buffer, one copy per byte.
func (w *Writer) copyToWindow(win *Window, path string, size int64, padded uint64, r io.Reader) error {
	off := BaseOffset + w.pos
	if off > uint64(len(win.b)) || padded > uint64(len(win.b))-off {
		w.err = fmt.Errorf("daxfs: %s: writing data at %d: %w", path, off, ErrNoSpace)
		return w.err
	}
	if err := win.Ensure(int64(off + padded)); err != nil {
		w.err = fmt.Errorf("daxfs: %s: writing data at %d: %w", path, off, err)
		return w.err
	}
	dst := win.b[off : off+padded]
	k, err := io.ReadFull(r, dst[:size])
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("daxfs: %s: data ends after %d of %d bytes: %w", path, k, size, io.ErrUnexpectedEOF)
		}
		return fmt.Errorf("daxfs: %s: reading data: %w", path, err)
	}
	clear(dst[size:])
	w.pos += padded
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

// find returns the live entry at clean path p.
func (w *Writer) find(p string) (int32, error) {
	cur := int32(0)
	for rest := p; rest != ""; {
		c := rest
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			c, rest = rest[:i], rest[i+1:]
		} else {
			rest = ""
		}
		if !w.isDirEnt(cur) {
			return -1, ErrNotExist
		}
		e, ok := w.index[childKey{cur, c}]
		if !ok {
			return -1, ErrNotExist
		}
		cur = e
	}
	return cur, nil
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

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

// Layout freezes the tree and returns the final image size in bytes. It is
// optional; Close calls it. After Layout only SetExternalBases and Close may
// be called.
func (w *Writer) Layout() (int64, error) {
	if w.err != nil {
		return 0, w.err
	}
	if w.closed {
		return 0, errors.New("daxfs: writer is closed")
	}
	if w.laidOut {
		return int64(BaseOffset + w.lay.end), nil
	}
	order := make([]int32, 1, w.nodes.n)
	order[0] = 0
	w.nodes.at(0).ino = 1
	less := func(a, b int32) int { return strings.Compare(w.ents.at(a).name, w.ents.at(b).name) }
	for i := 0; i < len(order); i++ {
		dn := w.nodes.at(order[i])
		if dn.dir < 0 {
			continue
		}
		kids := w.dirs[dn.dir]
		live := kids[:0]
		for _, k := range kids {
			if !w.ents.at(k).dead {
				live = append(live, k)
			}
		}
		clear(kids[len(live):])
		slices.SortFunc(live, less)
		w.dirs[dn.dir] = live
		dn.nlink = 2
		for _, k := range live {
			cn := w.ents.at(k).node
			c := w.nodes.at(cn)
			if c.dir >= 0 {
				w.nodes.at(order[i]).nlink++
			} else {
				c.nlink++
			}
			if c.ino == 0 {
				if uint64(len(order)) >= MaxInodes {
					return 0, fmt.Errorf("daxfs: %w", ErrTooManyNodes)
				}
				order = append(order, cn)
				c.ino = uint32(len(order))
			}
		}
	}
	l := layout{order: order}
	l.inodeOff = w.pos
	cur := l.inodeOff + uint64(len(order))*InodeSize
	for _, n := range order {
		nd := w.nodes.at(n)
		if nd.dir < 0 {
			continue
		}
		cnt := uint64(len(w.dirs[nd.dir]))
		nd.size = cnt * DirentSize
		nd.data = 0
		if cnt > 0 {
			nd.data = cur
			cur += cnt * DirentStride
		}
	}
	for _, n := range order {
		nd := w.nodes.at(n)
		if nd.mode&ModeTypeMask == ModeSymlink {
			nd.data = cur
			cur += nd.size + 1
		}
	}
	if !w.opts.NoExtension {
		if w.opts.ImplicitDirXattr != "" {
			mark := []Xattr{{Name: w.opts.ImplicitDirXattr, Value: []byte("1")}}
			for _, n := range order {
				if nd := w.nodes.at(n); nd.implicit {
					// Made by dirFor with no extras: the mark is all.
					w.setExtra(nd, wextra{xattrs: mark})
				}
			}
		}
		cur = alignUp(cur, 8)
		l.extOff = cur
		for _, n := range order {
			if x := w.nodes.at(n).extra; x >= 0 {
				for _, xa := range w.extras[x].xattrs {
					l.xattrSize += xattrHdrSize + uint64(len(xa.Name)) + uint64(len(xa.Value))
				}
			}
		}
		l.extSize = extHeaderSize + uint64(len(order))*extRecordSize + l.xattrSize
		cur += l.extSize
	}
	l.end = alignUp(cur, BlockSize)
	if l.end > math.MaxInt64-BaseOffset {
		return 0, fmt.Errorf("daxfs: %w: image of %d bytes", ErrNoSpace, l.end)
	}
	w.lay = l
	w.laidOut = true
	w.index = nil // names are frozen: let the lookup map go before Close
	w.lastDir, w.lastDirEnt = "", -1
	return int64(BaseOffset + l.end), nil
}

// SetExternalBases gives, for each external ref, the offset of that blob's
// byte 0 relative to this image's byte 0 (so an external file's data_offset
// becomes bases[ref] + offset - BaseOffset), and the size of the whole window
// from this image's start to the end of the last blob: the image's
// total_size and base_size are written to cover it.
func (w *Writer) SetExternalBases(bases []uint64, windowSize uint64) error {
	if _, err := w.Layout(); err != nil {
		return err
	}
	own := BaseOffset + w.lay.end
	if windowSize < own {
		return fmt.Errorf("daxfs: window of %d bytes is smaller than the image (%d bytes)", windowSize, own)
	}
	if windowSize%BlockSize != 0 {
		return fmt.Errorf("daxfs: window size %d is not a multiple of %d", windowSize, BlockSize)
	}
	for _, n := range w.lay.order {
		nd := w.nodes.at(n)
		if nd.ref < 0 || nd.size == 0 {
			continue // empty files get data_offset 0 like our own
		}
		var ino = nd.ino
		if int(nd.ref) >= len(bases) {
			return fmt.Errorf("daxfs: inode %d: external ref %d has no base (%d given)", ino, nd.ref, len(bases))
		}
		abs := bases[nd.ref] + nd.data
		if abs < bases[nd.ref] || abs < BaseOffset || abs%BlockSize != 0 {
			return fmt.Errorf("daxfs: inode %d: external data at %d+%d is not page aligned past the superblock", ino, bases[nd.ref], nd.data)
		}
		if abs+nd.size < abs || abs+nd.size > windowSize {
			return fmt.Errorf("daxfs: inode %d: external data %d+%d ends past the window (%d bytes)", ino, abs, nd.size, windowSize)
		}
	}
	w.bases = slices.Clone(bases)
	w.window = windowSize
	w.basesSet = true
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

// seqWriter writes a run of bytes sequentially through a buffer.
type seqWriter struct {
	out io.WriterAt
	off int64
	buf []byte
	n   int
	err error
}

func (s *seqWriter) flush() {
	if s.err != nil || s.n == 0 {
		return
	}
	if _, err := s.out.WriteAt(s.buf[:s.n], s.off); err != nil {
		s.err = fmt.Errorf("daxfs: writing metadata at %d: %w", s.off, err)
	}
	s.off += int64(s.n)
	s.n = 0
}

// next returns a zeroed slice of n bytes (n <= len(buf)) to fill in.
func (s *seqWriter) next(n int) []byte {
	if s.n+n > len(s.buf) {
		s.flush()
	}
	b := s.buf[s.n : s.n+n]
	clear(b)
	s.n += n
	return b
}

func (s *seqWriter) write(p []byte) {
	for len(p) > 0 {
		if s.n == len(s.buf) {
			s.flush()
		}
		k := copy(s.buf[s.n:], p)
		s.n += k
		p = p[k:]
	}
}

func (s *seqWriter) zeros(n uint64) {
	for n > 0 {
		k := min(n, uint64(len(s.buf)))
		s.next(int(k))
		n -= k
	}
}

var le = binary.LittleEndian

func (w *Writer) writeMeta() error {
	l := &w.lay
	if w.buf == nil {
		w.buf = make([]byte, copyBufSize)
	}
	baseSize := l.end
	total := BaseOffset + l.end
	if w.basesSet {
		total = w.window
		baseSize = w.window - BaseOffset
	}

	// Metadata after the file data; the superblocks go last, so that an
	// image whose writing failed has no valid magic.
	s := &seqWriter{out: w.out, off: int64(BaseOffset + l.inodeOff), buf: w.buf}
	for i, n := range l.order {
		nd := w.nodes.at(n)
		r := s.next(InodeSize)
		le.PutUint32(r[0:], uint32(i+1))
		le.PutUint32(r[4:], nd.mode)
		le.PutUint32(r[8:], nd.uid)
		le.PutUint32(r[12:], nd.gid)
		le.PutUint64(r[16:], nd.size)
		data := nd.data
		if nd.ref >= 0 {
			data = 0
			if nd.size > 0 {
				data = w.bases[nd.ref] + nd.data - BaseOffset
			}
		}
		le.PutUint64(r[24:], data)
		le.PutUint32(r[32:], nd.nlink)
	}
	for _, n := range l.order {
		nd := w.nodes.at(n)
		if nd.dir < 0 {
			continue
		}
		for _, k := range w.dirs[nd.dir] {
			e := w.ents.at(k)
			c := w.nodes.at(e.node)
			r := s.next(DirentStride)
			le.PutUint32(r[0:], c.ino)
			le.PutUint32(r[4:], c.mode)
			le.PutUint16(r[8:], uint16(len(e.name)))
			copy(r[16:], e.name)
		}
	}
	pos := uint64(s.off-BaseOffset) + uint64(s.n)
	for _, n := range l.order {
		nd := w.nodes.at(n)
		if nd.mode&ModeTypeMask == ModeSymlink {
			s.write([]byte(w.extras[nd.extra].target))
			s.next(1)
			pos += nd.size + 1
		}
	}
	if !w.opts.NoExtension {
		s.zeros(l.extOff - pos)
		pos = l.extOff
		h := s.next(extHeaderSize)
		le.PutUint32(h[0:], ExtMagic)
		le.PutUint32(h[4:], ExtVersion)
		le.PutUint32(h[8:], uint32(len(l.order)))
		le.PutUint32(h[12:], extRecordSize)
		le.PutUint64(h[16:], extHeaderSize+uint64(len(l.order))*extRecordSize)
		le.PutUint64(h[24:], l.xattrSize)
		var xoff uint64
		for _, n := range l.order {
			nd := w.nodes.at(n)
			r := s.next(extRecordSize)
			le.PutUint64(r[0:], uint64(nd.mtimeSec))
			le.PutUint32(r[8:], nd.mtimeNsec)
			if nd.extra >= 0 {
				ex := &w.extras[nd.extra]
				le.PutUint32(r[12:], uint32(len(ex.xattrs)))
				le.PutUint64(r[16:], ex.rdev)
				if len(ex.xattrs) > 0 {
					le.PutUint64(r[24:], xoff)
				}
				for _, xa := range ex.xattrs {
					xoff += xattrHdrSize + uint64(len(xa.Name)) + uint64(len(xa.Value))
				}
			}
		}
		for _, n := range l.order {
			nd := w.nodes.at(n)
			if nd.extra < 0 {
				continue
			}
			for _, xa := range w.extras[nd.extra].xattrs {
				xh := s.next(xattrHdrSize)
				le.PutUint16(xh[0:], uint16(len(xa.Name)))
				le.PutUint32(xh[4:], uint32(len(xa.Value)))
				s.write([]byte(xa.Name))
				s.write(xa.Value)
			}
		}
		pos += l.extSize
	}
	s.zeros(l.end - pos)
	s.flush()

	// Superblocks.
	if s.err != nil {
		return s.err
	}
	s.off = 0
	sb := s.next(BlockSize)
	le.PutUint32(sb[0:], SuperMagic)
	le.PutUint32(sb[4:], Version)
	le.PutUint32(sb[12:], BlockSize)
	le.PutUint64(sb[16:], total)
	le.PutUint64(sb[24:], BaseOffset)
	le.PutUint64(sb[32:], baseSize)
	le.PutUint64(sb[64:], uint64(len(l.order))+1)
	bs := s.next(BlockSize)
	le.PutUint32(bs[0:], BaseMagic)
	le.PutUint32(bs[4:], Version)
	le.PutUint32(bs[12:], BlockSize)
	le.PutUint64(bs[16:], baseSize)
	le.PutUint64(bs[24:], l.inodeOff)
	le.PutUint32(bs[32:], uint32(len(l.order)))
	le.PutUint32(bs[36:], RootIno)
	le.PutUint64(bs[40:], BlockSize)
	le.PutUint32(bs[48:], ExtMagic)
	le.PutUint32(bs[52:], ExtVersion)
	le.PutUint32(bs[56:], ExtFlagSorted)
	le.PutUint64(bs[64:], l.extOff)
	le.PutUint64(bs[72:], l.extSize)
	s.flush()

	return s.err
}

// Window is an io.WriterAt and io.ReaderAt over a byte slice, such as an
// extent of the shared region. Writes past its end fail with ErrNoSpace and
// write nothing.
type Window struct {
	b []byte
	// file, when set, writes b's bytes at the same offsets through the
	// file b maps (pwrite) instead of storing to b.
	file io.WriterAt
	// reserve, when set, backs a range of b with memory before it is
	// written; ready is how much of b (a prefix) it has backed.
	reserve func(off, n int64) error
	ready   int64
}

// reserveChunk is how far ahead of the write position a reserving Window
// backs its memory, at most: large enough that reservations are rare,
// small enough that an image much smaller than its bound costs little.
// The step starts at 1 MiB and doubles with what is reserved, so a small
// image does not pay for 16 MiB of fresh pages (the first write to a new
// page is what costs, in virtual machines above all).
const reserveChunk = 16 << 20

// NewWindow returns a Window over b.
func NewWindow(b []byte) *Window { return &Window{b: b} }

// NewReservingWindow returns a Window over b that calls reserve(off, n) to
// back b[off:off+n] with memory before writing there, in growing prefixes
// of b. It lets a writer claim a generous bound of a region (the image's
// size is not known before it is written) and pay only for what it
// writes. An error from reserve fails the write that needed it.
func NewReservingWindow(b []byte, reserve func(off, n int64) error) *Window {
	return &Window{b: b, reserve: reserve}
}

// NewFileWindow returns a Window over b, a shared mapping of a file that
// f writes at the same offsets (a region claim's WriterAt): WriteAt goes
// through f, with no reservation, and so does the Writer's file data.
// Stores through Bytes still work (the file's page cache is the mapping)
// and still call reserve first through Ensure. f's errors wrap
// ErrBacking.
func NewFileWindow(b []byte, f io.WriterAt, reserve func(off, n int64) error) *Window {
	return &Window{b: b, file: f, reserve: reserve}
}

// Ensure backs b[:end] (clipped to the Window) with memory. Writes through
// WriteAt and the Writer do this themselves; code that fills Bytes()
// directly calls it first.
func (w *Window) Ensure(end int64) error {
	if w.reserve == nil || end <= w.ready {
		return nil
	}
	step := min(int64(reserveChunk), max(1<<20, w.ready))
	next := min(int64(len(w.b)), (end+step-1)/step*step)
	if next <= w.ready {
		return nil
	}
	if err := w.reserve(w.ready, next-w.ready); err != nil {
		return fmt.Errorf("%w: bytes [%d,%d) of the output: %w", ErrBacking, w.ready, next, err)
	}
	w.ready = next
	return nil
}

// WriteAt implements io.WriterAt.
func (w *Window) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(w.b)) || int64(len(p)) > int64(len(w.b))-off {
		return 0, ErrNoSpace
	}
	if w.file != nil {
		n, err := w.file.WriteAt(p, off)
		if err != nil {
			return n, fmt.Errorf("%w: bytes [%d,%d) of the output: %w", ErrBacking, off, off+int64(len(p)), err)
		}
		return n, nil
	}
	if err := w.Ensure(off + int64(len(p))); err != nil {
		return 0, err
	}
	return copy(w.b[off:], p), nil
}

// ReadAt implements io.ReaderAt.
func (w *Window) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(w.b)) {
		return 0, io.EOF
	}
	n := copy(p, w.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Bytes returns the slice the Window writes to.
func (w *Window) Bytes() []byte { return w.b }
