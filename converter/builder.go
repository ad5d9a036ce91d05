package converter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
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
	case errors.Is(err, ErrTooLarge), errors.Is(err, ErrInvalidLayer), errors.As(err, &ioe):
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
	// estimate is a lower bound of the image size so far (page-rounded file
	// data plus one inode and one directory entry per entry), so an
	// oversized layer stops early instead of after filling its output.
	estimate int64
	entries  int
	// dirs records directory paths: explicit when an entry made them,
	// not when the Writer created them as missing parents.
	dirs map[string]dirState
	gen  uint64
}

func newLayerBuilder(w *daxfs.Writer, maxSize int64) *layerBuilder {
	return &layerBuilder{w: w, maxSize: maxSize, estimate: 2 * daxfs.BlockSize, dirs: make(map[string]dirState)}
}

// ImplicitDirXattr marks, in a layer image, a directory that no entry of
// the layer made: the Writer created it as a missing parent. A view keeps
// the attributes of the directory below it instead, as containerd's
// applier copies a lower directory's attributes into a parent it has to
// create. The trusted namespace keeps it from unprivileged eyes; views
// never carry it.
const ImplicitDirXattr = "trusted.daxfs.implicit"

// noted records that p was added (as a directory or not) so that the
// parents the Writer made for it can be marked. Directories carry a
// generation and their parent's generation at creation, so that a subtree
// dropped when its directory was replaced is recognised as stale without
// walking it (a hostile tar could otherwise make this quadratic).
func (b *layerBuilder) noted(p string, isDir bool) {
	parent := parentPath(p)
	b.ensureDir(parent)
	if !isDir {
		delete(b.dirs, p)
		return
	}
	if st, ok := b.dirs[p]; ok && st.parentGen == b.genOf(parent) {
		st.explicit = true
		b.dirs[p] = st
		return
	}
	b.gen++
	b.dirs[p] = dirState{explicit: true, gen: b.gen, parentGen: b.genOf(parent)}
}

// ensureDir records the directories up to p that the Writer made as
// missing parents, top down.
func (b *layerBuilder) ensureDir(p string) {
	if p == "" {
		return
	}
	b.ensureDir(parentPath(p))
	pg := b.genOf(parentPath(p))
	if st, ok := b.dirs[p]; ok && st.parentGen == pg {
		return
	}
	b.gen++
	b.dirs[p] = dirState{gen: b.gen, parentGen: pg}
}

func (b *layerBuilder) genOf(p string) uint64 {
	if p == "" {
		return 0
	}
	return b.dirs[p].gen
}

// live reports whether the recorded directory p is still in the tree.
func (b *layerBuilder) live(p string) bool {
	for ; p != ""; p = parentPath(p) {
		st, ok := b.dirs[p]
		if !ok || st.parentGen != b.genOf(parentPath(p)) {
			return false
		}
	}
	return true
}

type dirState struct {
	explicit       bool
	gen, parentGen uint64
}

func parentPath(p string) string {
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		return p[:i]
	}
	return ""
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
	b.noted(h.Path, h.Mode&daxfs.ModeTypeMask == daxfs.ModeDir)
	return nil
}

func (b *layerBuilder) link(path, target string, h *daxfs.Header) error {
	if err := b.grow(path, 0); err != nil {
		return err
	}
	if err := b.w.Link(path, target, h); err != nil {
		return fmt.Errorf("entry %q: hard link to %q: %w", path, target, err)
	}
	b.noted(path, false)
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
	var implicit []string
	for p, st := range b.dirs {
		if !st.explicit && b.live(p) {
			implicit = append(implicit, p)
		}
	}
	sort.Strings(implicit)
	for _, p := range implicit {
		// A directory over a directory keeps its children: this only
		// sets the marker on the Writer's default attributes.
		h := &daxfs.Header{Path: p, Mode: daxfs.ModeDir | 0o755, Xattrs: map[string][]byte{ImplicitDirXattr: []byte("1")}}
		if err := b.w.Add(h, nil); err != nil {
			return 0, fmt.Errorf("marking implicit directory %q: %w", p, err)
		}
	}
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
