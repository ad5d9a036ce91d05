package daxfs

import (
	"fmt"
	"io"
)

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
