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
	return &goReader{zr}, nil
}

type goReader struct{ *pgzip.Reader }

func (g *goReader) Read(p []byte) (int, error) {
	n, err := g.Reader.Read(p)
	return n, corrupt(err)
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
