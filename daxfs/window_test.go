package daxfs

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFileWindow: a file Window writes through the file its bytes map, so
// the image is visible in the mapping at once, and needs no reservation
// for what the Writer writes; the file's errors name the entry and wrap
// ErrBacking.
func TestFileWindow(t *testing.T) {
	const size = 8 << 20
	f, err := os.Create(filepath.Join(t.TempDir(), "region"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)

	// The window starts 1 MiB into the file, as a claim does in a region.
	const base = 1 << 20
	reserved := 0
	win := NewFileWindow(mem[base:], offsetWriter{f, base}, func(off, n int64) error { reserved++; return nil })
	w := NewWriter(win, WriterOptions{})
	big := strings.Repeat("0123456789", 300_000)
	for _, e := range []struct{ path, data string }{{"a", "hello"}, {"dir/big", big}} {
		h, r := file(e.path, e.data)
		if e.path == "dir/big" {
			if err := w.Add(&Header{Path: "dir", Mode: ModeDir | 0o755}, nil); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Add(h, r); err != nil {
			t.Fatal(err)
		}
	}
	n, err := w.Close()
	if err != nil {
		t.Fatal(err)
	}
	if reserved != 0 {
		t.Errorf("writing through the file reserved memory %d times", reserved)
	}
	im, err := Open(mem[base : base+n])
	if err != nil {
		t.Fatal(err)
	}
	in, err := im.LookupPath("dir/big")
	if err != nil {
		t.Fatal(err)
	}
	if d, _ := im.Data(in.Ino); string(d) != big {
		t.Fatal("the mapping does not show the file's data written through the file")
	}

	boom := errors.New("no space left on device")
	win = NewFileWindow(mem[base:], failingWriter{boom}, nil)
	w = NewWriter(win, WriterOptions{})
	h, r := file("big", big)
	if err := w.Add(h, r); !errors.Is(err, ErrBacking) || !errors.Is(err, boom) || !strings.Contains(err.Error(), "big") {
		t.Fatalf("a failing file write: %v, want ErrBacking wrapping the file's error and naming the entry", err)
	}
	// Bounds are the window's, whatever the file could take.
	if _, err := NewFileWindow(mem[:4096], offsetWriter{f, 0}, nil).WriteAt(make([]byte, 10), 4090); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("write past the window: %v, want ErrNoSpace", err)
	}
}

type offsetWriter struct {
	f   *os.File
	off int64
}

func (w offsetWriter) WriteAt(p []byte, off int64) (int, error) { return w.f.WriteAt(p, w.off+off) }

type failingWriter struct{ err error }

func (w failingWriter) WriteAt(p []byte, off int64) (int, error) { return 0, w.err }
