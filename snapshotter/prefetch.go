package snapshotter

import (
	"context"
	"io"
	"time"
)

// prefetchChunk is how much one read of a blob asks containerd's content
// store for. Every ReadAt of the content proxy is a gRPC round trip; the
// converter reads in 64 KiB steps, which over gRPC costs more than the
// conversion itself.
const prefetchChunk = 4 << 20

// prefetchReader reads a blob ahead of its consumer: a goroutine fetches
// chunks of prefetchChunk bytes while the converter works on the previous
// ones, so fetching and converting overlap.
type prefetchReader struct {
	chunks <-chan prefetched
	cur    []byte
	err    error
	cancel context.CancelFunc
	// waited is how long the consumer waited for chunks: the part of a
	// conversion spent fetching rather than converting.
	waited time.Duration
}

type prefetched struct {
	b   []byte
	err error
}

// newPrefetchReader starts reading ra from 0 to size, depth chunks ahead.
// Close stops it.
func newPrefetchReader(ctx context.Context, ra io.ReaderAt, size int64, depth int) *prefetchReader {
	ctx, cancel := context.WithCancel(ctx)
	ch := make(chan prefetched, depth)
	go func() {
		defer close(ch)
		for off := int64(0); off < size; {
			if ctx.Err() != nil {
				return // Close: the consumer is gone
			}
			n := min(int64(prefetchChunk), size-off)
			b := make([]byte, n)
			m, err := ra.ReadAt(b, off)
			if err == io.EOF && int64(m) == n {
				err = nil
			}
			select {
			case ch <- prefetched{b: b[:m], err: err}:
			case <-ctx.Done():
				return
			}
			if err != nil {
				return
			}
			off += int64(m)
		}
	}()
	return &prefetchReader{chunks: ch, cancel: cancel}
}

func (r *prefetchReader) Read(p []byte) (int, error) {
	for len(r.cur) == 0 {
		if r.err != nil {
			return 0, r.err
		}
		start := time.Now()
		c, ok := <-r.chunks
		r.waited += time.Since(start)
		if !ok {
			r.err = io.EOF
			continue
		}
		r.cur, r.err = c.b, c.err
		if r.err == io.EOF {
			r.err = io.ErrUnexpectedEOF // the blob is shorter than its size
		}
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	return n, nil
}

// Close stops the prefetching goroutine.
func (r *prefetchReader) Close() error {
	r.cancel()
	for range r.chunks {
	}
	return nil
}
