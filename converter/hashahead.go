package converter

import (
	"context"
	"crypto/sha256"
	"hash"
	"io"

	"github.com/containerd-daxfs/containerd-daxfs/internal/readahead"
)

// hashAhead reads its source in a goroutine of its own, a few chunks ahead
// of the reader (package readahead), and hashes each chunk there before
// handing it over. The diffID's sha256 then runs beside the tar parser and
// the copy into the image instead of in line with them: on two cores, with
// the decompressor in a third goroutine, a conversion's critical path
// loses the hashing (about a fifth of it for a gzip layer).
//
// Read is for one goroutine. Close stops the goroutine and waits for it
// (at most until the source's Read in progress returns), so the source is
// not read after Close returns. The source's errors reach the reader
// unchanged, after the data before them: a decompressor's
// io.ErrUnexpectedEOF is a truncated stream, not an end.
type hashAhead struct {
	*readahead.Reader
	h hash.Hash
}

const (
	aheadChunkSize = 256 << 10
	aheadChunks    = 8
)

func newHashAhead(src io.Reader) *hashAhead {
	h := sha256.New()
	fill := func(ctx context.Context, b []byte) (int, error) {
		n := 0
		var err error
		for n < len(b) && err == nil && ctx.Err() == nil {
			var k int
			k, err = src.Read(b[n:])
			n += k
		}
		h.Write(b[:n])
		return n, err
	}
	return &hashAhead{Reader: readahead.New(context.Background(), aheadChunkSize, aheadChunks-1, fill), h: h}
}

// Sum returns the sha256 of the stream once Read has returned io.EOF.
// Called earlier, it stops reading and hashes what was read ahead, which
// is of no use but to release the goroutine.
func (a *hashAhead) Sum() []byte {
	a.Close() // the goroutine has returned: h is ours
	return a.h.Sum(nil)
}
