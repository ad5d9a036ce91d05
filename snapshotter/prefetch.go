package snapshotter

import (
	"context"
	"io"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/readahead"
)

// prefetchChunk is how much one read of a blob asks containerd's content
// store for. Every ReadAt of the content proxy is a gRPC round trip; the
// converter reads in 64 KiB steps, which over gRPC costs more than the
// conversion itself.
const prefetchChunk = 4 << 20

// prefetchReader reads a blob ahead of its consumer (package readahead):
// a goroutine fetches chunks of prefetchChunk bytes while the converter
// works on the previous ones, so fetching and converting overlap.
type prefetchReader struct {
	r *readahead.Reader
	// waited is how long the consumer waited for chunks: the part of a
	// conversion spent fetching rather than converting.
	waited time.Duration
}

// newPrefetchReader starts reading ra from 0 to size, depth chunks ahead.
// Close stops it.
func newPrefetchReader(ctx context.Context, ra io.ReaderAt, size int64, depth int) *prefetchReader {
	var off int64
	fetch := func(_ context.Context, b []byte) (int, error) {
		n := min(int64(len(b)), size-off)
		m, err := ra.ReadAt(b[:n], off)
		off += int64(m)
		switch {
		case err == io.EOF && int64(m) < n:
			err = io.ErrUnexpectedEOF // the blob is shorter than its size
		case err == nil || err == io.EOF:
			err = nil
			if off == size {
				err = io.EOF // with the last bytes: no call to say so
			}
		}
		return m, err
	}
	if size <= 0 {
		fetch = func(context.Context, []byte) (int, error) { return 0, io.EOF }
	}
	return &prefetchReader{r: readahead.New(ctx, prefetchChunk, depth, fetch)}
}

func (p *prefetchReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	p.waited = p.r.Waited()
	return n, err
}

// Close stops the prefetching goroutine.
func (p *prefetchReader) Close() error { return p.r.Close() }
