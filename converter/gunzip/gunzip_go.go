//go:build !isal || !cgo

package gunzip

import (
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/pgzip"
)

const implementation = "go"

// ErrCorrupt is wrapped by errors about the compressed data itself.
var ErrCorrupt = errors.New("gzip: corrupt stream")

func newReader(r io.Reader) (io.ReadCloser, error) {
	zr, err := pgzip.NewReader(r)
	if err != nil {
		return nil, corrupt(err)
	}
	return &goReader{Reader: zr}, nil
}

type goReader struct {
	*pgzip.Reader
	closed bool
}

var errClosed = errors.New("gzip: read after Close")

func (g *goReader) Read(p []byte) (int, error) {
	if g.closed {
		// pgzip would block.
		return 0, errClosed
	}
	n, err := g.Reader.Read(p)
	return n, corrupt(err)
}

// Close stops the decompressor. It does not close the underlying reader.
func (g *goReader) Close() error {
	g.closed = true
	return g.Reader.Close()
}

// corrupt marks errors about the data with ErrCorrupt.
func corrupt(err error) error {
	var fe flate.CorruptInputError
	switch {
	case err == nil || err == io.EOF:
		return err
	case errors.Is(err, pgzip.ErrHeader), errors.Is(err, pgzip.ErrChecksum),
		errors.Is(err, gzip.ErrHeader), errors.Is(err, gzip.ErrChecksum), errors.As(err, &fe):
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return err
}
