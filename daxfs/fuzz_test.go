package daxfs

import (
	"bytes"
	"errors"
	"maps"
	"strings"
	"testing"
	"time"
)

func FuzzValidate(f *testing.F) {
	f.Add(readFixture(f, "static.daxfs"))
	f.Add(goodImage(f))
	f.Add(buildImage(f, WriterOptions{NoExtension: true}, func(w *Writer) {}))
	_, ops := genTree(3, 40)
	f.Add(buildImage(f, WriterOptions{}, func(w *Writer) { applyOps(f, w, ops) }))
	f.Fuzz(func(t *testing.T, b []byte) {
		err := Validate(b)
		if err == nil {
			im, err := Open(b)
			if err != nil {
				t.Fatalf("Validate passed but Open failed: %v", err)
			}
			if _, err := im.Tree(); err != nil {
				t.Fatalf("Validate passed but Tree failed: %v", err)
			}
		} else if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("Validate error %v does not wrap ErrCorrupt", err)
		}
		exercise(b)
	})
}

// fuzzNames are the path components FuzzWriter builds paths from.
var fuzzNames = []string{"a", "b", "c", "d.d", "ü", strings.Repeat("n", 255), ".wh.a", "..", "x\x00", strings.Repeat("m", 256)}

// fsModel is FuzzWriter's model of tar-extraction semantics: clean path
// ("" is the root) to TypeName.
type fsModel map[string]string

func validPath(p string) bool {
	for c := range strings.SplitSeq(p, "/") {
		if c == ".." || strings.IndexByte(c, 0) >= 0 || len(c) > MaxNameLen {
			return false
		}
	}
	return true
}

// blocked reports whether a proper ancestor of p is not a directory.
func (m fsModel) blocked(p string) bool {
	for i := 0; i < len(p); i++ {
		if p[i] == '/' {
			k, ok := m[p[:i]]
			if !ok {
				return false
			}
			if k != "dir" {
				return true
			}
		}
	}
	return false
}

func (m fsModel) ensureParents(p string) {
	for i := 0; i < len(p); i++ {
		if p[i] == '/' {
			if _, ok := m[p[:i]]; !ok {
				m[p[:i]] = "dir"
			}
		}
	}
}

func (m fsModel) drop(p string) {
	for k := range m {
		if k == p || strings.HasPrefix(k, p+"/") {
			delete(m, k)
		}
	}
}

// add applies an Add of kind at p and reports whether it should succeed.
func (m fsModel) add(p, kind string, shortRead bool) bool {
	if !validPath(p) || m.blocked(p) {
		return false
	}
	m.ensureParents(p)
	if shortRead {
		return false
	}
	if kind == "dir" && m[p] == "dir" {
		return true
	}
	m.drop(p)
	m[p] = kind
	return true
}

func (m fsModel) link(p, t string) bool {
	if !validPath(p) || !validPath(t) {
		return false
	}
	kind, ok := m[t]
	if !ok || kind == "dir" || m.blocked(p) {
		return false
	}
	m.ensureParents(p)
	if p != t {
		m.drop(p)
		m[p] = kind
	}
	return true
}

func (m fsModel) remove(p string) bool {
	if !validPath(p) {
		return false
	}
	if !m.blocked(p) {
		m.drop(p)
	}
	return true
}

func FuzzWriter(f *testing.F) {
	f.Add([]byte{0, 1, 2, 3, 4, 5, 6, 7, 8, 9})
	f.Add([]byte{0x10, 0x21, 0x32, 0x43, 0x54, 0x65, 0x76, 0x87, 0x98, 0xa9, 0xba, 0xcb})
	f.Add(bytes.Repeat([]byte{0x13, 0x07, 0x52, 0xf1}, 20))
	f.Fuzz(func(t *testing.T, prog []byte) {
		if len(prog) > 3000 {
			prog = prog[:3000]
		}
		var out memFile
		w := NewWriter(&out, WriterOptions{NoExtension: len(prog)%5 == 0})
		model := fsModel{}
		next := func() byte {
			if len(prog) == 0 {
				return 0
			}
			c := prog[0]
			prog = prog[1:]
			return c
		}
		path := func() string {
			c := next()
			depth := 1 + int(c>>6)
			var parts []string
			for range depth {
				parts = append(parts, fuzzNames[int(next())%len(fuzzNames)])
			}
			return strings.Join(parts, "/")
		}
		for len(prog) > 0 {
			c := next()
			p := path()
			mt := time.Unix(int64(c)*1000, int64(c))
			var err error
			var ok bool
			switch c % 9 {
			case 0, 1:
				size := []int{0, 1, 4095, 4096, 4097, 9000}[int(next())%6]
				err = w.Add(&Header{Path: p, Mode: ModeRegular | uint32(c)<<4&0o7777, Size: int64(size), ModTime: mt}, bytes.NewReader(make([]byte, size)))
				ok = model.add(p, "file", false)
			case 2, 3:
				err = w.Add(&Header{Path: p, Mode: ModeDir | 0o755, UID: uint32(c), Xattrs: map[string][]byte{"user.x": {c}}}, nil)
				ok = model.add(p, "dir", false)
			case 4:
				err = w.Add(&Header{Path: p, Mode: ModeSymlink | 0o777, Linkname: p}, nil)
				ok = model.add(p, "symlink", false)
			case 5:
				t := path()
				err = w.Link(p, t, nil)
				ok = model.link(p, t)
			case 6:
				err = w.Remove(p)
				ok = model.remove(p)
			case 7:
				mode := []uint32{ModeChar, ModeBlock, ModeFIFO, ModeSocket}[c>>6]
				err = w.Add(&Header{Path: p, Mode: mode | 0o600, Rdev: uint64(c)}, nil)
				ok = model.add(p, TypeName(mode), false)
			case 8:
				// A short read must leave the Writer consistent.
				err = w.Add(&Header{Path: p, Mode: ModeRegular | 0o644, Size: 10}, strings.NewReader("abc"))
				ok = model.add(p, "file", true)
			}
			if (err == nil) != ok {
				t.Fatalf("op %d on %q: error %v, model expected success=%v", c%9, p, err, ok)
			}
			if err != nil && !errors.Is(err, ErrInvalidPath) && !errors.Is(err, ErrNameTooLong) &&
				!errors.Is(err, ErrNotDir) && !errors.Is(err, ErrNotExist) && !errors.Is(err, ErrInvalidHeader) &&
				!strings.Contains(err.Error(), "data ends after") {
				t.Fatalf("op %d on %q: unexpected error %v", c%9, p, err)
			}
		}
		if _, err := w.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if err := Validate(out.b); err != nil {
			t.Fatalf("writer output does not validate: %v", err)
		}
		im, _ := Open(out.b)
		tree, err := im.Tree()
		if err != nil {
			t.Fatalf("Tree: %v", err)
		}
		got := fsModel{}
		for _, e := range tree {
			got[strings.TrimPrefix(e.Path, "/")] = e.Type
		}
		model[""] = "dir"
		if !maps.Equal(got, model) {
			t.Fatalf("image tree differs from the model:\n got  %v\n want %v", got, model)
		}
	})
}
