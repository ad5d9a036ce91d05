package daxfs

import (
	"archive/tar"
	"bytes"
	"errors"
	"io"
	"testing"
)

// tarMode converts a tar header's type and mode into st_mode.
func tarMode(h *tar.Header) uint32 {
	perm := uint32(h.Mode) & ModePermMask
	switch h.Typeflag {
	case tar.TypeDir:
		return ModeDir | perm
	case tar.TypeSymlink:
		return ModeSymlink | perm
	case tar.TypeChar:
		return ModeChar | perm
	case tar.TypeBlock:
		return ModeBlock | perm
	case tar.TypeFifo:
		return ModeFIFO | perm
	}
	return ModeRegular | perm
}

// writeTar feeds a tar stream to a Writer with plain Add and Link calls.
func writeTar(t testing.TB, w *Writer, tarBytes []byte) {
	t.Helper()
	tr := tar.NewReader(bytes.NewReader(tarBytes))
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeLink {
			if err := w.Link(h.Name, h.Linkname, &Header{Mode: uint32(h.Mode), UID: uint32(h.Uid), GID: uint32(h.Gid), ModTime: h.ModTime}); err != nil {
				t.Fatal(err)
			}
			continue
		}
		hd := &Header{Path: h.Name, Mode: tarMode(h), UID: uint32(h.Uid), GID: uint32(h.Gid), Size: h.Size, Linkname: h.Linkname, ModTime: h.ModTime}
		if err := w.Add(hd, tr); err != nil {
			t.Fatal(err)
		}
	}
}

// buildImage runs fn against a Writer over a growable buffer and returns
// the image bytes.
func buildImage(t testing.TB, opts WriterOptions, fn func(w *Writer)) []byte {
	t.Helper()
	var f memFile
	w := NewWriter(&f, opts)
	fn(w)
	n, err := w.Close()
	if err != nil {
		t.Fatalf("Close: %v", err)
	}
	if int64(len(f.b)) != n {
		t.Fatalf("Close returned size %d, wrote %d bytes", n, len(f.b))
	}
	return f.b
}

// memFile is an io.WriterAt that grows like a sparse file.
type memFile struct{ b []byte }

func (m *memFile) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		if end > cap(m.b) {
			nb := make([]byte, end, 2*end)
			copy(nb, m.b)
			m.b = nb
		} else {
			m.b = m.b[:end]
		}
	}
	return copy(m.b[off:], p), nil
}

func treeOf(t testing.TB, img []byte, stripExt bool) []byte {
	t.Helper()
	im, err := Open(img)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	tree, err := im.Tree()
	if err != nil {
		t.Fatalf("Tree: %v", err)
	}
	if stripExt {
		for i := range tree {
			tree[i].HasExt, tree[i].MTime, tree[i].Xattrs = false, Timespec{}, nil
		}
	}
	j, err := TreeJSON(tree)
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func TestWriterTreeTarMatchesExpected(t *testing.T) {
	tarBytes := readFixture(t, "tree.tar")
	want := bytes.TrimRight(readFixture(t, "expected.json"), "\n")
	for _, opts := range []WriterOptions{{}, {NoExtension: true}} {
		img := buildImage(t, opts, func(w *Writer) { writeTar(t, w, tarBytes) })
		if err := Validate(img); err != nil {
			t.Fatalf("opts %+v: Validate: %v", opts, err)
		}
		if got := treeOf(t, img, true); !bytes.Equal(got, want) {
			t.Fatalf("opts %+v: tree differs from expected.json:\n%s", opts, firstDiff(got, want))
		}
		im, _ := Open(img)
		if im.HasExtension() == opts.NoExtension {
			t.Fatalf("opts %+v: HasExtension = %v", opts, im.HasExtension())
		}
		if !im.Sorted() {
			t.Fatalf("opts %+v: image not flagged sorted", opts)
		}
		// Hard links share one inode and our images have no unused slots.
		a, _ := im.LookupPath("/usr/bin/hl1")
		b, _ := im.LookupPath("/etc/hl3")
		if a.Ino != b.Ino || a.Nlink != 3 {
			t.Fatalf("hard links: hl1 ino %d nlink %d, hl3 ino %d", a.Ino, a.Nlink, b.Ino)
		}
		if im.InodeCount() != 179 {
			t.Fatalf("inode count %d, want 179 (181 tar entries, 2 of them hard links)", im.InodeCount())
		}
	}
}
