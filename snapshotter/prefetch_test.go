package snapshotter

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

// countingReaderAt counts ReadAt calls and can fail at an offset.
type countingReaderAt struct {
	b      []byte
	calls  int
	failAt int64
}

func (c *countingReaderAt) ReadAt(p []byte, off int64) (int, error) {
	c.calls++
	if c.failAt > 0 && off >= c.failAt {
		return 0, errors.New("injected read failure")
	}
	if off >= int64(len(c.b)) {
		return 0, io.EOF
	}
	n := copy(p, c.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func TestPrefetchReader(t *testing.T) {
	data := make([]byte, 3*prefetchChunk+12345)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, tc := range []struct {
		name    string
		size    int64
		failAt  int64
		want    []byte
		wantErr bool
	}{
		{"whole blob in few round trips", int64(len(data)), 0, data, false},
		{"empty", 0, 0, nil, false},
		{"size beyond the blob", int64(len(data)) + 10, 0, nil, true},
		{"read error surfaces", int64(len(data)), prefetchChunk, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ra := &countingReaderAt{b: data, failAt: tc.failAt}
			r := newPrefetchReader(context.Background(), ra, tc.size, 2)
			got, err := io.ReadAll(r)
			r.Close()
			if tc.wantErr {
				if err == nil {
					t.Fatalf("read %d bytes, want an error", len(got))
				}
				return
			}
			if err != nil || !bytes.Equal(got, tc.want) {
				t.Fatalf("read %d bytes, err %v; want %d bytes", len(got), err, len(tc.want))
			}
			if want := (len(tc.want) + prefetchChunk - 1) / prefetchChunk; ra.calls != want {
				t.Fatalf("%d ReadAt calls, want %d (one per chunk)", ra.calls, want)
			}
		})
	}
}

// TestPrefetchReaderCloseEarly: closing before the end stops the fetcher.
func TestPrefetchReaderCloseEarly(t *testing.T) {
	ra := &countingReaderAt{b: make([]byte, 10*prefetchChunk)}
	r := newPrefetchReader(context.Background(), ra, int64(len(ra.b)), 1)
	buf := make([]byte, 100)
	if _, err := r.Read(buf); err != nil {
		t.Fatal(err)
	}
	r.Close()
	// One consumed, one buffered, one in flight, and at most one more
	// sent while Close drains: never the whole blob.
	if ra.calls > 4 {
		t.Fatalf("%d of 10 chunks fetched after an early Close, want at most 4", ra.calls)
	}
}
