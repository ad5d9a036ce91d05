package converter

import (
	"crypto/sha256"
	"errors"
	"hash"
	"io"
	"sync"
)

// hashAhead reads its source in a goroutine of its own, a few chunks ahead
// of the reader, and hashes each chunk there before handing it over. The
// diffID's sha256 then runs beside the tar parser and the copy into the
// image instead of in line with them: on two cores, with the decompressor
// in a third goroutine, a conversion's critical path loses the hashing
// (about a fifth of it for a gzip layer).
//
// Read is for one goroutine. Close stops the goroutine and waits for it
// (at most until the source's Read in progress returns), so the source is
// not read after Close returns.
type hashAhead struct {
	h    hash.Hash
	full chan *aheadChunk // filled and hashed, in stream order
	free chan *aheadChunk
	stop chan struct{}
	done chan struct{}
	once sync.Once

	cur *aheadChunk // being read from
	err error       // the source's error (io.EOF at its end), once reached
}

type aheadChunk struct {
	b    []byte
	r, n int // read position and fill of b
	err  error
}

const (
	aheadChunkSize = 256 << 10
	aheadChunks    = 8
)

func newHashAhead(src io.Reader) *hashAhead {
	a := &hashAhead{
		h:    sha256.New(),
		full: make(chan *aheadChunk, aheadChunks),
		free: make(chan *aheadChunk, aheadChunks),
		stop: make(chan struct{}),
		done: make(chan struct{}),
	}
	for range aheadChunks {
		a.free <- &aheadChunk{b: make([]byte, aheadChunkSize)}
	}
	go a.fill(src)
	return a
}

// fill reads src into free chunks, hashes them and queues them, until the
// source ends or fails (that chunk carries its error unchanged: a
// decompressor's io.ErrUnexpectedEOF is a truncated stream, not an end) or
// Close.
func (a *hashAhead) fill(src io.Reader) {
	defer close(a.done)
	for {
		var c *aheadChunk
		select {
		case c = <-a.free:
		case <-a.stop:
			return
		}
		n := 0
		var err error
		for n < len(c.b) && err == nil {
			var k int
			k, err = src.Read(c.b[n:])
			n += k
			select {
			case <-a.stop:
				return
			default:
			}
		}
		a.h.Write(c.b[:n])
		c.r, c.n, c.err = 0, n, err
		select {
		case a.full <- c:
		case <-a.stop:
			return
		}
		if err != nil {
			return
		}
	}
}

func (a *hashAhead) Read(p []byte) (int, error) {
	for {
		if a.cur != nil && a.cur.r < a.cur.n {
			n := copy(p, a.cur.b[a.cur.r:a.cur.n])
			a.cur.r += n
			return n, nil
		}
		if a.cur != nil {
			if a.cur.err != nil {
				a.err = a.cur.err
			} else {
				a.free <- a.cur
			}
			a.cur = nil
		}
		if a.err != nil {
			return 0, a.err
		}
		if len(p) == 0 {
			return 0, nil
		}
		select {
		case a.cur = <-a.full:
		case <-a.done:
			// fill stopped without queueing a chunk: only after Close.
			select {
			case a.cur = <-a.full:
			default:
				return 0, errAheadClosed
			}
		}
	}
}

var errAheadClosed = errors.New("converter: read of the layer stream after close")

// Sum returns the sha256 of the stream once Read has returned io.EOF.
// Called earlier, it stops reading and hashes what was read ahead, which
// is of no use but to release the goroutine.
func (a *hashAhead) Sum() []byte {
	if a.err == nil {
		a.Close() // not at the end: stop the goroutine before using h
	}
	<-a.done
	return a.h.Sum(nil)
}

// Close stops the reading goroutine and waits for it to return.
func (a *hashAhead) Close() error {
	a.once.Do(func() { close(a.stop) })
	<-a.done
	return nil
}
