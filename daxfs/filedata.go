package daxfs

// Streaming regular files' bytes into the data area as they arrive.

import (
	"errors"
	"fmt"
	"io"
	"math"
)

// copyBufSize is the size of the Writer's one copy buffer; a multiple of
// BlockSize so that a file's zero padding usually goes out in the same
// WriteAt as its last bytes.
const copyBufSize = 256 << 10

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
