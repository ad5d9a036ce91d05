package daxfs

// The Writer's tree under construction: nodes (inodes), entries (names)
// and the index from (parent, name) to entry, kept compact because an
// image may have half a million names.

import (
	"fmt"
	"strings"
	"unsafe"
)

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
