// Package daxfuse serves one DAXFS image over one FUSE connection with the
// raw go-fuse protocol API.
//
// The FUSE node ID of a file is its DAXFS inode number (both roots are 1),
// so the file system keeps no per-inode state: any process that holds the
// /dev/fuse descriptor and the image bytes can answer any request. That is
// what lets a replacement server adopt a live connection (see Conn).
package daxfuse

import (
	"errors"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// DefaultTimeout is how long the kernel may cache entries, attributes and
// misses. Images never change, so hours are safe.
const DefaultTimeout = 24 * time.Hour

// blockSize is what st_blksize and statfs report: the DAXFS block size.
const blockSize = daxfs.BlockSize

// FS is a read-only fuse.RawFileSystem over a daxfs.Image. It is safe for
// concurrent use and holds no state per inode or per open file.
type FS struct {
	fuse.RawFileSystem
	img     *daxfs.Image
	timeout time.Duration
}

// NewFS returns a file system serving img. timeout is the entry, attribute
// and negative-entry timeout given to the kernel (DefaultTimeout if 0).
func NewFS(img *daxfs.Image, timeout time.Duration) *FS {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	return &FS{RawFileSystem: fuse.NewDefaultRawFileSystem(), img: img, timeout: timeout}
}

// String names the file system; go-fuse uses it as the mount subtype.
func (fs *FS) String() string { return "daxfs" }

// toStatus maps reader errors to FUSE statuses. A corrupt image is an I/O
// error, never a panic.
func toStatus(err error) fuse.Status {
	switch {
	case err == nil:
		return fuse.OK
	case errors.Is(err, daxfs.ErrNotExist):
		return fuse.ENOENT
	case errors.Is(err, daxfs.ErrNotDir):
		return fuse.ENOTDIR
	default:
		return fuse.EIO
	}
}

// ino converts a FUSE node ID to a DAXFS inode number.
func ino(nodeID uint64) (uint32, fuse.Status) {
	if nodeID == 0 || nodeID > daxfs.MaxInodes {
		return 0, fuse.ENOENT
	}
	return uint32(nodeID), fuse.OK
}

// encodeDev converts a Linux dev_t (glibc encoding, as unix.Mkdev makes it)
// to the 32-bit "new" encoding FUSE attributes carry.
func encodeDev(dev uint64) uint32 {
	major := uint32((dev>>8)&0xfff) | uint32(dev>>32)&^0xfff
	minor := uint32(dev&0xff) | uint32(dev>>12)&^0xff
	return (minor & 0xff) | (major&0xfff)<<8 | (minor&^0xff)<<12
}

// fillAttr fills a from inode in.
func (fs *FS) fillAttr(in daxfs.Inode, a *fuse.Attr) {
	a.Ino = uint64(in.Ino)
	a.Mode = in.Mode
	a.Owner = fuse.Owner{Uid: in.UID, Gid: in.GID}
	a.Nlink = in.Nlink
	if a.Nlink == 0 {
		a.Nlink = 1
	}
	switch in.Mode & daxfs.ModeTypeMask {
	case daxfs.ModeDir:
		// A directory's size is what the kernel module shows: count*271.
		a.Size = in.Size
		a.Blocks = (in.Size + blockSize - 1) / blockSize * (blockSize / 512)
	case daxfs.ModeRegular:
		a.Size = in.Size
		a.Blocks = (in.Size + blockSize - 1) / blockSize * (blockSize / 512)
	case daxfs.ModeSymlink:
		a.Size = in.Size
	case daxfs.ModeChar, daxfs.ModeBlock:
		a.Rdev = encodeDev(fs.img.Rdev(in.Ino))
	}
	a.Blksize = blockSize
	if t, ok := fs.img.ModTime(in.Ino); ok {
		a.Mtime, a.Mtimensec = uint64(t.Sec), t.Nsec
		a.Ctime, a.Ctimensec = a.Mtime, a.Mtimensec
		a.Atime, a.Atimensec = a.Mtime, a.Mtimensec
	}
}

func (fs *FS) fillEntry(in daxfs.Inode, out *fuse.EntryOut) {
	out.NodeId = uint64(in.Ino)
	out.Generation = 1
	out.SetEntryTimeout(fs.timeout)
	out.SetAttrTimeout(fs.timeout)
	fs.fillAttr(in, &out.Attr)
}

func (fs *FS) inode(nodeID uint64) (daxfs.Inode, fuse.Status) {
	i, st := ino(nodeID)
	if !st.Ok() {
		return daxfs.Inode{}, st
	}
	in, err := fs.img.Inode(i)
	if err != nil {
		return daxfs.Inode{}, toStatus(err)
	}
	if in.Ino == 0 && in.Mode == 0 {
		return daxfs.Inode{}, fuse.ENOENT // an unused slot
	}
	return in, fuse.OK
}

// Lookup answers a miss with OK, node ID 0 and a timeout, so the kernel
// caches the negative entry.
func (fs *FS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	dir, st := ino(h.NodeId)
	if !st.Ok() {
		return st
	}
	if len(name) > daxfs.MaxNameLen {
		return fuse.Status(syscall.ENAMETOOLONG)
	}
	de, err := fs.img.Lookup(dir, name)
	if errors.Is(err, daxfs.ErrNotExist) {
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(fs.timeout)
		return fuse.OK
	}
	if err != nil {
		return toStatus(err)
	}
	in, st := fs.inode(uint64(de.Ino))
	if !st.Ok() {
		return fuse.EIO // an entry pointing at nothing: corrupt
	}
	fs.fillEntry(in, out)
	return fuse.OK
}

// Forget needs no work: nothing is held per inode.
func (fs *FS) Forget(nodeid, nlookup uint64) {}

func (fs *FS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	node, st := fs.inode(in.NodeId)
	if !st.Ok() {
		return st
	}
	out.SetTimeout(fs.timeout)
	fs.fillAttr(node, &out.Attr)
	return fuse.OK
}

func (fs *FS) Access(cancel <-chan struct{}, in *fuse.AccessIn) fuse.Status {
	if in.Mask&2 != 0 { // W_OK
		return fuse.EROFS
	}
	return fuse.OK
}

// Open answers ENOSYS: with FUSE_NO_OPEN_SUPPORT the kernel then stops
// sending OPEN, FLUSH and RELEASE and keeps the page cache across opens
// (as FOPEN_KEEP_CACHE would). Nothing is kept per open file anyway.
func (fs *FS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fuse.ENOSYS
}

// ReadSlice returns the bytes of file nodeID at [off, off+size), clipped at
// the end of the file: a sub-slice of the image, nothing copied.
func (fs *FS) ReadSlice(nodeID uint64, off uint64, size uint32) ([]byte, fuse.Status) {
	i, st := ino(nodeID)
	if !st.Ok() {
		return nil, st
	}
	data, err := fs.img.Data(i)
	if err != nil {
		return nil, toStatus(err)
	}
	if off >= uint64(len(data)) {
		return nil, fuse.OK
	}
	end := min(off+uint64(size), uint64(len(data)))
	return data[off:end], fuse.OK
}

func (fs *FS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	b, st := fs.ReadSlice(in.NodeId, in.Offset, in.Size)
	if !st.Ok() {
		return nil, st
	}
	return fuse.ReadResultData(b), fuse.OK
}

func (fs *FS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {}

func (fs *FS) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	return fuse.ENOSYS // the kernel then does generic SEEK_DATA/SEEK_HOLE
}

func (fs *FS) Readlink(cancel <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	i, st := ino(h.NodeId)
	if !st.Ok() {
		return nil, st
	}
	b, err := fs.img.Readlink(i)
	if err != nil {
		return nil, toStatus(err)
	}
	return b, fuse.OK
}

// OpenDir answers ENOSYS: with FUSE_NO_OPENDIR_SUPPORT the kernel stops
// sending OPENDIR and RELEASEDIR (two round trips per directory walked)
// and caches listings as with FOPEN_KEEP_CACHE|FOPEN_CACHE_DIR.
func (fs *FS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fuse.ENOSYS
}

func (fs *FS) ReleaseDir(in *fuse.ReleaseIn) {}

// Directory offsets: 1 is after ".", 2 after "..", and k+3 after stored
// entry k. They are stable, so a reader can resume anywhere.
func (fs *FS) readDir(in *fuse.ReadIn, out *fuse.DirEntryList, plus bool) fuse.Status {
	dir, st := ino(in.NodeId)
	if !st.Ok() {
		return st
	}
	n, err := fs.img.DirentCount(dir)
	if err != nil {
		return toStatus(err)
	}
	off := in.Offset
	add := func(e fuse.DirEntry) bool {
		if !plus {
			return out.AddDirEntry(e)
		}
		eo := out.AddDirLookupEntry(e)
		if eo == nil {
			return false
		}
		if e.Name == "." || e.Name == ".." {
			return true // the kernel does not link these; leave the entry zero
		}
		in, st := fs.inode(e.Ino)
		if !st.Ok() {
			return true // zero entry: the kernel falls back to LOOKUP
		}
		fs.fillEntry(in, eo)
		return true
	}
	if off == 0 {
		if !add(fuse.DirEntry{Name: ".", Ino: uint64(dir), Mode: syscall.S_IFDIR, Off: 1}) {
			return fuse.OK
		}
		off = 1
	}
	if off == 1 {
		// The parent is not recorded in DAXFS; programs do not rely on
		// the inode number of "..".
		if !add(fuse.DirEntry{Name: "..", Ino: daxfs.RootIno, Mode: syscall.S_IFDIR, Off: 2}) {
			return fuse.OK
		}
		off = 2
	}
	for i := int(off - 2); i < n; i++ {
		de, err := fs.img.DirentAt(dir, i)
		if err != nil {
			return toStatus(err)
		}
		if !add(fuse.DirEntry{Name: de.Name, Ino: uint64(de.Ino), Mode: de.Mode, Off: uint64(i) + 3}) {
			break
		}
	}
	return fuse.OK
}

func (fs *FS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, false)
}

func (fs *FS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	return fs.readDir(in, out, true)
}

// GetXAttr follows getxattr(2): size 0 asks for the value's length.
func (fs *FS) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	i, st := ino(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	xs, err := fs.img.Xattrs(i)
	if err != nil {
		return 0, toStatus(err)
	}
	for _, x := range xs {
		if x.Name != attr {
			continue
		}
		if len(dest) == 0 {
			return uint32(len(x.Value)), fuse.OK
		}
		if len(dest) < len(x.Value) {
			return uint32(len(x.Value)), fuse.ERANGE
		}
		return uint32(copy(dest, x.Value)), fuse.OK
	}
	return 0, fuse.ENOATTR
}

// ListXAttr returns the NUL-terminated names.
func (fs *FS) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	i, st := ino(h.NodeId)
	if !st.Ok() {
		return 0, st
	}
	xs, err := fs.img.Xattrs(i)
	if err != nil {
		return 0, toStatus(err)
	}
	n := 0
	for _, x := range xs {
		n += len(x.Name) + 1
	}
	if len(dest) == 0 {
		return uint32(n), fuse.OK
	}
	if len(dest) < n {
		return uint32(n), fuse.ERANGE
	}
	p := 0
	for _, x := range xs {
		p += copy(dest[p:], x.Name)
		dest[p] = 0
		p++
	}
	return uint32(n), fuse.OK
}

func (fs *FS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	out.Bsize = blockSize
	out.Frsize = blockSize
	out.Blocks = (fs.img.TotalSize() + blockSize - 1) / blockSize
	out.Files = uint64(fs.img.InodeCount())
	out.NameLen = daxfs.MaxNameLen
	return fuse.OK
}

// Mutations are refused; the kernel normally stops them first because the
// mount is read-only.
func (fs *FS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	return fuse.EROFS
}
func (fs *FS) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	return fuse.EROFS
}

// BrokenFS answers every request with EIO. A replacement server uses it
// for a connection whose image it can no longer map, so that users get
// errors instead of hanging and the mount can be taken down.
type BrokenFS struct {
	fuse.RawFileSystem
}

// NewBrokenFS returns a BrokenFS.
func NewBrokenFS() *BrokenFS { return &BrokenFS{fuse.NewDefaultRawFileSystem()} }

func (b *BrokenFS) String() string { return "daxfs" }
func (b *BrokenFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	return fuse.EIO
}
func (b *BrokenFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	return fuse.EIO
}
func (b *BrokenFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fuse.EIO
}
func (b *BrokenFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	return fuse.EIO
}
func (b *BrokenFS) ReadSlice(nodeID uint64, off uint64, size uint32) ([]byte, fuse.Status) {
	return nil, fuse.EIO
}

// Flush answers ENOSYS so the kernel stops sending FLUSH on every close.
func (fs *FS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	return fuse.ENOSYS
}
