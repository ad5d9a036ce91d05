package erofs

import (
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// Errors Write returns wrap one of these (test with errors.Is) and name the
// path or inode concerned. Either way the image cannot be mounted through
// erofs as it stands; the caller serves it some other way.
var (
	// ErrUnaligned: a regular file's data does not start on a block
	// boundary of the data device.
	ErrUnaligned = errors.New("erofs: file data not aligned to 4096 bytes in the data device")
	// ErrUnsupported: something EROFS cannot represent (an xattr name
	// without a known prefix, a value over 65535 bytes, a device number
	// or a size out of range, an image too large).
	ErrUnsupported = errors.New("erofs: not representable in EROFS")
	// ErrInvalid: bad Options, or an image whose tree is inconsistent.
	ErrInvalid = errors.New("erofs: invalid input")
)

// Options place the DAXFS image in the data device.
type Options struct {
	// DataOffset is the byte offset, in the data device (the region
	// file), of the DAXFS image's byte 0. A multiple of 4096.
	DataOffset int64
	// DataSize is the data device's size in bytes (recorded in the
	// device table; a multiple of 4096).
	DataSize int64
}

// On-disk constants, from the kernel's fs/erofs/erofs_fs.h.
const (
	blockSize  = 4096
	blkszBits  = 12
	superOff   = 1024
	superMagic = 0xE0F5E1E2
	// The superblock struct is 128 bytes (144 on recent kernels, the
	// tail read only with features we do not set); the device slot goes
	// past both.
	devSlotOff  = 1280
	devSlotSize = 128
	metaStart   = devSlotOff + devSlotSize
	inodeSize   = 64 // struct erofs_inode_extended
	slotSize    = 32 // nid unit
	direntSize  = 12
	xattrHdr    = 12 // struct erofs_xattr_ibody_header
	xattrEntHdr = 4  // struct erofs_xattr_entry
	chunkIdx    = 8  // struct erofs_inode_chunk_index

	incompatChunkedFile = 0x04
	incompatDeviceTable = 0x08

	layoutFlatPlain  = 0
	layoutFlatInline = 2
	layoutChunkBased = 4

	chunkFormatIndexes = 0x20
	maxChunkBlkBits    = 31 // EROFS_CHUNK_FORMAT_BLKBITS_MASK

	nullAddr = 0xFFFFFFFF // EROFS_NULL_ADDR: a hole

	maxXattrValue = 65535
	maxXattrBody  = xattrHdr + 4*(65535-1) // i_xattr_icount is 16 bits
)

// File types of erofs_dirent (the kernel's FT_*).
const (
	ftRegular = 1
	ftDir     = 2
	ftChar    = 3
	ftBlock   = 4
	ftFIFO    = 5
	ftSocket  = 6
	ftSymlink = 7
)

var le = binary.LittleEndian

type dentry struct {
	name string
	n    *node
}

// node is one inode of the output.
type node struct {
	in     daxfs.Inode
	name   string // where it was first found (for errors): name in up
	up     *node  // nil for the root; for directories also ".."
	xattrs []byte // encoded xattr entries, without the ibody header
	layout int
	target []byte // symlinks

	// directories: entries sorted by name, "." and ".." included, and
	// how many go in each block
	ents    []dentry
	perBlk  []int
	dirSize int64

	iu   uint32 // i_u: start block, rdev or chunk format
	data uint32 // regular files: the data block in the data device
	pos  int64  // byte offset of the inode in the image
	blk  uint32 // directories and plain symlinks: first data block
	mt   daxfs.Timespec
}

// path is where n was first found.
func (n *node) path() string {
	if n.up == nil {
		return "/"
	}
	if n.up.up == nil {
		return "/" + n.name
	}
	return n.up.path() + "/" + n.name
}

func (n *node) fail(err error) error {
	return fmt.Errorf("%s (inode %d): %w", n.path(), n.in.Ino, err)
}

func (n *node) xattrSize() int64 {
	if len(n.xattrs) == 0 {
		return 0
	}
	return xattrHdr + int64(len(n.xattrs))
}

// recordSize is the inode with what follows it in the metadata area.
func (n *node) recordSize() int64 {
	s := inodeSize + n.xattrSize()
	switch {
	case n.layout == layoutChunkBased && n.in.Size > 0:
		s = alignUp(s, chunkIdx) + chunkIdx
	case n.layout == layoutFlatInline:
		s += int64(len(n.target))
	}
	return s
}

func (n *node) dataBlocks() int64 {
	switch {
	case n.in.IsDir():
		return int64(len(n.perBlk))
	case n.in.IsSymlink() && n.layout == layoutFlatPlain:
		return 1
	}
	return 0
}

func alignUp(v, a int64) int64 { return (v + a - 1) / a * a }

// Write writes an EROFS image indexing img (opened with daxfs.Open over
// the image's bytes, or the whole window for a view) to w and returns the
// number of bytes written. A file's data lies at byte DataOffset +
// daxfs.BaseOffset + inode.DataOffset of the data device (DAXFS inode data
// offsets count from the base image); for every non-empty regular file
// that must be a multiple of 4096, otherwise Write fails with an error
// wrapping ErrUnaligned and naming the path (the caller then falls back to
// FUSE). Regular files' data is never read: only their inodes' DataOffset
// and Size are used. The image is built in memory (about 170 bytes per
// inode) and written with one Write call; on error nothing is written.
func Write(w io.Writer, img *daxfs.Image, opts Options) (int64, error) {
	b, err := build(img, opts)
	if err != nil {
		return 0, err
	}
	n, err := w.Write(b)
	if err != nil {
		return int64(n), fmt.Errorf("erofs: writing the image: %w", err)
	}
	return int64(n), nil
}

func build(img *daxfs.Image, opts Options) ([]byte, error) {
	switch {
	case opts.DataOffset < 0 || opts.DataOffset%blockSize != 0:
		return nil, fmt.Errorf("%w: data offset %d is not a non-negative multiple of %d", ErrInvalid, opts.DataOffset, blockSize)
	case opts.DataSize <= 0 || opts.DataSize%blockSize != 0:
		return nil, fmt.Errorf("%w: data device size %d is not a positive multiple of %d", ErrInvalid, opts.DataSize, blockSize)
	case opts.DataSize/blockSize > nullAddr:
		return nil, fmt.Errorf("%w: data device of %d bytes has more than 2^32-1 blocks", ErrUnsupported, opts.DataSize)
	}
	b := newBuilder(img, opts)
	if err := b.walk(); err != nil {
		return nil, err
	}
	if err := b.place(); err != nil {
		return nil, err
	}
	return b.encode(), nil
}

type builder struct {
	img    *daxfs.Image
	opts   Options
	nodes  []*node // by DAXFS inode number
	order  []*node // root first, then breadth first
	blocks int64   // image size in blocks
}

func newBuilder(img *daxfs.Image, opts Options) *builder {
	// Open checked that the inode table fits the image, so this is at
	// most an eighth of the image's size.
	return &builder{img: img, opts: opts, nodes: make([]*node, img.InodeCount()+1)}
}

// walk visits the tree breadth first from the root and prepares every
// inode (xattrs, symlink targets, directory entries, data placement).
func (b *builder) walk() error {
	root, err := b.add(daxfs.RootIno, "", nil)
	if err != nil {
		return err
	}
	if !root.in.IsDir() {
		return root.fail(fmt.Errorf("%w: the root is not a directory", ErrInvalid))
	}
	for i := 0; i < len(b.order); i++ {
		d := b.order[i]
		if !d.in.IsDir() {
			continue
		}
		ents, err := b.img.ReadDir(d.in.Ino)
		if err != nil {
			return d.fail(err)
		}
		d.ents = make([]dentry, 0, len(ents)+2)
		up := d.up
		if up == nil {
			up = d
		}
		d.ents = append(d.ents, dentry{".", d}, dentry{"..", up})
		for _, e := range ents {
			if e.Name == "" || e.Name == "." || e.Name == ".." || len(e.Name) > daxfs.MaxNameLen || strings.ContainsAny(e.Name, "/\x00") {
				return d.fail(fmt.Errorf("%w: bad entry name %q", ErrInvalid, e.Name))
			}
			if e.Ino == 0 || e.Ino >= uint32(len(b.nodes)) {
				return d.fail(fmt.Errorf("%w: entry %q: inode %d of %d", ErrInvalid, e.Name, e.Ino, len(b.nodes)-1))
			}
			c := b.nodes[e.Ino]
			switch {
			case c == nil:
				var err error
				if c, err = b.add(e.Ino, e.Name, d); err != nil {
					return err
				}
			case c.in.IsDir():
				return d.fail(fmt.Errorf("%w: entry %q: directory inode %d linked twice (also at %s)", ErrInvalid, e.Name, e.Ino, c.path()))
			}
			d.ents = append(d.ents, dentry{e.Name, c})
		}
		sort.Slice(d.ents, func(i, j int) bool { return d.ents[i].name < d.ents[j].name })
		for j := 1; j < len(d.ents); j++ {
			if d.ents[j].name == d.ents[j-1].name {
				return d.fail(fmt.Errorf("%w: entry %q appears twice", ErrInvalid, d.ents[j].name))
			}
		}
		// Fill each block with as many dirents and names as fit.
		used, k := 0, 0
		for _, e := range d.ents {
			need := direntSize + len(e.name)
			if used+need > blockSize {
				d.perBlk = append(d.perBlk, k)
				used, k = 0, 0
			}
			used += need
			k++
		}
		d.perBlk = append(d.perBlk, k)
		d.dirSize = int64(len(d.perBlk)-1)*blockSize + int64(used)
	}
	return nil
}

// add prepares inode ino, first found as name in directory up.
func (b *builder) add(ino uint32, name string, up *node) (*node, error) {
	n := &node{in: daxfs.Inode{Ino: ino}, name: name, up: up}
	in, err := b.img.Inode(ino)
	if err != nil {
		return nil, n.fail(err)
	}
	n.in = in
	if n.in.Mode&^(daxfs.ModeTypeMask|daxfs.ModePermMask) != 0 {
		return nil, n.fail(fmt.Errorf("%w: mode %#o", ErrInvalid, n.in.Mode))
	}
	n.mt, _ = b.img.ModTime(ino)
	xs, err := b.img.Xattrs(ino)
	if err != nil {
		return nil, n.fail(err)
	}
	if n.xattrs, err = encodeXattrs(xs); err != nil {
		return nil, n.fail(err)
	}
	switch in.Mode & daxfs.ModeTypeMask {
	case daxfs.ModeDir:
		n.layout = layoutFlatPlain
	case daxfs.ModeRegular:
		if err := b.placeData(n); err != nil {
			return nil, n.fail(err)
		}
	case daxfs.ModeSymlink:
		t, err := b.img.Readlink(ino)
		if err != nil {
			return nil, n.fail(err)
		}
		if len(t) == 0 || len(t) >= blockSize {
			return nil, n.fail(fmt.Errorf("%w: symlink target of %d bytes", ErrUnsupported, len(t)))
		}
		n.target = t
		// Inline (a "fast symlink": no data block, no page cache
		// page) when the inode, its xattrs and the target fit a block.
		n.layout = layoutFlatInline
		if n.recordSize() > blockSize {
			n.layout = layoutFlatPlain
		}
	case daxfs.ModeChar, daxfs.ModeBlock:
		n.layout = layoutFlatPlain
		rdev, err := encodeDev(b.img.Rdev(ino))
		if err != nil {
			return nil, n.fail(err)
		}
		n.iu = rdev
	case daxfs.ModeFIFO, daxfs.ModeSocket:
		n.layout = layoutFlatPlain
	default:
		return nil, n.fail(fmt.Errorf("%w: unknown file type in mode %#o", ErrInvalid, in.Mode))
	}
	if !in.IsRegular() && !in.IsSymlink() && !in.IsDir() && in.Size != 0 {
		return nil, n.fail(fmt.Errorf("%w: special file of size %d", ErrInvalid, in.Size))
	}
	b.nodes[ino] = n
	b.order = append(b.order, n)
	return n, nil
}

// placeData finds a regular file's data block in the data device and the
// chunk size that makes one chunk cover the file.
func (b *builder) placeData(n *node) error {
	n.layout = layoutChunkBased
	n.iu = chunkFormatIndexes
	size := n.in.Size
	if size == 0 {
		return nil // no chunk: every read is past the end
	}
	const maxOff = 1 << 62
	if n.in.DataOffset > maxOff || size > maxOff {
		return fmt.Errorf("%w: data (%d bytes at %d) out of range", ErrInvalid, size, n.in.DataOffset)
	}
	// Inode data offsets count from the base image, BaseOffset bytes
	// into the image.
	addr := b.opts.DataOffset + daxfs.BaseOffset + int64(n.in.DataOffset)
	if addr%blockSize != 0 {
		return fmt.Errorf("%w: data starts at byte %d of the data device (image at %d, base image at +%d, data at +%d)", ErrUnaligned, addr, b.opts.DataOffset, daxfs.BaseOffset, n.in.DataOffset)
	}
	if end := addr + int64(size); end > b.opts.DataSize {
		return fmt.Errorf("%w: data (%d bytes at byte %d) ends past the data device's %d bytes", ErrInvalid, size, addr, b.opts.DataSize)
	}
	// Nor past the image's own bytes (a view's window, which includes
	// its layers): a corrupt image must not expose other images of the
	// region, which FUSE, reading through the window, cannot either.
	if end := int64(n.in.DataOffset) + daxfs.BaseOffset + int64(size); end > int64(len(b.img.Bytes())) {
		return fmt.Errorf("%w: data (%d bytes at byte %d of the image) ends past the image's %d bytes", ErrInvalid, size, int64(n.in.DataOffset)+daxfs.BaseOffset, len(b.img.Bytes()))
	}
	bits := uint(blkszBits)
	for uint64(1)<<bits < size {
		bits++
	}
	if bits-blkszBits > maxChunkBlkBits {
		return fmt.Errorf("%w: file of %d bytes is larger than one chunk can be", ErrUnsupported, size)
	}
	n.iu |= uint32(bits - blkszBits)
	n.data = uint32(addr / blockSize) // < DataSize/4096 <= 2^32-1
	return nil
}

// place assigns every inode its byte offset (and so its nid) and every
// directory and plain symlink its data blocks.
func (b *builder) place() error {
	pos := int64(metaStart)
	for _, n := range b.order {
		size := n.recordSize()
		pos = alignUp(pos, slotSize)
		if size <= blockSize && pos%blockSize+size > blockSize {
			pos = alignUp(pos, blockSize)
		}
		n.pos = pos
		pos += size
	}
	if root := b.order[0]; root.pos/slotSize > 0xFFFF {
		return root.fail(fmt.Errorf("%w: root nid %d does not fit 16 bits", ErrUnsupported, root.pos/slotSize))
	}
	blk := alignUp(pos, blockSize) / blockSize
	for _, n := range b.order {
		if k := n.dataBlocks(); k > 0 {
			if blk > nullAddr-1 {
				break // reported below
			}
			n.blk = uint32(blk)
			blk += k
		}
	}
	if blk > nullAddr-1 {
		return fmt.Errorf("%w: metadata image of %d blocks", ErrUnsupported, blk)
	}
	b.blocks = blk
	return nil
}

func (n *node) nid() uint64 { return uint64(n.pos / slotSize) }

// encode lays out the image in memory.
func (b *builder) encode() []byte {
	out := make([]byte, b.blocks*blockSize)
	for _, n := range b.order {
		b.encodeInode(out, n)
	}

	// The device slot. Its mapped_blkaddr (uniaddr) matters only when
	// the image is mounted without device=: the kernel then reads chunks
	// of device 1 from the metadata device at uniaddr + block. Past the
	// image's end, such reads fail (EIO) instead of returning metadata
	// bytes as file content. With device= it is unused for our chunks
	// (they name their device), and it lies past every metadata block.
	ds := out[devSlotOff : devSlotOff+devSlotSize]
	le.PutUint32(ds[64:], uint32(b.opts.DataSize/blockSize)) // blocks
	le.PutUint32(ds[68:], uint32(b.blocks))                  // mapped_blkaddr

	sb := out[superOff : superOff+128]
	le.PutUint32(sb[0:], superMagic)
	sb[12] = blkszBits
	le.PutUint16(sb[14:], uint16(b.order[0].nid()))
	le.PutUint64(sb[16:], uint64(len(b.order))) // inos
	le.PutUint32(sb[36:], uint32(b.blocks))     // blocks
	le.PutUint32(sb[40:], 0)                    // meta_blkaddr
	le.PutUint32(sb[80:], incompatChunkedFile|incompatDeviceTable)
	le.PutUint16(sb[86:], 1)                      // extra_devices
	le.PutUint16(sb[88:], devSlotOff/devSlotSize) // devt_slotoff
	// A stable uuid from the content: the same metadata gets the same
	// uuid, different metadata (or placement) a different one.
	sum := sha256.Sum256(out)
	u := sb[48:64]
	copy(u, sum[:16])
	u[6] = u[6]&0x0f | 0x80 // version 8 (custom)
	u[8] = u[8]&0x3f | 0x80 // RFC 4122 variant
	return out
}

func (b *builder) encodeInode(out []byte, n *node) {
	in := n.in
	r := out[n.pos:]
	le.PutUint16(r[0:], uint16(1|n.layout<<1)) // extended inode
	if len(n.xattrs) > 0 {
		le.PutUint16(r[2:], uint16(1+len(n.xattrs)/4))
	}
	le.PutUint16(r[4:], uint16(in.Mode))
	size := in.Size
	iu := n.iu
	switch {
	case in.IsDir():
		size = uint64(n.dirSize)
		iu = n.blk
		b.encodeDir(out[int64(n.blk)*blockSize:], n)
	case in.IsSymlink():
		size = uint64(len(n.target))
		if n.layout == layoutFlatPlain {
			iu = n.blk
			copy(out[int64(n.blk)*blockSize:], n.target)
		} else {
			copy(r[inodeSize+n.xattrSize():], n.target)
		}
	case !in.IsRegular():
		size = 0
	}
	le.PutUint64(r[8:], size)
	le.PutUint32(r[16:], iu)
	le.PutUint32(r[20:], in.Ino)
	le.PutUint32(r[24:], in.UID)
	le.PutUint32(r[28:], in.GID)
	le.PutUint64(r[32:], uint64(n.mt.Sec))
	le.PutUint32(r[40:], n.mt.Nsec)
	le.PutUint32(r[44:], in.Nlink)
	if len(n.xattrs) > 0 {
		// The ibody header stays zero: no name filter, no shared xattrs.
		copy(r[inodeSize+xattrHdr:], n.xattrs)
	}
	if in.IsRegular() && in.Size > 0 {
		ci := r[alignUp(inodeSize+n.xattrSize(), chunkIdx):]
		le.PutUint16(ci[0:], 0) // startblk_hi (48-bit layout only)
		le.PutUint16(ci[2:], 1) // device_id: the first extra device
		le.PutUint32(ci[4:], n.data)
	}
}

// encodeDir writes directory n's blocks at out: in each block the dirents,
// then their names (not NUL terminated; the first dirent's nameoff gives
// the count), then zeros.
func (b *builder) encodeDir(out []byte, n *node) {
	ents := n.ents
	for bi, k := range n.perBlk {
		blk := out[bi*blockSize : (bi+1)*blockSize]
		nameoff := direntSize * k
		for j, e := range ents[:k] {
			d := blk[j*direntSize:]
			le.PutUint64(d[0:], e.n.nid())
			le.PutUint16(d[8:], uint16(nameoff))
			d[10] = fileType(e.n.in.Mode)
			nameoff += copy(blk[nameoff:], e.name)
		}
		ents = ents[k:]
	}
}

func fileType(mode uint32) uint8 {
	switch mode & daxfs.ModeTypeMask {
	case daxfs.ModeRegular:
		return ftRegular
	case daxfs.ModeDir:
		return ftDir
	case daxfs.ModeChar:
		return ftChar
	case daxfs.ModeBlock:
		return ftBlock
	case daxfs.ModeFIFO:
		return ftFIFO
	case daxfs.ModeSocket:
		return ftSocket
	case daxfs.ModeSymlink:
		return ftSymlink
	}
	return 0
}

// xattrPrefixes are the name indexes erofs knows (EROFS_XATTR_INDEX_*).
// The POSIX ACL names are whole names: their suffix is empty.
var xattrPrefixes = []struct {
	prefix string
	index  uint8
	whole  bool
}{
	{"user.", 1, false},
	{"system.posix_acl_access", 2, true},
	{"system.posix_acl_default", 3, true},
	{"trusted.", 4, false},
	{"security.", 6, false},
}

// encodeXattrs encodes inline xattr entries: erofs_xattr_entry records
// (name length, name index, value size), name suffix and value, each
// padded to 4 bytes.
func encodeXattrs(xs []daxfs.Xattr) ([]byte, error) {
	var out []byte
	for _, x := range xs {
		idx, suffix := uint8(0), ""
		for _, p := range xattrPrefixes {
			if p.whole && x.Name == p.prefix || !p.whole && strings.HasPrefix(x.Name, p.prefix) && len(x.Name) > len(p.prefix) {
				idx, suffix = p.index, x.Name[len(p.prefix):]
				break
			}
		}
		switch {
		case idx == 0:
			return nil, fmt.Errorf("%w: xattr %q: EROFS knows no prefix of it", ErrUnsupported, x.Name)
		case len(suffix) > 255:
			return nil, fmt.Errorf("%w: xattr %q: name too long", ErrUnsupported, x.Name)
		case len(x.Value) > maxXattrValue:
			return nil, fmt.Errorf("%w: xattr %q: value of %d bytes (EROFS holds up to %d)", ErrUnsupported, x.Name, len(x.Value), maxXattrValue)
		}
		var h [xattrEntHdr]byte
		h[0] = uint8(len(suffix))
		h[1] = idx
		le.PutUint16(h[2:], uint16(len(x.Value)))
		out = append(out, h[:]...)
		out = append(out, suffix...)
		out = append(out, x.Value...)
		for len(out)%4 != 0 {
			out = append(out, 0)
		}
		if xattrHdr+len(out) > maxXattrBody {
			return nil, fmt.Errorf("%w: xattrs take more than %d bytes", ErrUnsupported, maxXattrBody)
		}
	}
	return out, nil
}

// encodeDev converts a Linux dev_t (glibc's encoding, as unix.Mkdev makes)
// to the kernel's new_encode_dev, which erofs stores.
func encodeDev(dev uint64) (uint32, error) {
	major, minor := unix.Major(dev), unix.Minor(dev)
	if major >= 1<<12 || minor >= 1<<20 {
		return 0, fmt.Errorf("%w: device number %d:%d (the kernel's dev_t holds major < 4096, minor < 2^20)", ErrUnsupported, major, minor)
	}
	return minor&0xff | major<<8 | (minor&^0xff)<<12, nil
}
