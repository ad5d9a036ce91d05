package daxfs

import (
	"fmt"
	"slices"
	"strings"
	"unsafe"
)

// Image reads a DAXFS image held in a byte slice (usually an mmapped window
// of the region). It copies nothing it does not have to: Data and Readlink
// return sub-slices of the image, and Dirent names alias it. Every accessor
// is bounds checked and returns an error wrapping ErrCorrupt rather than
// panicking, even on an image that was never validated. An Image never
// changes after Open and is safe for concurrent use.
type Image struct {
	b        []byte
	base     []byte // the base image: b[BaseOffset : BaseOffset+base_size]
	total    uint64
	inodeOff uint64
	count    uint32
	dataOff  uint64
	sorted   bool
	ext      []byte // the extension block, nil if none
	xattrs   []byte // the extension block's xattr area
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrCorrupt}, args...)...)
}

// Open checks the two superblocks (magics, version, block size, that the
// inode table and extension block lie inside b) and returns an Image. It does
// not walk the tree: call Validate for that.
func Open(b []byte) (*Image, error) {
	if len(b) < BaseOffset+BlockSize {
		return nil, corrupt("image of %d bytes is smaller than its two superblocks", len(b))
	}
	switch {
	case sbMagic.get(b) != SuperMagic:
		return nil, corrupt("superblock: bad magic %#x", sbMagic.get(b))
	case sbVersion.get(b) != Version:
		return nil, corrupt("superblock: version %d, want %d", sbVersion.get(b), Version)
	case sbBlockSize.get(b) != BlockSize:
		return nil, corrupt("superblock: block size %d, want %d", sbBlockSize.get(b), BlockSize)
	case sbBaseOffset.get(b) != BaseOffset:
		return nil, corrupt("superblock: base_offset %d, want %d", sbBaseOffset.get(b), BaseOffset)
	case sbBranchTableEntries.get(b) != 0 || sbBranchTableOffset.get(b) != 0:
		return nil, corrupt("superblock: branch table present: not a static image")
	case sbDeltaRegionSize.get(b) != 0:
		return nil, corrupt("superblock: delta region present: not a static image")
	}
	total, baseSize := sbTotalSize.get(b), sbBaseSize.get(b)
	switch {
	case total > uint64(len(b)):
		return nil, corrupt("superblock: total_size %d exceeds the %d bytes given", total, len(b))
	case baseSize < BlockSize || baseSize > total-BaseOffset || total < BaseOffset:
		return nil, corrupt("superblock: base_size %d does not fit total_size %d", baseSize, total)
	}
	im := &Image{b: b, base: b[BaseOffset : BaseOffset+baseSize], total: total}
	bs := im.base
	switch {
	case bsMagic.get(bs) != BaseMagic:
		return nil, corrupt("base superblock: bad magic %#x", bsMagic.get(bs))
	case bsVersion.get(bs) != Version:
		return nil, corrupt("base superblock: version %d, want %d", bsVersion.get(bs), Version)
	case bsFlags.get(bs) != 0:
		return nil, corrupt("base superblock: flags %#x: external backing file not supported", bsFlags.get(bs))
	case bsBlockSize.get(bs) != BlockSize:
		return nil, corrupt("base superblock: block size %d, want %d", bsBlockSize.get(bs), BlockSize)
	case bsTotalSize.get(bs) != baseSize:
		return nil, corrupt("base superblock: total_size %d differs from base_size %d", bsTotalSize.get(bs), baseSize)
	case bsRootIno.get(bs) != RootIno:
		return nil, corrupt("base superblock: root inode %d, want %d", bsRootIno.get(bs), RootIno)
	}
	im.inodeOff, im.count, im.dataOff = bsInodeOff.get(bs), bsInodeCount.get(bs), bsDataOff.get(bs)
	switch {
	case im.count == 0:
		return nil, corrupt("base superblock: no inodes")
	case im.inodeOff < BlockSize || im.inodeOff > baseSize || uint64(im.count)*InodeSize > baseSize-im.inodeOff:
		return nil, corrupt("base superblock: inode table (%d inodes at %d) outside the base image of %d bytes", im.count, im.inodeOff, baseSize)
	case im.dataOff > baseSize:
		return nil, corrupt("base superblock: data_offset %d outside the base image of %d bytes", im.dataOff, baseSize)
	}
	if bsExtMagic.get(bs) == ExtMagic {
		if v := bsExtVersion.get(bs); v != ExtVersion {
			return nil, corrupt("extension header: version %d, want %d", v, ExtVersion)
		}
		flags := bsExtFlags.get(bs)
		if flags&^uint32(ExtFlagSorted) != 0 {
			return nil, corrupt("extension header: unknown flags %#x", flags)
		}
		im.sorted = flags&ExtFlagSorted != 0
		off, size := bsExtOffset.get(bs), bsExtSize.get(bs)
		if size != 0 || off != 0 {
			if err := im.openExt(off, size); err != nil {
				return nil, err
			}
		}
	}
	return im, nil
}

func (im *Image) openExt(off, size uint64) error {
	bsz := uint64(len(im.base))
	if off < BlockSize || off > bsz || size > bsz-off || off%8 != 0 {
		return corrupt("extension block (%d bytes at %d) outside the base image of %d bytes", size, off, bsz)
	}
	e := im.base[off : off+size]
	if size < extHeaderSize {
		return corrupt("extension block of %d bytes is shorter than its header", size)
	}
	switch {
	case ehMagic.get(e) != ExtMagic:
		return corrupt("extension block: bad magic %#x", ehMagic.get(e))
	case ehVersion.get(e) != ExtVersion:
		return corrupt("extension block: version %d, want %d", ehVersion.get(e), ExtVersion)
	case ehInodeCount.get(e) != im.count:
		return corrupt("extension block: %d records for %d inodes", ehInodeCount.get(e), im.count)
	case ehRecordSize.get(e) != extRecordSize:
		return corrupt("extension block: record size %d, want %d", ehRecordSize.get(e), extRecordSize)
	}
	xoff, xsize := ehXattrOff.get(e), ehXattrSize.get(e)
	if want := extHeaderSize + uint64(im.count)*extRecordSize; xoff != want || xsize != size-xoff || xoff > size {
		return corrupt("extension block: xattr area (%d bytes at %d) does not end the %d-byte block after %d records", xsize, xoff, size, im.count)
	}
	im.ext = e
	im.xattrs = e[xoff:]
	return nil
}

// Bytes returns the image bytes the Image reads.
func (im *Image) Bytes() []byte { return im.b }

// InodeCount returns the number of inode table slots (used or not).
func (im *Image) InodeCount() uint32 { return im.count }

// TotalSize returns the superblock's total_size: the window the image
// needs mapped, which for a view includes the layers it references.
func (im *Image) TotalSize() uint64 { return im.total }

// Sorted reports whether the image says its directory entries are sorted
// by name (images our Writer made), so Lookup can binary search.
func (im *Image) Sorted() bool { return im.sorted }

// rawInode decodes slot ino (1-based) without checking it.
func (im *Image) rawInode(ino uint32) Inode {
	r := im.base[im.inodeOff+uint64(ino-1)*InodeSize:]
	return Inode{
		Ino:        inIno.get(r),
		Mode:       inMode.get(r),
		UID:        inUID.get(r),
		GID:        inGID.get(r),
		Size:       inSize.get(r),
		DataOffset: inData.get(r),
		Nlink:      inNlink.get(r),
	}
}

// Inode returns inode ino (1-based).
func (im *Image) Inode(ino uint32) (Inode, error) {
	if ino == 0 || ino > im.count {
		return Inode{}, fmt.Errorf("inode %d: %w (image has %d)", ino, ErrNotExist, im.count)
	}
	in := im.rawInode(ino)
	if in.Ino != ino {
		if in.Ino == 0 && in.Mode == 0 {
			return Inode{}, fmt.Errorf("inode %d: %w: unused slot", ino, ErrNotExist)
		}
		return Inode{}, corrupt("inode %d: slot holds ino %d", ino, in.Ino)
	}
	return in, nil
}

// span returns base[off:off+n] or an error.
func (im *Image) span(off, n uint64, what string, ino uint32) ([]byte, error) {
	if off > uint64(len(im.base)) || n > uint64(len(im.base))-off {
		return nil, corrupt("inode %d: %s (%d bytes at %d) outside the base image of %d bytes", ino, what, n, off, len(im.base))
	}
	return im.base[off : off+n], nil
}

func (im *Image) dirInode(dir uint32) (Inode, error) {
	in, err := im.Inode(dir)
	if err != nil {
		return in, err
	}
	if !in.IsDir() {
		return in, fmt.Errorf("inode %d: %w", dir, ErrNotDir)
	}
	return in, nil
}

// direntAt decodes entry i of directory inode in (i < count).
func (im *Image) direntAt(in Inode, i uint64) (Dirent, error) {
	if i > uint64(len(im.base))/DirentStride {
		return Dirent{}, corrupt("inode %d: entry %d lies past the base image", in.Ino, i)
	}
	off := in.DataOffset + i*DirentStride
	if off < in.DataOffset {
		return Dirent{}, corrupt("inode %d: entry %d offset overflows", in.Ino, i)
	}
	h, err := im.span(off, direntName, "directory entry", in.Ino)
	if err != nil {
		return Dirent{}, err
	}
	nl := uint64(deNameLen.get(h))
	if nl == 0 || nl > MaxNameLen {
		return Dirent{}, corrupt("inode %d: entry %d: name length %d", in.Ino, i, nl)
	}
	name, err := im.span(off+direntName, nl, "directory entry name", in.Ino)
	if err != nil {
		return Dirent{}, err
	}
	return Dirent{Name: unsafe.String(&name[0], len(name)), Ino: deIno.get(h), Mode: deMode.get(h)}, nil
}

// Lookup finds name in directory dir: binary search in images our Writer
// made (entries sorted by name in byte order), linear search otherwise.
func (im *Image) Lookup(dir uint32, name string) (Dirent, error) {
	in, err := im.dirInode(dir)
	if err != nil {
		return Dirent{}, err
	}
	n := in.Size / DirentSize
	if im.sorted {
		lo, hi := uint64(0), n
		for lo < hi {
			mid := lo + (hi-lo)/2
			d, err := im.direntAt(in, mid)
			if err != nil {
				return Dirent{}, err
			}
			switch c := strings.Compare(d.Name, name); {
			case c == 0:
				return d, nil
			case c < 0:
				lo = mid + 1
			default:
				hi = mid
			}
		}
	} else {
		for i := range n {
			d, err := im.direntAt(in, i)
			if err != nil {
				return Dirent{}, err
			}
			if d.Name == name {
				return d, nil
			}
		}
	}
	return Dirent{}, fmt.Errorf("inode %d: %q: %w", dir, name, ErrNotExist)
}

// LookupPath resolves a slash-separated path from the root without
// following symlinks.
func (im *Image) LookupPath(path string) (Inode, error) {
	cur := uint32(RootIno)
	for rest := path; rest != ""; {
		c := rest
		if i := strings.IndexByte(rest, '/'); i >= 0 {
			c, rest = rest[:i], rest[i+1:]
		} else {
			rest = ""
		}
		if c == "" || c == "." {
			continue
		}
		d, err := im.Lookup(cur, c)
		if err != nil {
			return Inode{}, fmt.Errorf("%s: %w", path, err)
		}
		cur = d.Ino
	}
	in, err := im.Inode(cur)
	if err != nil {
		return Inode{}, fmt.Errorf("%s: %w", path, err)
	}
	return in, nil
}

// DirentCount returns the number of entries of directory dir.
func (im *Image) DirentCount(dir uint32) (int, error) {
	in, err := im.dirInode(dir)
	if err != nil {
		return 0, err
	}
	n := in.Size / DirentSize
	if n > uint64(len(im.base))/DirentSize+1 {
		return 0, corrupt("inode %d: directory size %d larger than the image", dir, in.Size)
	}
	return int(n), nil
}

// DirentAt returns entry i (0-based, in stored order) of directory dir, so a
// FUSE readdir can resume at an offset without allocating the whole list.
func (im *Image) DirentAt(dir uint32, i int) (Dirent, error) {
	in, err := im.dirInode(dir)
	if err != nil {
		return Dirent{}, err
	}
	if i < 0 || uint64(i) >= in.Size/DirentSize {
		return Dirent{}, fmt.Errorf("inode %d: entry %d: %w", dir, i, ErrNotExist)
	}
	return im.direntAt(in, uint64(i))
}

// ReadDir returns every entry of directory dir in stored order.
func (im *Image) ReadDir(dir uint32) ([]Dirent, error) {
	n, err := im.DirentCount(dir)
	if err != nil {
		return nil, err
	}
	in, _ := im.Inode(dir)
	out := make([]Dirent, 0, n)
	for i := range n {
		d, err := im.direntAt(in, uint64(i))
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// Readlink returns a symlink's target (a sub-slice of the image).
func (im *Image) Readlink(ino uint32) ([]byte, error) {
	in, err := im.Inode(ino)
	if err != nil {
		return nil, err
	}
	if !in.IsSymlink() {
		return nil, fmt.Errorf("inode %d: %w: not a symlink", ino, ErrInvalidPath)
	}
	if in.Size == ^uint64(0) {
		return nil, corrupt("inode %d: symlink size %d", ino, in.Size)
	}
	b, err := im.span(in.DataOffset, in.Size+1, "symlink target", ino)
	if err != nil {
		return nil, err
	}
	if b[in.Size] != 0 {
		return nil, corrupt("inode %d: symlink target not NUL terminated", ino)
	}
	return b[:in.Size:in.Size], nil
}

// Data returns a regular file's bytes (a sub-slice of the image).
func (im *Image) Data(ino uint32) ([]byte, error) {
	in, err := im.Inode(ino)
	if err != nil {
		return nil, err
	}
	if !in.IsRegular() {
		return nil, fmt.Errorf("inode %d: %w: not a regular file", ino, ErrInvalidPath)
	}
	if in.Size == 0 {
		return []byte{}, nil
	}
	b, err := im.span(in.DataOffset, in.Size, "file data", ino)
	if err != nil {
		return nil, err
	}
	return slices.Clip(b), nil
}

// KernelLosses names what the daxfs kernel module would not show of the
// image beyond modification times, which it drops from every image:
// "xattrs" when an inode has extended attributes (the module lists none),
// "device nodes" when it holds character or block devices (the module
// shows them as 0:0, which overlayfs takes for whiteouts). Nil when the
// module shows the image whole. Linear in the inode count.
func (im *Image) KernelLosses() []string {
	var out []string
	if len(im.xattrs) > 0 {
		out = append(out, "xattrs")
	}
	for ino := uint32(1); ino <= im.count; ino++ {
		if t := im.rawInode(ino).Mode & ModeTypeMask; t == ModeChar || t == ModeBlock {
			return append(out, "device nodes")
		}
	}
	return out
}

// HasExtension reports whether the image carries an extension block.
func (im *Image) HasExtension() bool { return im.ext != nil }

// record returns inode ino's extension record, or nil.
func (im *Image) record(ino uint32) []byte {
	if im.ext == nil || ino == 0 || ino > im.count {
		return nil
	}
	off := extHeaderSize + uint64(ino-1)*extRecordSize
	return im.ext[off : off+extRecordSize]
}

// ModTime returns inode ino's modification time from the extension block;
// ok is false when the image has none.
func (im *Image) ModTime(ino uint32) (t Timespec, ok bool) {
	r := im.record(ino)
	if r == nil {
		return Timespec{}, false
	}
	return Timespec{Sec: int64(erMtimeSec.get(r)), Nsec: erMtimeNsec.get(r)}, true
}

// Rdev returns a device node's number (Linux dev_t encoding) from the
// extension block, or 0.
func (im *Image) Rdev(ino uint32) uint64 {
	r := im.record(ino)
	if r == nil {
		return 0
	}
	return erRdev.get(r)
}

// Xattrs returns inode ino's extended attributes, sorted by name. Names and
// values alias the image bytes.
func (im *Image) Xattrs(ino uint32) ([]Xattr, error) {
	if ino == 0 || ino > im.count {
		return nil, fmt.Errorf("inode %d: %w (image has %d)", ino, ErrNotExist, im.count)
	}
	r := im.record(ino)
	if r == nil {
		return nil, nil
	}
	cnt, off := erXattrCount.get(r), erXattrOff.get(r)
	if cnt == 0 {
		return nil, nil
	}
	if uint64(cnt) > uint64(len(im.xattrs))/xattrHdrSize {
		return nil, corrupt("inode %d: %d xattrs do not fit the xattr area", ino, cnt)
	}
	out := make([]Xattr, 0, cnt)
	for range cnt {
		name, val, next, err := im.xattrAt(ino, off)
		if err != nil {
			return nil, err
		}
		out = append(out, Xattr{Name: name, Value: val})
		off = next
	}
	return out, nil
}

// xattrAt decodes the xattr at off in the xattr area.
func (im *Image) xattrAt(ino uint32, off uint64) (name string, val []byte, next uint64, err error) {
	a := im.xattrs
	if off > uint64(len(a)) || uint64(len(a))-off < xattrHdrSize {
		return "", nil, 0, corrupt("inode %d: xattr at %d outside the xattr area of %d bytes", ino, off, len(a))
	}
	x := a[off:]
	nl, vl := uint64(xaNameLen.get(x)), uint64(xaValueLen.get(x))
	if nl == 0 || nl > MaxNameLen || vl > MaxXattrValue {
		return "", nil, 0, corrupt("inode %d: xattr at %d: name length %d, value length %d", ino, off, nl, vl)
	}
	body := off + xattrHdrSize
	if nl+vl > uint64(len(a))-body {
		return "", nil, 0, corrupt("inode %d: xattr at %d runs past the xattr area", ino, off)
	}
	n := a[body : body+nl]
	return unsafe.String(&n[0], len(n)), a[body+nl : body+nl+vl : body+nl+vl], body + nl + vl, nil
}
