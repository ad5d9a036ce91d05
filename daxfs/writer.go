package daxfs

import (
	"errors"
	"io"
	"time"
)

// Header describes one entry given to Writer.Add.
type Header struct {
	// Path is slash separated and relative to the image root; a leading
	// "/" or "./" is accepted and "" or "/" names the root. A component
	// ".." is an error (ErrInvalidPath), never resolved.
	Path     string
	Mode     uint32 // full st_mode: type bits | permission bits (incl. setuid/setgid/sticky)
	UID, GID uint32
	Size     int64     // regular files: exactly this many bytes are read from the data reader
	Linkname string    // symlinks: the target
	ModTime  time.Time // stored in the extension block; the zero time is stored as 0
	Rdev     uint64    // character and block devices, in Linux dev_t encoding (unix.Mkdev)
	Xattrs   map[string][]byte
}

// WriterOptions tune a Writer. The zero value is what mkfs uses.
type WriterOptions struct {
	// NoExtension omits the extension block (mtimes, xattrs, rdev): the
	// image then holds exactly what the kernel module understands.
	NoExtension bool
}

// Writer builds a DAXFS image in one pass. Entries come in any order (tar
// order); later entries for a path replace earlier ones with the semantics
// of extracting a tar into a directory: a directory over a directory keeps
// the children and takes the new attributes, anything else replaces the
// node (and drops a replaced directory's subtree); parents that were never
// added are created as 0755 root-owned directories.
//
// File bytes are copied to the output as they arrive, page aligned, through
// one copy buffer; only metadata (names, attributes) is held in memory.
// Close writes the metadata and the superblocks. Output is deterministic for
// a given sequence of calls.
type Writer struct {
	out  io.WriterAt
	opts WriterOptions
}

// NewWriter returns a Writer that writes the image to out starting at offset
// 0. out may be a file or a Window over a byte slice.
func NewWriter(out io.WriterAt, opts WriterOptions) *Writer {
	return &Writer{out: out, opts: opts}
}

var errUnimplemented = errors.New("daxfs: not implemented")

// Add adds or replaces the entry h.Path. For a regular file, data must yield
// at least h.Size bytes; for other types data is ignored and may be nil.
func (w *Writer) Add(h *Header, data io.Reader) error { return errUnimplemented }

// Link makes path another name of the regular file (or symlink, device,
// FIFO) already at target, sharing its inode and data; nlink counts names.
// If h is not nil it sets the shared inode's attributes (a tar hard-link
// header does that); h.Path and the type bits of h.Mode are ignored.
func (w *Writer) Link(path, target string, h *Header) error { return errUnimplemented }

// AddExternal adds a regular file whose h.Size bytes are not copied but live
// outside this image's own data: at offset within external blob `ref`, whose
// position is given later by SetExternalBases. Views use it to point at file
// bytes inside layer images.
func (w *Writer) AddExternal(h *Header, ref int, offset uint64) error { return errUnimplemented }

// Remove deletes path and, for a directory, its subtree. Removing a path
// that does not exist is not an error.
func (w *Writer) Remove(path string) error { return errUnimplemented }

// Layout freezes the tree and returns the final image size in bytes. It is
// optional; Close calls it. After Layout only SetExternalBases and Close may
// be called.
func (w *Writer) Layout() (int64, error) { return 0, errUnimplemented }

// SetExternalBases gives, for each external ref, the offset of that blob's
// byte 0 relative to this image's byte 0 (so an external file's data_offset
// becomes bases[ref] + offset - BaseOffset), and the size of the whole window
// from this image's start to the end of the last blob: the image's
// total_size and base_size are written to cover it.
func (w *Writer) SetExternalBases(bases []uint64, windowSize uint64) error { return errUnimplemented }

// Close writes the metadata and superblocks and returns the image size (not
// counting an external window). The Writer cannot be used afterwards.
func (w *Writer) Close() (int64, error) { return 0, errUnimplemented }

// Window is an io.WriterAt and io.ReaderAt over a byte slice, such as an
// extent of the shared region. Writes past its end fail with ErrNoSpace and
// write nothing.
type Window struct{ b []byte }

// NewWindow returns a Window over b.
func NewWindow(b []byte) *Window { return &Window{b: b} }

// WriteAt implements io.WriterAt.
func (w *Window) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off > int64(len(w.b)) || int64(len(p)) > int64(len(w.b))-off {
		return 0, ErrNoSpace
	}
	return copy(w.b[off:], p), nil
}

// ReadAt implements io.ReaderAt.
func (w *Window) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(w.b)) {
		return 0, io.EOF
	}
	n := copy(p, w.b[off:])
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

// Bytes returns the slice the Window writes to.
func (w *Window) Bytes() []byte { return w.b }
