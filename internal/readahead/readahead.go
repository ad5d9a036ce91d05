// Package readahead runs the producer of a byte stream in a goroutine of
// its own, a few chunks ahead of the stream's reader, so that producing
// (fetching a blob over gRPC, inflating gzip, hashing) overlaps whatever
// the reader does with the bytes. The differ's blob prefetch, the
// converter's diffID hashing and the ISA-L gzip reader are all one of these.
package readahead

import (
	"context"
	"errors"
	"time"
)

// ErrClosed is returned by Read after Close.
var ErrClosed = errors.New("readahead: read after close")

// FillFunc fills a prefix of b with the next bytes of the stream and says
// how many. An error ends the stream after those bytes: io.EOF is its
// clean end, any other error reaches the reader as it is. A FillFunc that
// returns 0 bytes and no error is called again with the same chunk. ctx
// ends when the Reader is closed: a FillFunc that can block should stop
// then.
type FillFunc func(ctx context.Context, b []byte) (int, error)

// Reader reads the stream a FillFunc produces. Read and Close are for one
// goroutine.
type Reader struct {
	ctx    context.Context // the caller's
	size   int             // of a chunk
	full   chan *chunk     // filled, in stream order
	free   chan *chunk
	cancel context.CancelFunc
	done   chan struct{} // closed when the filling goroutine returned

	cur    *chunk // being read from
	err    error  // the stream's end, once reached
	closed bool
	waited time.Duration
}

type chunk struct {
	b    []byte // allocated on first use: a short stream needs few
	r, n int    // read position and fill of b
	err  error
}

// New starts calling fill in a goroutine on chunks of size bytes, at most
// depth chunks ahead of Read (depth+1 chunks in all), until fill returns
// an error, ctx ends or Close. A FillFunc that knows where the stream ends
// should return io.EOF with its last bytes rather than in a call of its
// own.
func New(ctx context.Context, size, depth int, fill FillFunc) *Reader {
	fctx, cancel := context.WithCancel(ctx)
	r := &Reader{
		ctx:    ctx,
		size:   size,
		full:   make(chan *chunk, depth+1),
		free:   make(chan *chunk, depth+1),
		cancel: cancel,
		done:   make(chan struct{}),
	}
	for range depth + 1 {
		r.free <- &chunk{}
	}
	go r.run(fctx, fill)
	return r
}

func (r *Reader) run(ctx context.Context, fill FillFunc) {
	defer close(r.done)
	for {
		var c *chunk
		select {
		case c = <-r.free:
		case <-ctx.Done():
			return
		}
		if c.b == nil {
			c.b = make([]byte, r.size)
		}
		c.r, c.n, c.err = 0, 0, nil
		for c.n == 0 && c.err == nil {
			if ctx.Err() != nil {
				return
			}
			c.n, c.err = fill(ctx, c.b)
		}
		select {
		case r.full <- c:
		case <-ctx.Done():
			return
		}
		if c.err != nil {
			return
		}
	}
}

// Read implements io.Reader: the stream's bytes in order, then its error
// (io.EOF at its clean end).
func (r *Reader) Read(p []byte) (int, error) {
	for {
		if r.cur != nil && r.cur.r < r.cur.n {
			n := copy(p, r.cur.b[r.cur.r:r.cur.n])
			r.cur.r += n
			return n, nil
		}
		if r.cur != nil {
			if r.cur.err != nil {
				r.err = r.cur.err
			} else {
				r.free <- r.cur
			}
			r.cur = nil
		}
		if r.err != nil {
			return 0, r.err
		}
		if r.closed {
			return 0, ErrClosed
		}
		if len(p) == 0 {
			return 0, nil
		}
		start := time.Now()
		select {
		case r.cur = <-r.full:
		case <-r.done:
			// The goroutine returned: after its last chunk, or because
			// ctx ended with nothing more queued.
			select {
			case r.cur = <-r.full:
			default:
				r.err = ErrClosed
				if err := r.ctx.Err(); err != nil {
					r.err = err
				}
			}
		}
		r.waited += time.Since(start)
	}
}

// Waited is how long Read waited for the producer: the part of the
// reader's time the stream was not ready.
func (r *Reader) Waited() time.Duration { return r.waited }

// Close stops the producer and waits until its goroutine has returned
// (at most until a fill in progress returns), so the FillFunc's source is
// not used after Close. Read then fails with ErrClosed.
func (r *Reader) Close() error {
	r.cancel()
	<-r.done
	r.closed = true
	return nil
}
