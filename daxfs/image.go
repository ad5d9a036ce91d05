package daxfs

// Image reads a DAXFS image held in a byte slice (usually an mmapped window
// of the region). It copies nothing it does not have to: Data and Readlink
// return sub-slices of the image. Every accessor is bounds checked and
// returns an error wrapping ErrCorrupt rather than panicking, even on an
// image that was never validated.
type Image struct {
	b []byte
}

// Open checks the two superblocks (magics, version, block size, that the
// inode table and extension block lie inside b) and returns an Image. It does
// not walk the tree: call Validate for that.
func Open(b []byte) (*Image, error) { return nil, errUnimplemented }

// Validate checks the whole image in time linear in its size: every offset,
// size, count and inode number, names (non-empty, no '/', no NUL, at most
// 255 bytes, no duplicates, not "." or ".."), 4096 alignment of file data,
// NUL-terminated symlinks, nlink, that no entry points at an unused slot,
// and that every used inode is reachable from the root. The error names the
// inode and the rule broken.
func Validate(b []byte) error { return errUnimplemented }

// Bytes returns the image bytes the Image reads.
func (im *Image) Bytes() []byte { return im.b }

// InodeCount returns the number of inode table slots (used or not).
func (im *Image) InodeCount() uint32 { return 0 }

// TotalSize returns the superblock's total_size: the window the image
// needs mapped, which for a view includes the layers it references.
func (im *Image) TotalSize() uint64 { return 0 }

// Inode returns inode ino (1-based).
func (im *Image) Inode(ino uint32) (Inode, error) { return Inode{}, errUnimplemented }

// Lookup finds name in directory dir: binary search in images our Writer
// made (entries sorted by name in byte order), linear search otherwise.
func (im *Image) Lookup(dir uint32, name string) (Dirent, error) { return Dirent{}, errUnimplemented }

// LookupPath resolves a slash-separated path from the root without
// following symlinks.
func (im *Image) LookupPath(path string) (Inode, error) { return Inode{}, errUnimplemented }

// DirentCount returns the number of entries of directory dir.
func (im *Image) DirentCount(dir uint32) (int, error) { return 0, errUnimplemented }

// DirentAt returns entry i (0-based, in stored order) of directory dir, so a
// FUSE readdir can resume at an offset without allocating the whole list.
func (im *Image) DirentAt(dir uint32, i int) (Dirent, error) { return Dirent{}, errUnimplemented }

// ReadDir returns every entry of directory dir in stored order.
func (im *Image) ReadDir(dir uint32) ([]Dirent, error) { return nil, errUnimplemented }

// Readlink returns a symlink's target (a sub-slice of the image).
func (im *Image) Readlink(ino uint32) ([]byte, error) { return nil, errUnimplemented }

// Data returns a regular file's bytes (a sub-slice of the image).
func (im *Image) Data(ino uint32) ([]byte, error) { return nil, errUnimplemented }

// HasExtension reports whether the image carries an extension block.
func (im *Image) HasExtension() bool { return false }

// ModTime returns inode ino's modification time from the extension block;
// ok is false when the image has none.
func (im *Image) ModTime(ino uint32) (t Timespec, ok bool) { return Timespec{}, false }

// Rdev returns a device node's number (Linux dev_t encoding) from the
// extension block, or 0.
func (im *Image) Rdev(ino uint32) uint64 { return 0 }

// Xattrs returns inode ino's extended attributes, sorted by name.
func (im *Image) Xattrs(ino uint32) ([]Xattr, error) { return nil, errUnimplemented }
