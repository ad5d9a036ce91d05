//go:build isal && cgo

package gunzip

/*
#cgo LDFLAGS: -lisal
#include <stdlib.h>
#include <stdint.h>
#include <isa-l/igzip_lib.h>

static struct inflate_state *dx_new(void) {
	struct inflate_state *s = malloc(sizeof *s);
	if (s == NULL)
		return NULL;
	isal_inflate_init(s);
	s->crc_flag = ISAL_GZIP;
	return s;
}

static void dx_reset(struct inflate_state *s) {
	isal_inflate_reset(s);
	s->crc_flag = ISAL_GZIP;
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
	return r;
}
*/
import "C"

import (
	"errors"
	"fmt"
	"io"
	"sync"
	"unsafe"
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

type block struct {
	b   []byte
	n   int
	err error
}

type isalReader struct {
	r      io.Reader
	blocks chan *block // inflated, in order
	free   chan *block
	done   chan struct{}
	wg     sync.WaitGroup
	cur    *block
	off    int
	err    error
	closed sync.Once
}

func newReader(r io.Reader) (io.ReadCloser, error) {
	z := &isalReader{
		r:      r,
		blocks: make(chan *block, ahead),
		free:   make(chan *block, ahead+1),
		done:   make(chan struct{}),
	}
	for i := 0; i < ahead+1; i++ {
		z.free <- &block{b: make([]byte, blockSize)}
	}
	st := C.dx_new()
	if st == nil {
		return nil, errors.New("gzip: allocating the ISA-L inflate state failed")
	}
	z.wg.Add(1)
	go z.inflate(st)
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

// inflate runs in its own goroutine: it fills free blocks and sends them,
// the last one with the error (io.EOF at the clean end of the stream).
func (z *isalReader) inflate(st *C.struct_inflate_state) {
	defer z.wg.Done()
	defer C.free(unsafe.Pointer(st))
	in := make([]byte, inSize)
	var pending []byte // unread part of in
	eof := false
	var total int64 // compressed bytes consumed, for error messages
	// fill reads more input when pending is empty; it reports false at
	// the end of r.
	fill := func() (bool, error) {
		if len(pending) > 0 {
			return true, nil
		}
		if eof {
			return false, nil
		}
		n, err := io.ReadAtLeast(z.r, in, 1)
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
	var cur *block
	send := func(err error) bool {
		if cur == nil {
			select {
			case cur = <-z.free:
				cur.n = 0
			case <-z.done:
				return false
			}
		}
		cur.err = err
		select {
		case z.blocks <- cur:
			cur = nil
			return true
		case <-z.done:
			return false
		}
	}
	started := false // inside a member
	for {
		if cur == nil {
			select {
			case cur = <-z.free:
				cur.n, cur.err = 0, nil
			case <-z.done:
				return
			}
		}
		more, err := fill()
		if err != nil {
			send(err)
			return
		}
		if !more {
			if started {
				send(fmt.Errorf("gzip: %w: stream ends inside a member after %d compressed bytes: %w", ErrCorrupt, total, io.ErrUnexpectedEOF))
			} else {
				send(io.EOF)
			}
			return
		}
		var inPtr *C.uint8_t
		if len(pending) > 0 {
			inPtr = (*C.uint8_t)(unsafe.Pointer(&pending[0]))
		}
		space := cur.b[cur.n:]
		res := C.dx_step(st, inPtr, C.uint32_t(len(pending)), (*C.uint8_t)(unsafe.Pointer(&space[0])), C.uint32_t(len(space)))
		if res.ret < 0 {
			send(fmt.Errorf("gzip: %w: %s near compressed byte %d", ErrCorrupt, status(res.ret), total+int64(res.in_used)))
			return
		}
		started = true
		pending = pending[res.in_used:]
		total += int64(res.in_used)
		cur.n += int(res.out_used)
		if res.finished != 0 {
			// A member ended (trailer checked). Another may follow.
			C.dx_reset(st)
			started = false
		}
		if cur.n == len(cur.b) {
			if !send(nil) {
				return
			}
		} else if res.in_used == 0 && res.out_used == 0 && res.finished == 0 && len(pending) > 0 {
			send(fmt.Errorf("gzip: %w: inflater made no progress near compressed byte %d", ErrCorrupt, total))
			return
		}
	}
}

func (z *isalReader) Read(p []byte) (int, error) {
	for {
		if z.cur != nil {
			if z.off < z.cur.n {
				n := copy(p, z.cur.b[z.off:z.cur.n])
				z.off += n
				return n, nil
			}
			if z.cur.err != nil {
				z.err = z.cur.err
			}
			z.free <- z.cur
			z.cur = nil
		}
		if z.err != nil {
			return 0, z.err
		}
		if len(p) == 0 {
			return 0, nil
		}
		select {
		case b := <-z.blocks:
			z.cur, z.off = b, 0
		case <-z.done:
			return 0, errClosed
		}
	}
}

// Close stops the inflater and waits for it. It does not close the
// underlying reader.
func (z *isalReader) Close() error {
	z.closed.Do(func() {
		close(z.done)
		z.wg.Wait()
	})
	return nil
}
