package converter

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
)

// TarSize returns the length of the uncompressed tar in a layer blob of
// size bytes when the blob's format tells it without decompressing: a
// plain tar is its own length, a gzip member ends with its length modulo
// 2^32 (single-member blobs, what image builders write; a larger ISIZE than
// plausible is refused), a zstd frame may state its content size. It is an
// estimate for sizing the image's region extent, never trusted further.
func TarSize(ra io.ReaderAt, size int64) (int64, bool) {
	var head [18]byte
	n, _ := ra.ReadAt(head[:], 0)
	switch DetectFormat(head[:n]) {
	case FormatTar:
		return size, true
	case FormatGzip:
		var tail [4]byte
		if size < 18 {
			return 0, false
		}
		if _, err := ra.ReadAt(tail[:], size-4); err != nil {
			return 0, false
		}
		isize := int64(binary.LittleEndian.Uint32(tail[:]))
		// Deflate compresses at most about 1032:1; below the blob's
		// size, the length wrapped past 4 GiB (or the blob has several
		// members).
		if isize < size-size/4 {
			return 0, false
		}
		return isize, true
	case FormatZstd:
		var h zstd.Header
		if err := h.Decode(head[:n]); err == nil && h.HasFCS && h.FrameContentSize <= 1<<62 {
			return int64(h.FrameContentSize), true
		}
	}
	return 0, false
}

// ContentDigest returns the digest of a layer blob's uncompressed content
// (its diffID) without converting it: what it takes to check that a blob
// is the layer a region image was made from (a tar's or a pre-converted
// image's: either way the digest of the decompressed bytes).
func ContentDigest(ctx context.Context, r io.Reader) (digest.Digest, error) {
	br := bufio.NewReaderSize(&inputReader{r: r}, 64<<10)
	head, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("reading layer: %w", err)
	}
	format := DetectFormat(head)
	if format == FormatDAXFS {
		format = FormatTar
	}
	stream, closeStream, err := decompressed(br, format, 2)
	if err != nil {
		return "", classify(ctx, err)
	}
	defer closeStream()
	h := sha256.New()
	cr := &countingReader{ctx: ctx, r: stream}
	if _, err := io.Copy(h, cr); err != nil {
		return "", classify(ctx, fmt.Errorf("%s layer: %w", format, err))
	}
	return digest.NewDigest(digest.SHA256, h), nil
}
