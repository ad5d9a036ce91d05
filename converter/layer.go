package converter

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/converter/gunzip"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/erofs"
)

// Format is the encoding of a layer blob, detected from its first bytes.
type Format int

const (
	FormatTar   Format = iota // an uncompressed tar
	FormatGzip                // a gzip compressed tar
	FormatZstd                // a zstd compressed tar
	FormatDAXFS               // already a DAXFS layer image
)

func (f Format) String() string {
	switch f {
	case FormatTar:
		return "tar"
	case FormatGzip:
		return "gzip"
	case FormatZstd:
		return "zstd"
	case FormatDAXFS:
		return "daxfs"
	}
	return fmt.Sprintf("Format(%d)", int(f))
}

// DetectFormat classifies a blob by its first bytes (at least 4 are needed
// to tell anything but a tar).
func DetectFormat(head []byte) Format {
	switch {
	case len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b:
		return FormatGzip
	case len(head) >= 4 && binary.LittleEndian.Uint32(head) == 0xfd2fb528:
		return FormatZstd
	case daxfs.HasMagic(head):
		return FormatDAXFS
	}
	return FormatTar
}

// Content is what a layer blob holds once decompressed.
type Content int

const (
	// ContentAny: told by the bytes (operator commands take any file).
	ContentAny Content = iota
	// ContentTar: a tar, as the OCI and Docker layer media types say.
	ContentTar
	// ContentImage: a DAXFS layer image (the pre-converted media types).
	ContentImage
)

// LayerOptions tune ConvertLayer.
type LayerOptions struct {
	// Content is what the blob must hold, from its media type
	// (ContentOf). A blob holding something else is refused: a DAXFS
	// image is not taken for a tar, nor a tar for an image.
	Content Content
	// MaxSize bounds the image size in bytes (the extent the caller
	// claimed); 0 means no bound. An oversized layer fails with an error
	// wrapping ErrTooLarge, and the uncompressed stream is also bounded
	// (see maxTarSize) so a decompression bomb cannot run forever.
	MaxSize int64
	// Limits bound entries and paths.
	Limits Limits
	// Writer is passed to daxfs.NewWriter.
	Writer daxfs.WriterOptions
}

// LayerResult describes a converted layer.
type LayerResult struct {
	// DiffID is the sha256 of the uncompressed tar (of the uncompressed
	// image for a DAXFS layer image): what the image config's
	// rootfs.diff_ids hold.
	DiffID digest.Digest
	// Size is the number of image bytes written to out.
	Size int64
	// Format is the blob's detected encoding.
	Format Format
	// TarSize is the length of the uncompressed stream.
	TarSize int64
	// Entries counts the tar entries (or image inodes) converted.
	Entries int
	// DroppedXattrs counts the xattrs of tar entries that were not kept:
	// trusted.* and names outside the namespaces Linux knows.
	DroppedXattrs int
	// FirstDropped names the first of them ("entry: xattr"), for a log.
	FirstDropped string
}

// maxTrailing bounds the bytes read after a tar's end-of-archive marker
// (they count for the diffID, but a well-formed tar has at most a record's
// padding there).
const maxTrailing = 1 << 20

// maxTarSize bounds the uncompressed stream for a given image bound: a tar
// entry takes at least 512 bytes, its image form at least an inode and a
// directory entry (336 bytes), so a tar over four times the image bound
// cannot fit it (allowing generously for PAX records the image drops).
func maxTarSize(maxSize int64) int64 {
	if maxSize <= 0 {
		return 0
	}
	return 4*maxSize + maxTrailing
}

// ConvertLayer reads one layer blob from r and writes its DAXFS layer image
// to out (from offset 0), in one pass and without holding file data in
// memory. The encoding is detected from the bytes: tar, gzip or zstd
// compressed tar, or a DAXFS layer image, bare or gzip or zstd compressed,
// which is validated and copied verbatim (its diffID is the digest of the
// uncompressed image). On error nothing useful is in out and the caller
// discards it; the error names the entry at fault.
//
// Errors are classified for the caller: a layer that is malformed or
// hostile wraps ErrInvalidLayer (and errdefs.ErrInvalidArgument), one that
// does not fit MaxSize or out wraps ErrTooLarge, a failure to read r or
// write out wraps the underlying error only, and a cancelled ctx gives
// ctx.Err().
func ConvertLayer(ctx context.Context, r io.Reader, out io.WriterAt, opts LayerOptions) (LayerResult, error) {
	res, err := convertLayer(ctx, &inputReader{r: r}, out, opts)
	return res, classify(ctx, err)
}

func convertLayer(ctx context.Context, r io.Reader, out io.WriterAt, opts LayerOptions) (LayerResult, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	head, err := br.Peek(4)
	if err != nil && !errors.Is(err, io.EOF) {
		return LayerResult{}, fmt.Errorf("reading layer: %w", err)
	}
	// Compression is told by the bytes, as containerd's applier does;
	// what the stream holds is what the media type says (ContentAny:
	// told by the bytes too).
	format := DetectFormat(head)
	res := LayerResult{Format: format}
	if format == FormatDAXFS || format == FormatTar {
		format = FormatTar // not compressed
	}
	stream, closeStream, err := decompressed(br, format, 2)
	if err != nil {
		return res, err
	}
	defer closeStream()
	zb := br
	if format != FormatTar {
		zb = bufio.NewReaderSize(stream, 64<<10)
	}
	content := opts.Content
	if content == ContentAny {
		head, err := zb.Peek(4)
		if err != nil && !errors.Is(err, io.EOF) {
			return res, fmt.Errorf("%s layer: %w", format, err)
		}
		content = ContentTar
		if DetectFormat(head) == FormatDAXFS {
			content = ContentImage
		}
	}
	if content == ContentImage {
		res, err := copyImage(ctx, zb, out, opts)
		if err != nil && format != FormatTar {
			return res, fmt.Errorf("%s compressed image: %w", format, err)
		}
		return res, err
	}
	ah := newHashAhead(zb)
	defer ah.Close()
	cr := &countingReader{ctx: ctx, r: ah, limit: maxTarSize(opts.MaxSize)}
	b := newLayerBuilder(out, opts.Writer, opts.MaxSize, opts.Limits)
	if err := addTar(ctx, cr, b, format, &res); err != nil {
		return res, err
	}
	if cr.zeroTail < 512 && cr.n > 0 {
		// archive/tar reports a stream ending between two entries as
		// a clean end; a complete tar ends with zero blocks. An empty
		// stream is an empty layer, as containerd's applier takes it.
		return res, fmt.Errorf("%s layer: truncated: no end-of-archive marker after %d bytes", format, cr.n)
	}
	// The diffID covers the whole uncompressed stream, padding included;
	// reading to the end also makes gzip check its trailer.
	cr.trailing = true
	if _, err := io.Copy(io.Discard, cr); err != nil {
		return res, fmt.Errorf("%s layer: after the end of the tar: %w", format, err)
	}
	n, err := b.finish()
	if err != nil {
		return res, err
	}
	res.Size = n
	res.TarSize = cr.n
	res.Entries = b.entries
	res.DiffID = digest.NewDigestFromBytes(digest.SHA256, ah.Sum())
	return res, nil
}

// decompressed returns the uncompressed stream of a blob of format (br
// itself for a tar or an image) and a function that releases the
// decompressor. gunzip inflates in its own goroutine, ahead of the reader
// (with ISA-L where built with it), so inflating overlaps parsing, hashing
// and copying, and is most of a layer's conversion time; zstd decodes
// blocks ahead with zstdThreads goroutines.
func decompressed(br *bufio.Reader, format Format, zstdThreads int) (io.Reader, func(), error) {
	switch format {
	case FormatGzip:
		zr, err := gunzip.NewReader(br)
		if err != nil {
			return nil, nil, fmt.Errorf("gzip layer: %w", err)
		}
		return zr, func() { zr.Close() }, nil
	case FormatZstd:
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(zstdThreads))
		if err != nil {
			return nil, nil, fmt.Errorf("zstd layer: %w", err)
		}
		return zr, zr.Close, nil
	}
	return br, func() {}, nil
}

// countingReader counts the uncompressed stream and enforces the bounds on
// it (hashAhead below it hashes it).
type countingReader struct {
	// ctx is checked on every read, so that a cancelled conversion stops
	// within one read of the stream, inside a large file too.
	ctx      context.Context
	r        io.Reader
	n        int64
	limit    int64 // 0: none
	trailing bool  // past the end-of-archive marker
	trailN   int64
	// zeroTail counts the zero bytes at the end of what was read since
	// the last header was asked for: a tar reader that reports the end
	// with fewer than one zero block read ran into the end of a truncated
	// stream.
	zeroTail int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	n, err := c.r.Read(p)
	if n > 0 {
		c.n += int64(n)
		i := n
		for i > 0 && p[i-1] == 0 {
			i--
		}
		if i > 0 {
			c.zeroTail = 0
		}
		c.zeroTail += int64(n - i)
		if c.trailing {
			c.trailN += int64(n)
			if c.trailN > maxTrailing {
				return n, fmt.Errorf("more than %d bytes after the end-of-archive marker", maxTrailing)
			}
		}
		if c.limit > 0 && c.n > c.limit {
			return n, fmt.Errorf("%w: uncompressed stream longer than %d bytes", ErrTooLarge, c.limit)
		}
	}
	return n, err
}

// addTar feeds every entry of the tar read from cr to b.
func addTar(ctx context.Context, cr *countingReader, b *layerBuilder, format Format, res *LayerResult) error {
	tr := tar.NewReader(cr)
	last := ""
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		// Count only the zeros Next reads (the previous entry's padding,
		// then the end-of-archive blocks), not those ending file data.
		cr.zeroTail = 0
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				err = fmt.Errorf("truncated: %w", err)
			}
			if last == "" {
				return fmt.Errorf("%s layer: reading the first tar header: %w", format, err)
			}
			return fmt.Errorf("%s layer: reading the tar header after entry %q: %w", format, last, err)
		}
		last = hdr.Name
		if err := addTarEntry(hdr, tr, b, res); err != nil {
			if errors.Is(err, io.ErrUnexpectedEOF) {
				return fmt.Errorf("%s layer: truncated: %w", format, err)
			}
			return fmt.Errorf("%s layer: %w", format, err)
		}
	}
}

func addTarEntry(hdr *tar.Header, data io.Reader, b *layerBuilder, res *LayerResult) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // containerd ignores global PAX headers too
	}
	p, err := cleanEntryPath(hdr.Name)
	if err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if p == "" {
		// containerd's applier ignores the root entry: the root keeps
		// the snapshot directory's attributes.
		return nil
	}
	base := p[strings.LastIndexByte(p, '/')+1:]
	kind, err := classifyName(base)
	if err != nil {
		return fmt.Errorf("entry %q: %w", hdr.Name, err)
	}
	if kind != notWhiteout {
		return b.whiteout(p)
	}
	uid, err := tarOwner(hdr.Uid)
	if err != nil {
		return fmt.Errorf("entry %s: %w", quotePath(hdr.Name), err)
	}
	gid, err := tarOwner(hdr.Gid)
	if err != nil {
		return fmt.Errorf("entry %s: %w", quotePath(hdr.Name), err)
	}
	xattrs, opaque, dropped, err := tarXattrs(hdr)
	if err != nil {
		return fmt.Errorf("entry %s: %w", quotePath(hdr.Name), err)
	}
	if dropped > 0 {
		if res.DroppedXattrs == 0 {
			res.FirstDropped = quotePath(hdr.Name)
		}
		res.DroppedXattrs += dropped
	}
	h := &daxfs.Header{
		Path:    p,
		Mode:    uint32(hdr.Mode) & daxfs.ModePermMask,
		UID:     uid,
		GID:     gid,
		ModTime: boundTime(hdr.ModTime),
		Xattrs:  xattrs,
	}

	switch hdr.Typeflag {
	case tar.TypeReg: // archive/tar reads a legacy '\x00' (TypeRegA) as TypeReg
		if hdr.Size < 0 {
			return fmt.Errorf("entry %q: negative size", hdr.Name)
		}
		h.Mode |= daxfs.ModeRegular
		h.Size = hdr.Size
		return b.add(h, data)
	case tar.TypeDir:
		h.Mode |= daxfs.ModeDir
		if err := b.add(h, nil); err != nil {
			return err
		}
		if opaque {
			return b.whiteout(joinPath(p, whiteoutOpaque))
		}
		return nil
	case tar.TypeSymlink:
		if hdr.Linkname == "" {
			return fmt.Errorf("entry %q: symlink with an empty target", hdr.Name)
		}
		if strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return fmt.Errorf("entry %q: symlink target contains a NUL byte", hdr.Name)
		}
		// Linux ignores a symlink's permission bits: lchmod cannot set
		// them and every symlink shows 0777.
		h.Mode = daxfs.ModeSymlink | 0o777
		h.Linkname = hdr.Linkname
		return b.add(h, nil)
	case tar.TypeLink:
		target, err := cleanEntryPath(hdr.Linkname)
		if err != nil {
			return fmt.Errorf("entry %q: hard link target: %w", hdr.Name, err)
		}
		if target == "" || target == p {
			return fmt.Errorf("entry %q: hard link to %q", hdr.Name, hdr.Linkname)
		}
		return b.link(p, target, h)
	case tar.TypeChar, tar.TypeBlock:
		if hdr.Devmajor < 0 || hdr.Devminor < 0 || hdr.Devmajor > 1<<32-1 || hdr.Devminor > 1<<32-1 {
			return fmt.Errorf("entry %s: device number out of range", quotePath(hdr.Name))
		}
		if err := erofs.CheckDevice(unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))); err != nil {
			return fmt.Errorf("entry %s: %w", quotePath(hdr.Name), err)
		}
		if hdr.Typeflag == tar.TypeChar && hdr.Devmajor == 0 && hdr.Devminor == 0 {
			// A 0/0 character device is an overlay whiteout: once
			// extracted into a snapshot it hides the name, as the OCI
			// marker does.
			dir := ""
			if i := strings.LastIndexByte(p, '/'); i >= 0 {
				dir = p[:i]
			}
			return b.whiteout(joinPath(dir, whiteoutPrefix+base))
		}
		h.Mode |= daxfs.ModeChar
		if hdr.Typeflag == tar.TypeBlock {
			h.Mode = h.Mode&^daxfs.ModeTypeMask | daxfs.ModeBlock
		}
		h.Rdev = unix.Mkdev(uint32(hdr.Devmajor), uint32(hdr.Devminor))
		return b.add(h, nil)
	case tar.TypeFifo:
		h.Mode |= daxfs.ModeFIFO
		return b.add(h, nil)
	}
	// containerd's applier words it so (old GNU sparse files, 'S', among
	// them: archive/tar expands them, containerd does not take them).
	return fmt.Errorf("entry %s: unhandled tar header type %d", quotePath(hdr.Name), hdr.Typeflag)
}

// readIntoWindow fills buf (the start of win's bytes) from r, backing the
// window's memory as it goes, until buf is full (nil error) or r ends
// (io.EOF) or fails. A source's own io.ErrUnexpectedEOF (a decompressor's
// truncated stream) comes back as it is, never as an end.
func readIntoWindow(r io.Reader, win *daxfs.Window, buf []byte) (int, error) {
	const step = 16 << 20
	n := 0
	for n < len(buf) {
		end := min(len(buf), n+step)
		if err := win.Ensure(int64(end)); err != nil {
			return n, err
		}
		for n < end {
			k, err := r.Read(buf[n:end])
			n += k
			if err != nil {
				return n, err
			}
		}
	}
	return n, nil
}

// copyImage validates a blob that already is a DAXFS layer image and copies
// it to out unchanged. Validation needs the whole image addressable: when
// out is a Window (a region extent) the image is copied first and checked
// in place, otherwise it is read into memory (bounded by MaxSize).
func copyImage(ctx context.Context, r io.Reader, out io.WriterAt, opts LayerOptions) (LayerResult, error) {
	res := LayerResult{Format: FormatDAXFS}
	h := sha256.New()
	var img []byte
	if win, ok := out.(*daxfs.Window); ok {
		buf := win.Bytes()
		if opts.MaxSize > 0 && int64(len(buf)) > opts.MaxSize {
			buf = buf[:opts.MaxSize]
		}
		n, err := readIntoWindow(r, win, buf)
		switch {
		case errors.Is(err, io.EOF):
		case err != nil:
			return res, fmt.Errorf("daxfs layer: %w", err)
		default:
			// The image fills the output: it must end here, cleanly.
			var one [1]byte
			for {
				m, err := r.Read(one[:])
				if m > 0 {
					if opts.MaxSize > 0 && int64(len(buf)) == opts.MaxSize {
						return res, fmt.Errorf("daxfs layer: %w: longer than %d bytes", ErrTooLarge, len(buf))
					}
					// The output is the bound: the caller may retry with
					// a larger one.
					return res, fmt.Errorf("daxfs layer: %w: longer than its output of %d bytes: %w", ErrTooLarge, len(buf), daxfs.ErrNoSpace)
				}
				if errors.Is(err, io.EOF) {
					break
				}
				if err != nil {
					return res, fmt.Errorf("daxfs layer: %w", err)
				}
			}
		}
		img = buf[:n]
	} else {
		lr := r
		if opts.MaxSize > 0 {
			lr = io.LimitReader(r, opts.MaxSize+1)
		}
		var bb bytes.Buffer
		if _, err := bb.ReadFrom(lr); err != nil {
			return res, fmt.Errorf("daxfs layer: %w", err)
		}
		if opts.MaxSize > 0 && int64(bb.Len()) > opts.MaxSize {
			return res, fmt.Errorf("daxfs layer: %w: longer than %d bytes", ErrTooLarge, opts.MaxSize)
		}
		img = bb.Bytes()
	}
	if err := ctx.Err(); err != nil {
		return res, err
	}
	if err := daxfs.Validate(img); err != nil {
		return res, fmt.Errorf("daxfs layer: invalid image: %w", err)
	}
	im, err := daxfs.Open(img)
	if err != nil {
		return res, fmt.Errorf("daxfs layer: %w", err)
	}
	// A layer image stands alone: its size covers exactly the blob.
	if im.TotalSize() != uint64(len(img)) {
		return res, fmt.Errorf("daxfs layer: image total_size %d differs from the blob's %d bytes (a view, or truncated)", im.TotalSize(), len(img))
	}
	if err := opts.Limits.checkImage(im); err != nil {
		return res, fmt.Errorf("daxfs layer: %w", err)
	}
	if err := checkImageAttrs(im); err != nil {
		return res, fmt.Errorf("daxfs layer: %w", err)
	}
	if _, ok := out.(*daxfs.Window); !ok {
		if _, err := (&outputWriter{w: out}).WriteAt(img, 0); err != nil {
			return res, fmt.Errorf("daxfs layer: writing image: %w", err)
		}
	}
	h.Write(img)
	res.DiffID = digest.NewDigestFromBytes(digest.SHA256, h.Sum(nil))
	res.Size = int64(len(img))
	res.TarSize = res.Size
	res.Entries = int(im.InodeCount())
	return res, nil
}
