package converter

import (
	"fmt"
	"io"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// ErrTooLarge is wrapped by the error returned when a layer's image would
// exceed LayerOptions.MaxSize.
var ErrTooLarge = fmt.Errorf("converter: layer image exceeds the maximum size")

// layerBuilder feeds OCI-form entries to a daxfs.Writer. ConvertLayer and
// ConvertDir both go through it, so the same tree given in the same order
// produces the same sequence of Writer calls and the same bytes.
type layerBuilder struct {
	w       *daxfs.Writer
	maxSize int64 // 0: unlimited
	// estimate is a lower bound of the image size so far (page-rounded file
	// data plus one inode and one directory entry per entry), so an
	// oversized layer stops early instead of after filling its output.
	estimate int64
	entries  int
}

func newLayerBuilder(w *daxfs.Writer, maxSize int64) *layerBuilder {
	return &layerBuilder{w: w, maxSize: maxSize, estimate: 2 * daxfs.BlockSize}
}

func (b *layerBuilder) grow(path string, n int64) error {
	b.estimate += n + daxfs.InodeSize + daxfs.DirentStride
	b.entries++
	if b.maxSize > 0 && b.estimate > b.maxSize {
		return fmt.Errorf("entry %q: %w (%d bytes)", path, ErrTooLarge, b.maxSize)
	}
	return nil
}

func (b *layerBuilder) add(h *daxfs.Header, data io.Reader) error {
	n := int64(0)
	switch h.Mode & daxfs.ModeTypeMask {
	case daxfs.ModeRegular:
		n = (h.Size + daxfs.BlockSize - 1) &^ (daxfs.BlockSize - 1)
	case daxfs.ModeSymlink:
		n = int64(len(h.Linkname)) + 1
	}
	if err := b.grow(h.Path, n); err != nil {
		return err
	}
	if err := b.w.Add(h, data); err != nil {
		return fmt.Errorf("entry %q: %w", h.Path, err)
	}
	return nil
}

func (b *layerBuilder) link(path, target string, h *daxfs.Header) error {
	if err := b.grow(path, 0); err != nil {
		return err
	}
	if err := b.w.Link(path, target, h); err != nil {
		return fmt.Errorf("entry %q: hard link to %q: %w", path, target, err)
	}
	return nil
}

// whiteout adds an OCI whiteout or opaque marker. Markers get canonical
// attributes (an empty 0000 root-owned regular file with a zero mtime, what
// containerd's diff writer emits): their attributes mean nothing, and an
// overlay upper, which holds whiteouts as devices, cannot keep them.
func (b *layerBuilder) whiteout(path string) error {
	return b.add(&daxfs.Header{Path: path, Mode: daxfs.ModeRegular}, nil)
}

// finish lays the image out, checks its size and writes the metadata.
func (b *layerBuilder) finish() (int64, error) {
	size, err := b.w.Layout()
	if err != nil {
		return 0, fmt.Errorf("laying out image: %w", err)
	}
	if b.maxSize > 0 && size > b.maxSize {
		return 0, fmt.Errorf("%w: %d bytes needed, %d allowed", ErrTooLarge, size, b.maxSize)
	}
	n, err := b.w.Close()
	if err != nil {
		return 0, fmt.Errorf("writing image metadata: %w", err)
	}
	return n, nil
}
