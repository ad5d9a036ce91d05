package converter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/containerd/errdefs"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// Error classes. Errors returned by ConvertLayer and ConvertDir wrap one of
// these (or are I/O errors of the input or output, or the context's): the
// caller maps them to its own terms without parsing messages.
var (
	// ErrInvalidLayer: the layer is malformed or hostile (bad
	// compression, bad tar, path traversal, bad names, corrupt image).
	ErrInvalidLayer error = &classError{"invalid layer", errdefs.ErrInvalidArgument}
	// ErrTooLarge: the image would exceed LayerOptions.MaxSize or does
	// not fit its output.
	ErrTooLarge error = &classError{"layer image exceeds the maximum size", errdefs.ErrResourceExhausted}
)

// classError is an error class that is also one of containerd's errdefs.
type classError struct {
	msg   string
	errno error
}

func (e *classError) Error() string { return e.msg }
func (e *classError) Unwrap() error { return e.errno }

// ioError marks a failure to read the input blob or write the output: not
// the layer's fault.
type ioError struct{ err error }

func (e *ioError) Error() string { return e.err.Error() }
func (e *ioError) Unwrap() error { return e.err }

type inputReader struct{ r io.Reader }

func (i *inputReader) Read(p []byte) (int, error) {
	n, err := i.r.Read(p)
	if err != nil && err != io.EOF {
		err = &ioError{fmt.Errorf("reading layer blob: %w", err)}
	}
	return n, err
}

type outputWriter struct{ w io.WriterAt }

func (o *outputWriter) WriteAt(p []byte, off int64) (int, error) {
	n, err := o.w.WriteAt(p, off)
	if err != nil {
		if errors.Is(err, daxfs.ErrNoSpace) {
			return n, fmt.Errorf("%w: writing %d bytes at %d: %w", ErrTooLarge, len(p), off, err)
		}
		err = &ioError{fmt.Errorf("writing image: %w", err)}
	}
	return n, err
}

// classify makes err wrap ErrInvalidLayer unless it is already classified.
func classify(ctx context.Context, err error) error {
	var ioe *ioError
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)):
		return err
	case errors.Is(err, ErrTooLarge), errors.Is(err, ErrInvalidLayer), errors.Is(err, ErrLimit), errors.As(err, &ioe):
		return err
	case errors.Is(err, daxfs.ErrBacking):
		// The output could not get memory (region or tmpfs full).
		return &ioError{err}
	}
	return fmt.Errorf("%w: %w", ErrInvalidLayer, err)
}

// layerBuilder feeds OCI-form entries to a daxfs.Writer. ConvertLayer and
// ConvertDir both go through it, so the same tree given in the same order
// produces the same sequence of Writer calls and the same bytes.
type layerBuilder struct {
	w       *daxfs.Writer
	maxSize int64 // 0: unlimited
	limits  Limits
	// estimate is a lower bound of the image size so far (page-rounded file
	// data plus one inode and one directory entry per entry), so an
	// oversized layer stops early instead of after filling its output.
	estimate int64
	entries  int
}

// newLayerBuilder returns a builder writing to out. The Writer marks the
// directories it creates as missing parents (ImplicitDirXattr).
func newLayerBuilder(out io.WriterAt, opts daxfs.WriterOptions, maxSize int64, limits Limits) *layerBuilder {
	opts.ImplicitDirXattr = ImplicitDirXattr
	return &layerBuilder{
		w:        daxfs.NewWriter(&outputWriter{w: out}, opts),
		maxSize:  maxSize,
		limits:   limits.withDefaults(),
		estimate: 2 * daxfs.BlockSize,
	}
}

// ImplicitDirXattr marks, in a layer image, a directory that no entry of
// the layer made: the Writer created it as a missing parent. A view keeps
// the attributes of the directory below it instead, as containerd's
// applier copies a lower directory's attributes into a parent it has to
// create. The trusted namespace keeps it from unprivileged eyes; views
// never carry it.
const ImplicitDirXattr = "trusted.daxfs.implicit"

// checkPath applies the path limits to a clean entry path.
func (b *layerBuilder) checkPath(p string) error {
	if len(p) > b.limits.MaxPathLen {
		return fmt.Errorf("%w: path of %d bytes exceeds the limit of %d (limits.max_path_len)", ErrLimit, len(p), b.limits.MaxPathLen)
	}
	// Components, counted without allocating: a path within the length
	// limit is walked once.
	if depth := strings.Count(p, "/") + 1; depth > b.limits.MaxDepth {
		return fmt.Errorf("%w: path of %d components exceeds the limit of %d (limits.max_depth)", ErrLimit, depth, b.limits.MaxDepth)
	}
	return nil
}

func (b *layerBuilder) grow(path string, n int64) error {
	b.estimate += n + daxfs.InodeSize + daxfs.DirentStride
	b.entries++
	if b.maxSize > 0 && b.estimate > b.maxSize {
		return fmt.Errorf("entry %s: %w (%d bytes)", quotePath(path), ErrTooLarge, b.maxSize)
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
	if err := b.checkPath(h.Path); err != nil {
		return fmt.Errorf("entry %s: %w", quotePath(h.Path), err)
	}
	if err := b.w.Add(h, data); err != nil {
		return fmt.Errorf("entry %s: %w", quotePath(h.Path), err)
	}
	return b.checkNames(h.Path)
}

// checkNames applies the entry limit to the names the Writer holds: one
// entry adds as many as its missing parents.
func (b *layerBuilder) checkNames(path string) error {
	if n := b.w.Names(); n > b.limits.MaxEntries {
		return fmt.Errorf("entry %s: %w: more than %d names (limits.max_entries)", quotePath(path), ErrLimit, b.limits.MaxEntries)
	}
	return nil
}

func (b *layerBuilder) link(path, target string, h *daxfs.Header) error {
	if err := b.grow(path, 0); err != nil {
		return err
	}
	if err := b.checkPath(path); err != nil {
		return fmt.Errorf("entry %s: %w", quotePath(path), err)
	}
	if err := b.w.Link(path, target, h); err != nil {
		return fmt.Errorf("entry %s: hard link to %s: %w", quotePath(path), quotePath(target), err)
	}
	return b.checkNames(path)
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
