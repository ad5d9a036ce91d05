package gunzip

import (
	"bytes"
	"compress/gzip"
	"errors"
	"io"
	"math/rand"
	"testing"
	"testing/iotest"
	"time"
)

func gz(t testing.TB, data []byte) []byte {
	t.Helper()
	var b bytes.Buffer
	w := gzip.NewWriter(&b)
	if _, err := w.Write(data); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// payload is compressible but not trivially: runs of random bytes.
func payload(n int, seed int64) []byte {
	rnd := rand.New(rand.NewSource(seed))
	b := make([]byte, n)
	for i := 0; i < n; {
		run := 1 + rnd.Intn(64)
		c := byte(rnd.Intn(256))
		for j := 0; j < run && i < n; j++ {
			b[i] = c
			i++
		}
	}
	return b
}

func readAll(t *testing.T, r io.Reader) ([]byte, error) {
	t.Helper()
	zr, err := NewReader(r)
	if err != nil {
		return nil, err
	}
	defer zr.Close()
	return io.ReadAll(zr)
}

func TestReader(t *testing.T) {
	t.Logf("implementation: %s", Implementation)
	for _, n := range []int{0, 1, 4095, blockSizeForTest - 1, blockSizeForTest, blockSizeForTest + 1, 3*blockSizeForTest + 12345} {
		data := payload(n, int64(n))
		got, err := readAll(t, bytes.NewReader(gz(t, data)))
		if err != nil {
			t.Fatalf("%d bytes: %v", n, err)
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("%d bytes: got %d bytes back, not the input", n, len(got))
		}
		// One byte at a time from the underlying reader.
		got, err = readAll(t, iotest.OneByteReader(bytes.NewReader(gz(t, data[:min(n, 70000)]))))
		if err != nil || !bytes.Equal(got, data[:min(n, 70000)]) {
			t.Fatalf("%d bytes one at a time: %v", n, err)
		}
	}
}

func TestMultipleMembers(t *testing.T) {
	a, b, c := payload(100000, 1), payload(0, 2), payload(2*blockSizeForTest+7, 3)
	stream := append(append(gz(t, a), gz(t, b)...), gz(t, c)...)
	got, err := readAll(t, bytes.NewReader(stream))
	if err != nil {
		t.Fatal(err)
	}
	if want := append(append(append([]byte{}, a...), b...), c...); !bytes.Equal(got, want) {
		t.Fatalf("got %d bytes, want the %d bytes of the three members", len(got), len(want))
	}
}

func TestCorrupt(t *testing.T) {
	good := gz(t, payload(300000, 9))
	crc := append([]byte{}, good...)
	crc[len(crc)-6] ^= 0xff // the CRC-32 in the trailer
	size := append([]byte{}, good...)
	size[len(size)-2] ^= 0x01 // ISIZE
	body := append([]byte{}, good...)
	for i := 100; i < 140; i++ {
		body[i] ^= 0x5a
	}
	for _, tc := range []struct {
		name string
		in   []byte
		want error
	}{
		{"crc", crc, ErrCorrupt},
		{"isize", size, ErrCorrupt},
		{"body", body, ErrCorrupt},
		{"trailing garbage", append(append([]byte{}, good...), "this is trailing garbage, not a member"...), ErrCorrupt},
		{"truncated", good[:len(good)/2], io.ErrUnexpectedEOF},
		{"truncated trailer", good[:len(good)-3], io.ErrUnexpectedEOF},
		{"not gzip", []byte("this is not a gzip stream at all"), ErrCorrupt},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := readAll(t, bytes.NewReader(tc.in))
			if !errors.Is(err, tc.want) {
				t.Fatalf("error %v, want %v", err, tc.want)
			}
		})
	}
}

// TestReadError: an error of the underlying reader comes back wrapped,
// so the converter can tell a failing source from a corrupt layer.
func TestReadError(t *testing.T) {
	boom := errors.New("disk on fire")
	good := gz(t, payload(2*blockSizeForTest, 5))
	r := io.MultiReader(bytes.NewReader(good[:len(good)/2]), iotest.ErrReader(boom))
	_, err := readAll(t, r)
	if !errors.Is(err, boom) {
		t.Fatalf("error %v, want the reader's", err)
	}
}

// TestEarlyClose: closing before the end stops the inflater.
func TestEarlyClose(t *testing.T) {
	zr, err := NewReader(bytes.NewReader(gz(t, payload(8*blockSizeForTest, 6))))
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1000)
	if _, err := io.ReadFull(zr, buf); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { zr.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return")
	}
	// Reading after Close fails instead of blocking.
	readDone := make(chan error, 1)
	go func() {
		for {
			if _, err := zr.Read(buf); err != nil {
				readDone <- err
				return
			}
		}
	}()
	select {
	case err := <-readDone:
		if err == nil {
			t.Fatal("read after Close succeeded")
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read after Close blocked")
	}
}

// FuzzReader: whatever compress/gzip decodes, we decode the same; nothing
// panics or hangs.
func FuzzReader(f *testing.F) {
	f.Add(gz(f, []byte("hello, layer")))
	f.Add(append(gz(f, []byte("a")), gz(f, []byte("b"))...))
	f.Add([]byte{0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3})
	f.Fuzz(func(t *testing.T, in []byte) {
		var want []byte
		var wantErr error
		if zr, err := gzip.NewReader(bytes.NewReader(in)); err != nil {
			wantErr = err
		} else {
			want, wantErr = io.ReadAll(io.LimitReader(zr, 64<<20))
		}
		got, err := readAll(t, bytes.NewReader(in))
		if wantErr == nil && len(want) < 64<<20 {
			if err != nil {
				t.Fatalf("compress/gzip decodes %d bytes, we fail: %v", len(want), err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("decoded %d bytes, compress/gzip %d", len(got), len(want))
			}
		}
	})
}
