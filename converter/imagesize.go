package converter

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// ImageSize reads the head of a layer blob and, when the blob is a DAXFS
// layer image, bare or gzip or zstd compressed (a pre-converted layer),
// returns the total size its superblock states, with ok set. Other blobs
// (tars) give ok false. A caller sizing the region extent for a
// pre-converted layer uses it instead of a guess from the blob's size: a
// compressed image of many small files can be dozens of times its blob.
// The size is the image's claim, not a check: ConvertLayer still validates
// the whole image, and fails on one longer than its output.
func ImageSize(r io.Reader) (size int64, ok bool, err error) {
	br := bufio.NewReaderSize(r, 4096)
	head, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return 0, false, fmt.Errorf("reading layer: %w", err)
	}
	format := DetectFormat(head)
	if format == FormatTar {
		return 0, false, nil
	}
	stream, closeStream, err := decompressed(br, format, 1)
	if err != nil {
		return 0, false, err
	}
	defer closeStream()
	var sb [64]byte // past the superblock's total size
	n, err := io.ReadFull(stream, sb[:])
	if err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrUnexpectedEOF) {
		return 0, false, fmt.Errorf("reading layer: %w", err)
	}
	total, ok := daxfs.StatedSize(sb[:n])
	if !ok {
		return 0, false, nil // too short to be an image, or not one
	}
	if total == 0 || total > 1<<62 {
		return 0, false, fmt.Errorf("daxfs layer: superblock states a total size of %d bytes", total)
	}
	return int64(total), true, nil
}
