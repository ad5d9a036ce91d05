package readahead

import (
	"bytes"
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"
)

// readerFill fills chunks from src, a few bytes at a time when src says so.
func readerFill(src io.Reader) FillFunc {
	return func(ctx context.Context, b []byte) (int, error) {
		n := 0
		var err error
		for n < len(b) && err == nil && ctx.Err() == nil {
			var k int
			k, err = src.Read(b[n:])
			n += k
		}
		return n, err
	}
}

// TestReader: the reader sees the stream in order whatever the chunk
// size, depth and read sizes, then the stream's own error.
func TestReader(t *testing.T) {
	data := make([]byte, 100_000)
	for i := range data {
		data[i] = byte(i*7 + i>>8)
	}
	boom := errors.New("boom")
	for _, tc := range []struct {
		name        string
		src         func() io.Reader
		size, depth int
		read        func(io.Reader) io.Reader
		want        []byte
		wantErr     error
	}{
		{"whole", func() io.Reader { return bytes.NewReader(data) }, 4096, 2, nil, data, nil},
		{"chunk larger than the stream", func() io.Reader { return bytes.NewReader(data) }, 1 << 20, 1, nil, data, nil},
		{"one-byte source", func() io.Reader { return iotest.OneByteReader(bytes.NewReader(data)) }, 1000, 3, nil, data, nil},
		{"one-byte reads", func() io.Reader { return bytes.NewReader(data) }, 333, 0, iotest.OneByteReader, data, nil},
		{"empty", func() io.Reader { return bytes.NewReader(nil) }, 4096, 2, nil, []byte{}, nil},
		{"error after data", func() io.Reader { return io.MultiReader(bytes.NewReader(data[:5000]), iotest.ErrReader(boom)) }, 4096, 2, nil, data[:5000], boom},
		{"unexpected EOF is kept", func() io.Reader {
			return io.MultiReader(bytes.NewReader(data[:77]), iotest.ErrReader(io.ErrUnexpectedEOF))
		}, 64, 1, nil, data[:77], io.ErrUnexpectedEOF},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := New(context.Background(), tc.size, tc.depth, readerFill(tc.src()))
			defer r.Close()
			var rd io.Reader = r
			if tc.read != nil {
				rd = tc.read(r)
			}
			got, err := io.ReadAll(rd)
			if !errors.Is(err, tc.wantErr) || !bytes.Equal(got, tc.want) {
				t.Fatalf("read %d bytes and %v; want %d bytes and %v", len(got), err, len(tc.want), tc.wantErr)
			}
			// The end is sticky.
			if _, err2 := r.Read(make([]byte, 1)); err2 != err && (err != nil || err2 != io.EOF) {
				t.Fatalf("read after the end: %v, want %v again", err2, err)
			}
		})
	}
}

// TestReaderAhead: the producer runs at most depth+1 chunks ahead of a
// reader that reads nothing, and Close stops it for good.
func TestReaderAhead(t *testing.T) {
	var fills atomic.Int64
	fill := func(ctx context.Context, b []byte) (int, error) {
		fills.Add(1)
		return len(b), nil // an endless stream
	}
	r := New(context.Background(), 16, 3, fill)
	deadline := time.Now().Add(5 * time.Second)
	for fills.Load() < 4 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond) // room to overrun, if it would
	if n := fills.Load(); n != 4 {
		t.Fatalf("%d chunks filled ahead of a reader that read nothing; want depth+1 = 4", n)
	}
	buf := make([]byte, 16)
	if _, err := io.ReadFull(r, buf); err != nil {
		t.Fatal(err)
	}
	r.Close()
	n := fills.Load()
	time.Sleep(20 * time.Millisecond)
	if fills.Load() != n {
		t.Fatal("the producer ran on after Close")
	}
	for {
		if _, err := r.Read(buf); err != nil {
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("read after Close: %v, want ErrClosed", err)
			}
			break
		}
	}
}

// TestReaderContext: cancelling the caller's context stops the producer,
// and the reader gets the context's error instead of blocking.
func TestReaderContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	started := make(chan struct{})
	fill := func(ctx context.Context, b []byte) (int, error) {
		select {
		case <-started:
		default:
			close(started)
		}
		<-ctx.Done() // a producer blocked until cancelled
		return 0, ctx.Err()
	}
	r := New(ctx, 16, 1, fill)
	defer r.Close()
	<-started
	cancel()
	if _, err := r.Read(make([]byte, 1)); !errors.Is(err, context.Canceled) {
		t.Fatalf("read after cancel: %v, want context.Canceled", err)
	}
}

// TestReaderWaited: time spent waiting for a slow producer is counted.
func TestReaderWaited(t *testing.T) {
	sent := false
	fill := func(ctx context.Context, b []byte) (int, error) {
		if sent {
			return 0, io.EOF
		}
		time.Sleep(20 * time.Millisecond)
		sent = true
		return copy(b, "slow"), nil
	}
	r := New(context.Background(), 16, 1, fill)
	defer r.Close()
	if got, err := io.ReadAll(r); err != nil || string(got) != "slow" {
		t.Fatalf("%q %v", got, err)
	}
	if r.Waited() < 10*time.Millisecond {
		t.Fatalf("waited %v for a producer that took 20ms", r.Waited())
	}
}
