package daxfs

import (
	"encoding/binary"
	"errors"
)

// On-media constants of the DAXFS v5 static image.
const (
	SuperMagic   = 0x64617835 // "5xad" little-endian: the outer superblock
	BaseMagic    = 0x64646135 // the base image superblock
	Version      = 5
	BlockSize    = 4096
	BaseOffset   = BlockSize // the base image starts right after the superblock
	InodeSize    = 64
	DirentSize   = 271 // what one entry adds to a directory inode's size
	DirentStride = 272 // distance between entries: the C struct is padded
	MaxNameLen   = 255
	RootIno      = 1
	MaxInodes    = 1<<32 - 1

	// ExtMagic marks the extension block in the base superblock's reserved
	// area (offset 48) and at the start of the block itself.
	ExtMagic   = 0x31455844 // "DXE1"
	ExtVersion = 1

	// ExtFlagSorted in the extension header's flags says every directory's
	// entries are sorted by name in byte order.
	ExtFlagSorted = 1 << 0

	// MaxXattrValue is the largest xattr value we store (XATTR_SIZE_MAX).
	MaxXattrValue = 65536
	// MaxSymlinkLen is the longest symlink target we store (PATH_MAX - 1).
	MaxSymlinkLen = 4095

	extHeaderSize = 32
	extRecordSize = 32
	xattrHdrSize  = 8
)

// The on-media records, field by field. Every integer is little-endian.
// Each field is a constant whose value is its byte offset in its record
// and whose type is its width, so a reader and the Writer cannot disagree
// on where a field is or how wide it is; doc.go draws the same layout.
type (
	u16 int // a uint16 at this offset
	u32 int // a uint32 at this offset
	u64 int // a uint64 at this offset
)

var le = binary.LittleEndian

func (f u16) get(b []byte) uint16    { return le.Uint16(b[f:]) }
func (f u16) put(b []byte, v uint16) { le.PutUint16(b[f:], v) }
func (f u32) get(b []byte) uint32    { return le.Uint32(b[f:]) }
func (f u32) put(b []byte, v uint32) { le.PutUint32(b[f:], v) }
func (f u64) get(b []byte) uint64    { return le.Uint64(b[f:]) }
func (f u64) put(b []byte, v uint64) { le.PutUint64(b[f:], v) }

// The superblock: BlockSize bytes at image offset 0. The branch table,
// the delta region and the coordination and pcache blocks after them are
// the kernel's, and zero in a static image.
const (
	sbMagic              u32 = 0 // SuperMagic
	sbVersion            u32 = 4 // Version
	sbFlags              u32 = 8
	sbBlockSize          u32 = 12 // BlockSize
	sbTotalSize          u64 = 16 // bytes from image offset 0 to the end of the window
	sbBaseOffset         u64 = 24 // BaseOffset
	sbBaseSize           u64 = 32
	sbBranchTableOffset  u64 = 40
	sbBranchTableEntries u32 = 48
	sbActiveBranches     u32 = 52
	sbNextBranchID       u64 = 56
	sbNextInodeID        u64 = 64 // inode_count + 1
	sbDeltaRegionOffset  u64 = 72
	sbDeltaRegionSize    u64 = 80
	sbDeltaRegionAlloc   u64 = 88
)

// The base superblock: BlockSize bytes at BaseOffset. Offsets stored in
// it, in inodes and in directory entries are relative to its start (the
// base start). Our extension header lives in its reserved area from
// bsExtMagic on, which the kernel ignores.
const (
	bsMagic      u32 = 0 // BaseMagic
	bsVersion    u32 = 4 // Version
	bsFlags      u32 = 8 // 0: no external backing file
	bsBlockSize  u32 = 12
	bsTotalSize  u64 = 16 // the base size
	bsInodeOff   u64 = 24 // the inode table
	bsInodeCount u32 = 32
	bsRootIno    u32 = 36 // RootIno
	bsDataOff    u64 = 40 // the file data area

	bsExtMagic   u32 = 48 // ExtMagic when the header is present
	bsExtVersion u32 = 52 // ExtVersion
	bsExtFlags   u32 = 56 // ExtFlagSorted
	bsExtOffset  u64 = 64 // the extension block, 0 if none
	bsExtSize    u64 = 72
)

// An inode: InodeSize bytes, slot i of the inode table for inode i+1.
// Bytes 36 to 63 are zero.
const (
	inIno   u32 = 0 // slot index + 1; 0 (with mode 0) in an unused slot
	inMode  u32 = 4
	inUID   u32 = 8
	inGID   u32 = 12
	inSize  u64 = 16 // directories: entries * DirentSize
	inData  u64 = 24 // from the base start; 0 for empty files and directories
	inNlink u32 = 32
)

// A directory entry: DirentStride bytes, its name from direntName on,
// not NUL terminated, the rest zero.
const (
	deIno      u32 = 0
	deMode     u32 = 4
	deNameLen  u16 = 8
	direntName     = 16 // where the name starts: the entry's fixed part
)

// The extension block header: extHeaderSize bytes at bsExtOffset.
const (
	ehMagic      u32 = 0 // ExtMagic
	ehVersion    u32 = 4 // ExtVersion
	ehInodeCount u32 = 8 // the base superblock's inode count
	ehRecordSize u32 = 12
	ehXattrOff   u64 = 16 // from the block start: extHeaderSize + inodes*extRecordSize
	ehXattrSize  u64 = 24
)

// An extension record: extRecordSize bytes, record i for inode i+1,
// after the header. All zero for an unused slot.
const (
	erMtimeSec   u64 = 0 // an int64: seconds since the Unix epoch
	erMtimeNsec  u32 = 8
	erXattrCount u32 = 12
	erRdev       u64 = 16 // Linux dev_t, devices only
	erXattrOff   u64 = 24 // into the xattr area; 0 without xattrs
)

// An xattr in the xattr area: a header of xattrHdrSize bytes, then the
// name and the value, unpadded.
const (
	xaNameLen  u16 = 0
	xaValueLen u32 = 4 // bytes 2 and 3 are zero
)

// HasMagic reports whether b starts with a DAXFS superblock's magic.
func HasMagic(b []byte) bool {
	return len(b) >= int(sbMagic)+4 && sbMagic.get(b) == SuperMagic
}

// StatedSize returns the total size the superblock at the start of b
// states (the image, or for a view the whole window it needs mapped),
// with ok false when b does not start with a superblock's magic or ends
// before the field. It checks nothing else: Open and Validate do.
func StatedSize(b []byte) (size uint64, ok bool) {
	if !HasMagic(b) || len(b) < int(sbTotalSize)+8 {
		return 0, false
	}
	return sbTotalSize.get(b), true
}

// File type bits of Inode.Mode, as in stat(2).
const (
	ModeTypeMask = 0o170000
	ModeSocket   = 0o140000
	ModeSymlink  = 0o120000
	ModeRegular  = 0o100000
	ModeBlock    = 0o060000
	ModeDir      = 0o040000
	ModeChar     = 0o020000
	ModeFIFO     = 0o010000
	ModePermMask = 0o7777 // permission, setuid, setgid and sticky bits
)

// Errors callers can test for with errors.Is. Errors returned by this
// package wrap one of these and add the path or inode they concern.
var (
	ErrCorrupt      = errors.New("daxfs: corrupt image")
	ErrNotExist     = errors.New("daxfs: no such file or directory")
	ErrNotDir       = errors.New("daxfs: not a directory")
	ErrInvalidPath  = errors.New("daxfs: invalid path")
	ErrNameTooLong  = errors.New("daxfs: name longer than 255 bytes")
	ErrTooManyNodes = errors.New("daxfs: more than 2^32-1 inodes")
	ErrNoSpace      = errors.New("daxfs: image does not fit its output")
	// ErrBacking: a reserving or file Window could not back its output
	// with memory or write it there (a full tmpfs or region): not the
	// image's fault.
	ErrBacking = errors.New("daxfs: backing the output with memory failed")
	// ErrInvalidHeader: a Header the image cannot represent (unknown file
	// type, bad symlink target, bad xattr, negative size, ...).
	ErrInvalidHeader = errors.New("daxfs: invalid entry")
)

// Inode is one decoded entry of the inode table.
type Inode struct {
	Ino        uint32 // 1-based; 0 with Mode 0 marks an unused slot
	Mode       uint32 // type and permission bits, as in stat(2)
	UID, GID   uint32
	Size       uint64 // bytes for files and symlinks; count*271 for directories
	DataOffset uint64 // relative to the base image start
	Nlink      uint32
}

// IsDir, IsRegular and IsSymlink report the inode's type.
func (in Inode) IsDir() bool     { return in.Mode&ModeTypeMask == ModeDir }
func (in Inode) IsRegular() bool { return in.Mode&ModeTypeMask == ModeRegular }
func (in Inode) IsSymlink() bool { return in.Mode&ModeTypeMask == ModeSymlink }

// Dirent is one directory entry. Name aliases the image bytes (no copy):
// it stays valid as long as the image memory stays mapped.
type Dirent struct {
	Name string
	Ino  uint32
	Mode uint32 // the child's mode as recorded in the entry
}

// Xattr is one extended attribute from the extension block.
type Xattr struct {
	Name  string
	Value []byte
}

// Timespec is a modification time from the extension block.
type Timespec struct {
	Sec  int64
	Nsec uint32
}
