package daxfs

import "errors"

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
