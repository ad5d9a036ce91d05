//go:build isal && cgo

package gunzip

/*
#cgo LDFLAGS: -lisal
#include <stdlib.h>
#include <stdint.h>
#include <isa-l/igzip_lib.h>

// dx_clean_upper clears the upper halves of the vector registers that
// ISA-L's AVX2 and AVX-512 paths leave dirty. The call returns to Go on
// this thread, and Go code run on it next (the diffID's SHA-NI hashing,
// memmove) uses legacy SSE encodings: with the upper state dirty, some
// CPUs pay a transition penalty on every such instruction. On a 2-vCPU
// Xeon VM that made sha256 100x slower (8 MB/s) while a gzip layer was
// inflated beside it, and a conversion 30x slower.
static void dx_clean_upper(void) {
#if defined(__x86_64__)
	if (__builtin_cpu_supports("avx"))
		__asm__ volatile("vzeroupper");
#endif
}

static struct inflate_state *dx_new(void) {
	struct inflate_state *s = malloc(sizeof *s);
	if (s == NULL)
		return NULL;
	isal_inflate_init(s);
	s->crc_flag = ISAL_GZIP;
	dx_clean_upper();
	return s;
}

static void dx_reset(struct inflate_state *s) {
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP;
	dx_clean_upper();
}

typedef struct {
	int ret;
	uint32_t in_used, out_used;
	int finished;
} dx_step_result;

// dx_step inflates from in into out. The Go buffers are only used during
// the call: the state keeps no pointer to them (ISA-L keeps the history it
// needs in the state itself).
static dx_step_result dx_step(struct inflate_state *s, uint8_t *in, uint32_t in_len, uint8_t *out, uint32_t out_len) {
	dx_step_result r;
	s->next_in = in;
	s->avail_in = in_len;
	s->next_out = out;
	s->avail_out = out_len;
	r.ret = isal_inflate(s);
	r.in_used = in_len - s->avail_in;
	r.out_used = out_len - s->avail_out;
	r.finished = s->block_state == ISAL_BLOCK_FINISH;
	s->next_in = NULL;
	s->avail_in = 0;
	s->next_out = NULL;
	s->avail_out = 0;
	dx_clean_upper();
	return r;
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"io"
	"unsafe"

	"github.com/containerd-daxfs/containerd-daxfs/internal/readahead"
)

const implementation = "isa-l"

var errClosed = errors.New("gzip: read after Close")

// ErrCorrupt is wrapped by errors about the compressed data itself.
var ErrCorrupt = errors.New("gzip: corrupt stream")

const (
	inSize    = 256 << 10
	blockSize = 1 << 20
	// ahead is how many decompressed blocks the inflater may be ahead.
	ahead = 3
)

// isalReader inflates in a goroutine of its own (package readahead), a
// few blocks ahead of the reader.
type isalReader struct {
	ra *readahead.Reader
	st *C.struct_inflate_state // freed by the inflater at the stream's end, else by Close
}

func newReader(r io.Reader) (io.ReadCloser, error) {
	st := C.dx_new()
	if st == nil {
		return nil, errors.New("gzip: allocating the ISA-L inflate state failed")
	}
	z := &isalReader{st: st}
	z.ra = readahead.New(context.Background(), blockSize, ahead, z.inflater(r))
	return z, nil
}

// status describes an ISA-L error code.
func status(ret C.int) string {
	switch ret {
	case C.ISAL_INVALID_BLOCK:
		return "invalid deflate block"
	case C.ISAL_INVALID_SYMBOL:
		return "invalid deflate symbol"
	case C.ISAL_INVALID_LOOKBACK:
		return "invalid look-back distance"
	case C.ISAL_INVALID_WRAPPER:
		return "invalid gzip header or trailer"
	case C.ISAL_UNSUPPORTED_METHOD:
		return "unsupported compression method"
	case C.ISAL_INCORRECT_CHECKSUM:
		return "checksum mismatch"
	case C.ISAL_NEED_DICT:
		return "stream needs a preset dictionary"
	}
	return fmt.Sprintf("ISA-L status %d", int(ret))
}

// inflater returns the readahead.FillFunc that inflates r into blocks:
// each call fills a block, or ends the stream with what it inflated and
// the error (io.EOF at the clean end of the last member). Its state lives
// across calls; it frees the inflate state when the stream ends.
func (z *isalReader) inflater(r io.Reader) readahead.FillFunc {
	in := make([]byte, inSize)
	var pending []byte // unread part of in
	eof := false
	var total int64 // compressed bytes consumed, for error messages
	// more reads more input when pending is empty; it reports false at
	// the end of r.
	more := func() (bool, error) {
		if len(pending) > 0 {
			return true, nil
		}
		if eof {
			return false, nil
		}
		n, err := io.ReadAtLeast(r, in, 1)
		pending = in[:n]
		switch {
		case err == io.EOF:
			eof = true
			return false, nil
		case err != nil && n == 0:
			return false, fmt.Errorf("gzip: reading the compressed stream: %w", err)
		}
		return true, nil
	}
	started := false // inside a member
	return func(ctx context.Context, b []byte) (n int, err error) {
		defer func() {
			if err != nil {
				C.free(unsafe.Pointer(z.st))
				z.st = nil
			}
		}()
		for n < len(b) {
			if err := ctx.Err(); err != nil {
				return n, err
			}
			ok, err := more()
			if err != nil {
				return n, err
			}
			if !ok {
				if started {
					return n, fmt.Errorf("gzip: %w: stream ends inside a member after %d compressed bytes: %w", ErrCorrupt, total, io.ErrUnexpectedEOF)
				}
				return n, io.EOF
			}
			var inPtr *C.uint8_t
			if len(pending) > 0 {
				inPtr = (*C.uint8_t)(unsafe.Pointer(&pending[0]))
			}
			space := b[n:]
			res := C.dx_step(z.st, inPtr, C.uint32_t(len(pending)), (*C.uint8_t)(unsafe.Pointer(&space[0])), C.uint32_t(len(space)))
			if res.ret < 0 {
				return n, fmt.Errorf("gzip: %w: %s near compressed byte %d", ErrCorrupt, status(res.ret), total+int64(res.in_used))
			}
			started = true
			pending = pending[res.in_used:]
			total += int64(res.in_used)
			n += int(res.out_used)
			if res.finished != 0 {
				// A member ended (trailer checked). Another may follow.
				C.dx_reset(z.st)
				started = false
			} else if res.in_used == 0 && res.out_used == 0 && len(pending) > 0 {
				return n, fmt.Errorf("gzip: %w: inflater made no progress near compressed byte %d", ErrCorrupt, total)
			}
		}
		return n, nil
	}
}

func (z *isalReader) Read(p []byte) (int, error) {
	n, err := z.ra.Read(p)
	if errors.Is(err, readahead.ErrClosed) {
		err = errClosed
	}
	return n, err
}

// Close stops the inflater and waits for it. It does not close the
// underlying reader.
func (z *isalReader) Close() error {
	z.ra.Close()
	if z.st != nil { // the inflater stopped before the stream's end
		C.free(unsafe.Pointer(z.st))
		z.st = nil
	}
	return nil
}
