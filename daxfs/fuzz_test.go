package daxfs

import (
	"bytes"
	"errors"
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
			for i := 0; i < depth; i++ {
				parts = append(parts, fuzzNames[int(next())%len(fuzzNames)])
			}
			return strings.Join(parts, "/")
		}
		for len(prog) > 0 {
			c := next()
			p := path()
			mt := time.Unix(int64(c)*1000, int64(c))
			var err error
			switch c % 9 {
			case 0, 1:
				size := []int{0, 1, 4095, 4096, 4097, 9000}[int(next())%6]
				err = w.Add(&Header{Path: p, Mode: ModeRegular | uint32(c)<<4&0o7777, Size: int64(size), ModTime: mt}, bytes.NewReader(make([]byte, size)))
			case 2, 3:
				err = w.Add(&Header{Path: p, Mode: ModeDir | 0o755, UID: uint32(c), Xattrs: map[string][]byte{"user.x": {c}}}, nil)
			case 4:
				err = w.Add(&Header{Path: p, Mode: ModeSymlink | 0o777, Linkname: p}, nil)
			case 5:
				err = w.Link(p, path(), nil)
			case 6:
				err = w.Remove(p)
			case 7:
				err = w.Add(&Header{Path: p, Mode: []uint32{ModeChar, ModeBlock, ModeFIFO, ModeSocket}[c>>6] | 0o600, Rdev: uint64(c)}, nil)
			case 8:
				// A short read must leave the Writer consistent.
				err = w.Add(&Header{Path: p, Mode: ModeRegular | 0o644, Size: 10}, strings.NewReader("abc"))
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
		if _, err := im.Tree(); err != nil {
			t.Fatalf("Tree: %v", err)
		}
	})
}
