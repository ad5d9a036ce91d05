package daxfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"testing/iotest"
	"time"
)

func file(path string, data string) (*Header, io.Reader) {
	return &Header{Path: path, Mode: ModeRegular | 0o644, Size: int64(len(data))}, strings.NewReader(data)
}

func TestWriterErrors(t *testing.T) {
	long := strings.Repeat("n", 256)
	tests := []struct {
		name    string
		prep    func(w *Writer) error // earlier calls, must succeed
		call    func(w *Writer) error
		want    error
		mention string // the error must name this path
	}{
		{"name over 255 bytes", nil, func(w *Writer) error { h, r := file("a/"+long, "x"); return w.Add(h, r) }, ErrNameTooLong, long},
		{"255-byte name is fine", nil, func(w *Writer) error { h, r := file("a/"+long[:255], "x"); return w.Add(h, r) }, nil, ""},
		{"dotdot component", nil, func(w *Writer) error { h, r := file("a/../etc/passwd", "x"); return w.Add(h, r) }, ErrInvalidPath, "a/../etc/passwd"},
		{"leading dotdot", nil, func(w *Writer) error { h, r := file("../x", "x"); return w.Add(h, r) }, ErrInvalidPath, "../x"},
		{"NUL in name", nil, func(w *Writer) error { h, r := file("a\x00b", "x"); return w.Add(h, r) }, ErrInvalidPath, "a\\x00b"},
		{"entry under a file", func(w *Writer) error { h, r := file("a", "x"); return w.Add(h, r) },
			func(w *Writer) error { h, r := file("a/b", "y"); return w.Add(h, r) }, ErrNotDir, "a/b"},
		{"entry under a symlink", func(w *Writer) error {
			return w.Add(&Header{Path: "d/l", Mode: ModeSymlink | 0o777, Linkname: "/etc"}, nil)
		}, func(w *Writer) error { h, r := file("d/l/x", "y"); return w.Add(h, r) }, ErrNotDir, "d/l/x"},
		{"short data", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "s/short", Mode: ModeRegular | 0o644, Size: 10}, strings.NewReader("abc"))
		}, io.ErrUnexpectedEOF, "s/short"},
		{"no data reader", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "nodata", Mode: ModeRegular | 0o644, Size: 10}, nil)
		}, io.ErrUnexpectedEOF, "nodata"},
		{"reader error", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "rerr", Mode: ModeRegular | 0o644, Size: 10}, iotest.ErrReader(errors.New("boom")))
		}, nil, "rerr"},
		{"negative size", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "neg", Mode: ModeRegular | 0o644, Size: -1}, nil)
		}, ErrInvalidHeader, "neg"},
		{"unknown type", nil, func(w *Writer) error { return w.Add(&Header{Path: "weird", Mode: 0o644}, nil) }, ErrInvalidHeader, "weird"},
		{"empty symlink", nil, func(w *Writer) error { return w.Add(&Header{Path: "l", Mode: ModeSymlink | 0o777}, nil) }, ErrInvalidHeader, "l"},
		{"symlink too long", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "ll", Mode: ModeSymlink | 0o777, Linkname: strings.Repeat("t", 4096)}, nil)
		}, ErrInvalidHeader, "ll"},
		{"root as a file", nil, func(w *Writer) error { h, r := file("/", "x"); return w.Add(h, r) }, ErrInvalidHeader, "/"},
		{"bad xattr name", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "x", Mode: ModeDir | 0o755, Xattrs: map[string][]byte{"": nil}}, nil)
		}, ErrInvalidHeader, "x"},
		{"xattr value too big", nil, func(w *Writer) error {
			return w.Add(&Header{Path: "x", Mode: ModeDir | 0o755, Xattrs: map[string][]byte{"user.a": make([]byte, MaxXattrValue+1)}}, nil)
		}, ErrInvalidHeader, "x"},
		{"link to missing target", nil, func(w *Writer) error { return w.Link("a", "missing", nil) }, ErrNotExist, "missing"},
		{"link to a directory", func(w *Writer) error { return w.Add(&Header{Path: "d", Mode: ModeDir | 0o755}, nil) },
			func(w *Writer) error { return w.Link("d2", "d", nil) }, ErrInvalidHeader, "d2"},
		{"link with dotdot", nil, func(w *Writer) error { return w.Link("../a", "b", nil) }, ErrInvalidPath, "../a"},
		{"external non-regular", nil, func(w *Writer) error {
			return w.AddExternal(&Header{Path: "e", Mode: ModeDir | 0o755}, 0, 0)
		}, ErrInvalidHeader, "e"},
		{"remove root", nil, func(w *Writer) error { return w.Remove("/") }, ErrInvalidPath, "/"},
	}
	for _, tc := range tests {
		for _, toWindow := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/window=%v", tc.name, toWindow), func(t *testing.T) {
				var f memFile
				var out io.WriterAt = &f
				win := NewWindow(make([]byte, 1<<20))
				if toWindow {
					out = win
				}
				w := NewWriter(out, WriterOptions{})
				if tc.prep != nil {
					if err := tc.prep(w); err != nil {
						t.Fatalf("prep: %v", err)
					}
				}
				err := tc.call(w)
				if tc.want == nil && tc.mention == "" {
					if err != nil {
						t.Fatalf("unexpected error: %v", err)
					}
				} else {
					if err == nil {
						t.Fatal("no error")
					}
					if tc.want != nil && !errors.Is(err, tc.want) {
						t.Fatalf("error %v is not %v", err, tc.want)
					}
					if !strings.Contains(err.Error(), tc.mention) {
						t.Fatalf("error %q does not name %q", err, tc.mention)
					}
				}
				// An entry error leaves the Writer usable and the image valid.
				h, r := file("after", "ok")
				if err := w.Add(h, r); err != nil {
					t.Fatalf("Add after the error: %v", err)
				}
				n, err := w.Close()
				if err != nil {
					t.Fatalf("Close: %v", err)
				}
				img := f.b
				if toWindow {
					img = win.Bytes()[:n]
				}
				if err := Validate(img); err != nil {
					t.Fatalf("Validate: %v", err)
				}
				im, _ := Open(img)
				if d, err := im.Data(mustLookup(t, im, "after").Ino); err != nil || string(d) != "ok" {
					t.Fatalf("after: %q %v", d, err)
				}
			})
		}
	}
}

func mustLookup(t testing.TB, im *Image, p string) Inode {
	t.Helper()
	in, err := im.LookupPath(p)
	if err != nil {
		t.Fatalf("LookupPath(%q): %v", p, err)
	}
	return in
}

func TestWriterUseAfterLayout(t *testing.T) {
	var f memFile
	w := NewWriter(&f, WriterOptions{})
	if _, err := w.Layout(); err != nil {
		t.Fatal(err)
	}
	h, r := file("x", "y")
	if err := w.Add(h, r); err == nil {
		t.Fatal("Add after Layout succeeded")
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Close(); err == nil {
		t.Fatal("second Close succeeded")
	}
	if err := Validate(f.b); err != nil {
		t.Fatal(err)
	}
}

func TestWriterEmptyImage(t *testing.T) {
	img := buildImage(t, WriterOptions{}, func(w *Writer) {})
	if err := Validate(img); err != nil {
		t.Fatal(err)
	}
	if len(img) != 3*BlockSize {
		t.Fatalf("empty image is %d bytes", len(img))
	}
	if got := string(treeOf(t, img, true)); !strings.Contains(got, `"entries": []`) {
		t.Fatalf("tree %s", got)
	}
}

// TestWriterReplace: later entries replace earlier ones like tar extraction.
func TestWriterReplace(t *testing.T) {
	type want struct {
		path, typ string
		data      string
		perm      uint32
		absent    bool
	}
	dir := func(p string, perm uint32) *Header { return &Header{Path: p, Mode: ModeDir | perm, UID: 7} }
	tests := []struct {
		name  string
		build func(t *testing.T, w *Writer)
		check []want
	}{
		{"file over file", func(t *testing.T, w *Writer) {
			add(t, w, "a", "one")
			add(t, w, "a", "two!")
		}, []want{{path: "/a", typ: "file", data: "two!", perm: 0o644}}},
		{"dir over dir keeps children and takes attributes", func(t *testing.T, w *Writer) {
			must(t, w.Add(dir("d", 0o700), nil))
			add(t, w, "d/f", "x")
			must(t, w.Add(dir("d", 0o750), nil))
		}, []want{{path: "/d", typ: "dir", perm: 0o750}, {path: "/d/f", typ: "file", data: "x", perm: 0o644}}},
		{"file over dir drops the subtree", func(t *testing.T, w *Writer) {
			add(t, w, "d/sub/f", "x")
			add(t, w, "d", "now a file")
		}, []want{{path: "/d", typ: "file", data: "now a file", perm: 0o644}, {path: "/d/sub", absent: true}}},
		{"dir over file", func(t *testing.T, w *Writer) {
			add(t, w, "d", "file")
			must(t, w.Add(dir("d", 0o711), nil))
			add(t, w, "d/g", "g")
		}, []want{{path: "/d", typ: "dir", perm: 0o711}, {path: "/d/g", typ: "file", data: "g", perm: 0o644}}},
		{"symlink over dir", func(t *testing.T, w *Writer) {
			add(t, w, "d/x", "x")
			must(t, w.Add(&Header{Path: "d", Mode: ModeSymlink | 0o777, Linkname: "elsewhere"}, nil))
		}, []want{{path: "/d", typ: "symlink", perm: 0o777}, {path: "/d/x", absent: true}}},
		{"replace one name of a hard link", func(t *testing.T, w *Writer) {
			add(t, w, "a", "shared")
			must(t, w.Link("b", "a", nil))
			add(t, w, "a", "new")
		}, []want{{path: "/a", typ: "file", data: "new", perm: 0o644}, {path: "/b", typ: "file", data: "shared", perm: 0o644}}},
		{"remove then re-add", func(t *testing.T, w *Writer) {
			add(t, w, "d/x", "x")
			must(t, w.Remove("d"))
			must(t, w.Remove("not/there"))
			add(t, w, "d/y", "y")
		}, []want{{path: "/d/x", absent: true}, {path: "/d/y", typ: "file", data: "y", perm: 0o644}, {path: "/d", typ: "dir", perm: 0o755}}},
		{"implicit parents", func(t *testing.T, w *Writer) {
			add(t, w, "/a/b/c/f", "f")
			add(t, w, "./a/b/./g", "g")
			add(t, w, "a//b/h/", "h")
		}, []want{{path: "/a/b", typ: "dir", perm: 0o755}, {path: "/a/b/g", typ: "file", data: "g", perm: 0o644}, {path: "/a/b/h", typ: "file", data: "h", perm: 0o644}}},
		{"root attributes", func(t *testing.T, w *Writer) {
			must(t, w.Add(dir("./", 0o700), nil))
		}, []want{{path: "/", typ: "dir", perm: 0o700}}},
		{"link sets shared attributes", func(t *testing.T, w *Writer) {
			add(t, w, "a", "x")
			must(t, w.Link("b", "a", &Header{Mode: 0o4711}))
		}, []want{{path: "/a", typ: "file", data: "x", perm: 0o4711}, {path: "/b", typ: "file", data: "x", perm: 0o4711}}},
		{"link over itself", func(t *testing.T, w *Writer) {
			add(t, w, "a", "x")
			must(t, w.Link("a", "a", nil))
		}, []want{{path: "/a", typ: "file", data: "x", perm: 0o644}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img := buildImage(t, WriterOptions{}, func(w *Writer) { tc.build(t, w) })
			if err := Validate(img); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			im, _ := Open(img)
			for _, c := range tc.check {
				in, err := im.LookupPath(c.path)
				if c.absent {
					if !errors.Is(err, ErrNotExist) && !errors.Is(err, ErrNotDir) {
						t.Fatalf("%s: want absent, got %+v, %v", c.path, in, err)
					}
					continue
				}
				if err != nil {
					t.Fatalf("%s: %v", c.path, err)
				}
				if TypeName(in.Mode) != c.typ || in.Mode&ModePermMask != c.perm {
					t.Fatalf("%s: mode %#o, want %s %#o", c.path, in.Mode, c.typ, c.perm)
				}
				if c.typ == "file" {
					if d, err := im.Data(in.Ino); err != nil || string(d) != c.data {
						t.Fatalf("%s: data %q, %v; want %q", c.path, d, err, c.data)
					}
				}
			}
		})
	}
}

func add(t *testing.T, w *Writer, p, data string) {
	t.Helper()
	h, r := file(p, data)
	must(t, w.Add(h, r))
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestWindowNoSpace(t *testing.T) {
	for _, size := range []int{0, 4096, 8192, 12288, 16384, 5 * 4096} {
		win := NewWindow(make([]byte, size))
		w := NewWriter(win, WriterOptions{})
		h, r := file("big", strings.Repeat("x", 3*4096))
		err := w.Add(h, r)
		if err == nil {
			_, err = w.Close()
		}
		if !errors.Is(err, ErrNoSpace) {
			t.Fatalf("window of %d bytes: error %v, want ErrNoSpace", size, err)
		}
		// The error is sticky.
		h, r = file("small", "x")
		if err2 := w.Add(h, r); err2 == nil && size < 4*4096 {
			t.Fatalf("window of %d: Add after ErrNoSpace succeeded", size)
		}
	}
	// Exactly enough room works.
	var f memFile
	w := NewWriter(&f, WriterOptions{})
	h, r := file("big", strings.Repeat("x", 3*4096))
	must(t, w.Add(h, r))
	n, err := w.Layout()
	must(t, err)
	win := NewWindow(make([]byte, n))
	w = NewWriter(win, WriterOptions{})
	h, r = file("big", strings.Repeat("x", 3*4096))
	must(t, w.Add(h, r))
	if _, err := w.Close(); err != nil {
		t.Fatalf("exact window: %v", err)
	}
	must(t, Validate(win.Bytes()))
}

// TestWindowPadsWithZeros: a Window over dirty memory gets zeros in every
// byte of the image that is not data (mapped pages are visible whole).
func TestWindowPadsWithZeros(t *testing.T) {
	mem := bytes.Repeat([]byte{0xAA}, 64*4096)
	w := NewWriter(NewWindow(mem), WriterOptions{})
	h, r := file("f", "abc")
	must(t, w.Add(h, r))
	must(t, w.Add(&Header{Path: "l", Mode: ModeSymlink | 0o777, Linkname: "t"}, nil))
	n, err := w.Close()
	must(t, err)
	img := mem[:n]
	must(t, Validate(img))
	if c := bytes.Count(img, []byte{0xAA}); c != 0 {
		t.Fatalf("%d bytes of old memory left in the image", c)
	}
}

func TestViewExternal(t *testing.T) {
	// A layer image with two files.
	layer := buildImage(t, WriterOptions{}, func(w *Writer) {
		add(t, w, "usr/bin/tool", strings.Repeat("T", 5000))
		add(t, w, "etc/conf", "conf")
	})
	lim, _ := Open(layer)
	tool := mustLookup(t, lim, "/usr/bin/tool")
	conf := mustLookup(t, lim, "/etc/conf")

	var f memFile
	w := NewWriter(&f, WriterOptions{})
	mt := time.Unix(1700000000, 5)
	must(t, w.AddExternal(&Header{Path: "bin/tool", Mode: ModeRegular | 0o755, Size: int64(tool.Size), ModTime: mt}, 0, BaseOffset+tool.DataOffset))
	must(t, w.AddExternal(&Header{Path: "etc/conf", Mode: ModeRegular | 0o644, Size: int64(conf.Size)}, 0, BaseOffset+conf.DataOffset))
	must(t, w.Link("etc/conf2", "etc/conf", nil))
	if _, err := w.Close(); err == nil {
		t.Fatal("Close without SetExternalBases succeeded")
	}
	w = NewWriter(&f, WriterOptions{})
	must(t, w.AddExternal(&Header{Path: "bin/tool", Mode: ModeRegular | 0o755, Size: int64(tool.Size), ModTime: mt}, 0, BaseOffset+tool.DataOffset))
	must(t, w.AddExternal(&Header{Path: "etc/conf", Mode: ModeRegular | 0o644, Size: int64(conf.Size)}, 0, BaseOffset+conf.DataOffset))
	must(t, w.Link("etc/conf2", "etc/conf", nil))
	viewSize, err := w.Layout()
	must(t, err)
	window := uint64(viewSize) + uint64(len(layer))
	if err := w.SetExternalBases([]uint64{uint64(viewSize) + 1}, window); err == nil {
		t.Fatal("unaligned base accepted")
	}
	if err := w.SetExternalBases([]uint64{uint64(viewSize)}, uint64(viewSize)+BaseOffset+tool.DataOffset+4096); err == nil {
		t.Fatal("window too small for the data accepted")
	}
	if err := w.SetExternalBases(nil, window); err == nil {
		t.Fatal("missing base accepted")
	}
	must(t, w.SetExternalBases([]uint64{uint64(viewSize)}, window))
	n, err := w.Close()
	must(t, err)
	if n != viewSize {
		t.Fatalf("Close returned %d, Layout %d", n, viewSize)
	}
	if viewSize > 4*4096 {
		t.Fatalf("view of 3 files is %d bytes", viewSize)
	}
	// The window: view then layer.
	win := append(f.b[:viewSize:viewSize], layer...)
	must(t, Validate(win))
	im, _ := Open(win)
	if im.TotalSize() != window {
		t.Fatalf("total size %d, want %d", im.TotalSize(), window)
	}
	// The view alone is not a valid window.
	if err := Validate(f.b[:viewSize]); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("view without its layers: %v", err)
	}
	for p, want := range map[string]string{"/bin/tool": strings.Repeat("T", 5000), "/etc/conf": "conf", "/etc/conf2": "conf"} {
		d, err := im.Data(mustLookup(t, im, p).Ino)
		if err != nil || string(d) != want {
			t.Fatalf("%s: %q, %v", p, d, err)
		}
	}
	if ts, ok := im.ModTime(mustLookup(t, im, "/bin/tool").Ino); !ok || ts != (Timespec{1700000000, 5}) {
		t.Fatalf("mtime %v %v", ts, ok)
	}
}

func TestWriterTooManyInodes(t *testing.T) {
	var f memFile
	w := NewWriter(&f, WriterOptions{})
	w.maxNodes = 4 // root + 3
	add(t, w, "a", "")
	add(t, w, "b", "")
	add(t, w, "c", "")
	err := w.Add(&Header{Path: "d/e", Mode: ModeRegular}, nil)
	if !errors.Is(err, ErrTooManyNodes) || !strings.Contains(err.Error(), "d/e") {
		t.Fatalf("error %v, want ErrTooManyNodes naming d/e", err)
	}
	// The image so far is still valid.
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	must(t, Validate(f.b))
}

// TestWindowNoSpaceForMetadata: file data fits, the metadata does not:
// Close fails with ErrNoSpace and leaves no superblock behind.
func TestWindowNoSpaceForMetadata(t *testing.T) {
	win := NewWindow(make([]byte, BaseOffset+2*BlockSize))
	w := NewWriter(win, WriterOptions{})
	add(t, w, "f", strings.Repeat("x", 100))
	if _, err := w.Close(); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Close: %v, want ErrNoSpace", err)
	}
	if HasMagic(win.Bytes()) {
		t.Fatal("a failed Close wrote the superblock")
	}
	if err := Validate(win.Bytes()); err == nil {
		t.Fatal("half-written image validates")
	}
}

// TestReservingWindow checks that a reserving Window backs its memory in
// growing prefixes that cover every byte written before it is written, and
// that a failing reservation fails the write naming the file.
func TestReservingWindow(t *testing.T) {
	big := strings.Repeat("x", 3*reserveChunk/2)
	var calls [][2]int64
	buf := make([]byte, 4*reserveChunk)
	win := NewReservingWindow(buf, func(off, n int64) error {
		calls = append(calls, [2]int64{off, n})
		return nil
	})
	w := NewWriter(win, WriterOptions{})
	for _, f := range []struct{ path, data string }{{"a", "hello"}, {"big", big}, {"z", "bye"}} {
		h, r := file(f.path, f.data)
		if err := w.Add(h, r); err != nil {
			t.Fatal(err)
		}
	}
	size, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	var end int64
	for _, c := range calls {
		if c[0] != end || c[1] <= 0 {
			t.Fatalf("reservations %v are not growing prefixes", calls)
		}
		end += c[1]
	}
	if end < size || end > size+reserveChunk {
		t.Fatalf("reserved %d bytes for an image of %d", end, size)
	}
	im, err := Open(buf[:size])
	if err != nil {
		t.Fatal(err)
	}
	in, err := im.LookupPath("big")
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := im.Data(in.Ino); string(d) != big {
		t.Fatal("big file reads back wrong")
	}

	boom := errors.New("tmpfs full")
	win = NewReservingWindow(make([]byte, 4*reserveChunk), func(off, n int64) error {
		if off+n > reserveChunk {
			return boom
		}
		return nil
	})
	w = NewWriter(win, WriterOptions{})
	h, r := file("big", big)
	if err := w.Add(h, r); !errors.Is(err, boom) || !strings.Contains(err.Error(), "big") {
		t.Fatalf("write past a failing reservation: %v, want the reservation's error naming the file", err)
	}
}

// TestKernelLosses: what the daxfs module would not show is named; an
// image of files, directories, links, FIFOs and mtimes loses nothing
// that counts.
func TestKernelLosses(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    Header
		want []string
	}{
		{"plain", Header{Path: "f", Mode: ModeRegular | 0o644, ModTime: time.Unix(1e9, 0)}, nil},
		{"fifo", Header{Path: "p", Mode: ModeFIFO | 0o600}, nil},
		{"xattr", Header{Path: "f", Mode: ModeRegular | 0o755, Xattrs: map[string][]byte{"security.capability": {1}}}, []string{"xattrs"}},
		{"char", Header{Path: "null", Mode: ModeChar | 0o666, Rdev: 1<<8 | 3}, []string{"device nodes"}},
		{"block 0:0", Header{Path: "b", Mode: ModeBlock | 0o600}, []string{"device nodes"}},
		{"both", Header{Path: "d", Mode: ModeChar | 0o600, Rdev: 5, Xattrs: map[string][]byte{"user.x": {1}}}, []string{"xattrs", "device nodes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := buildImage(t, WriterOptions{}, func(w *Writer) {
				if err := w.Add(&Header{Path: "dir", Mode: ModeDir | 0o755}, nil); err != nil {
					t.Fatal(err)
				}
				h := tc.h
				if err := w.Add(&h, bytes.NewReader(nil)); err != nil {
					t.Fatal(err)
				}
			})
			im, err := Open(b)
			if err != nil {
				t.Fatal(err)
			}
			if got := im.KernelLosses(); !slices.Equal(got, tc.want) {
				t.Fatalf("KernelLosses() = %q, want %q", got, tc.want)
			}
		})
	}
}
