package converter

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"io"
	"testing"
	"testing/iotest"

	"github.com/containerd-daxfs/containerd-daxfs/internal/readahead"
)

// TestHashAhead: what the reader sees is the source, in order, whatever
// the read sizes; Sum is the source's sha256; the source's error comes
// after its data.
func TestHashAhead(t *testing.T) {
	src := make([]byte, 3*aheadChunkSize+1234)
	for i := range src {
		src[i] = byte(i * 31)
	}
	want := sha256.Sum256(src)
	for _, tc := range []struct {
		name string
		r    func(io.Reader) io.Reader
	}{
		{"whole", func(r io.Reader) io.Reader { return r }},
		{"one byte", iotest.OneByteReader},
		{"half", iotest.HalfReader},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newHashAhead(iotest.HalfReader(bytes.NewReader(src)))
			defer a.Close()
			got, err := io.ReadAll(tc.r(a))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, src) {
				t.Fatalf("read %d bytes, not the source's %d", len(got), len(src))
			}
			if sum := a.Sum(); !bytes.Equal(sum, want[:]) {
				t.Fatalf("sum %x, want %x", sum, want)
			}
		})
	}

	boom := errors.New("boom")
	a := newHashAhead(io.MultiReader(bytes.NewReader(src[:1000]), iotest.ErrReader(boom)))
	got, err := io.ReadAll(a)
	if !errors.Is(err, boom) || len(got) != 1000 {
		t.Fatalf("read %d bytes and %v, want 1000 and the source's error", len(got), err)
	}
	a.Close()
}

// TestHashAheadClose: Close stops the goroutine mid-stream, and a Read
// after it fails instead of blocking.
func TestHashAheadClose(t *testing.T) {
	a := newHashAhead(bytes.NewReader(make([]byte, 4*aheadChunks*aheadChunkSize)))
	buf := make([]byte, 100)
	if _, err := io.ReadFull(a, buf); err != nil {
		t.Fatal(err)
	}
	a.Close()
	for {
		if _, err := a.Read(buf); err != nil {
			if !errors.Is(err, readahead.ErrClosed) {
				t.Fatalf("read after close: %v", err)
			}
			break
		}
	}
}

// TestHashAheadKeepsSourceErrors: a source's io.ErrUnexpectedEOF (a
// decompressor's word for a truncated stream) reaches the reader as it
// is, after the data before it, not as a clean end.
func TestHashAheadKeepsSourceErrors(t *testing.T) {
	data := bytes.Repeat([]byte("x"), 3000)
	a := newHashAhead(io.MultiReader(bytes.NewReader(data), iotest.ErrReader(io.ErrUnexpectedEOF)))
	defer a.Close()
	got, err := io.ReadAll(a)
	if !errors.Is(err, io.ErrUnexpectedEOF) || len(got) != len(data) {
		t.Fatalf("read %d bytes and %v, want %d and io.ErrUnexpectedEOF", len(got), err, len(data))
	}
}
