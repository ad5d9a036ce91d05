// Package daxfs writes and reads DAXFS v5 static images, the format the
// out-of-tree Linux daxfs module mounts, plus an optional extension block
// (mtimes, xattrs, device numbers) that the kernel ignores.
//
// The package is pure: bytes in, bytes out. It knows nothing of containers,
// OCI whiteouts or the shared memory region.
//
// # Image layout
//
// All integers are little-endian. Offsets inside the base image are relative
// to the base image start, which is BaseOffset (4096) bytes into the image.
// format.go declares every field below once, as a constant whose value is
// its offset and whose type is its width; the Writer, the reader and
// Validate use nothing else.
//
//	superblock (image offset 0, 4096 bytes)
//	  @0   u32 magic 0x64617835     @4   u32 version 5
//	  @8   u32 flags 0              @12  u32 block_size 4096
//	  @16  u64 total_size           @24  u64 base_offset 4096
//	  @32  u64 base_size            @40  u64 branch_table_offset 0
//	  @48  u32 branch_table_entries 0  @52 u32 active_branches 0
//	  @56  u64 next_branch_id 0     @64  u64 next_inode_id (inode_count+1)
//	  @72  u64 delta_region_offset/size/alloc 0 (@72, @80, @88)
//	  @96  64-byte coordination block 0, @160 pcache fields 0; rest zero
//
//	base superblock (image offset 4096 = base offset 0, 4096 bytes)
//	  @0   u32 magic 0x64646135     @4   u32 version 5
//	  @8   u32 flags 0              @12  u32 block_size 4096
//	  @16  u64 total_size (= base_size)
//	  @24  u64 inode_offset         @32  u32 inode_count
//	  @36  u32 root_inode 1         @40  u64 data_offset
//	  @48  extension header (ours, ignored by the kernel; see below)
//
//	inode table (base+inode_offset): inode_count records of 64 bytes
//	  @0 u32 ino (index+1, or 0 with mode 0 for an unused slot)
//	  @4 u32 mode  @8 u32 uid  @12 u32 gid  @16 u64 size
//	  @24 u64 data_offset  @32 u32 nlink  @36 28 bytes zero
//
//	directory entry (stride 272 bytes; the inode's size is count*271)
//	  @0 u32 ino  @4 u32 mode  @8 u16 name_len  @10 6 bytes zero
//	  @16 name (name_len bytes, not NUL terminated), rest of the 272 zero
//
// # What our Writer emits
//
// The Writer streams: file bytes are written as they arrive, so they come
// first and the metadata, known only at the end, follows them:
//
//	0                    superblock
//	4096                 base superblock
//	base+4096            regular file data in arrival order, each file on
//	                     its own 4096-byte aligned run, zero padded to the
//	                     page end (data_offset in the base superblock: 4096)
//	base+inode_offset    inode table (inode_offset = end of file data, page
//	                     aligned)
//	...                  directory arrays in inode order, back to back
//	                     (each reserves count*272 bytes, 8-byte aligned)
//	...                  symlink targets, each followed by a NUL byte
//	...                  extension block, 8-byte aligned
//	base_size            end, rounded up to 4096; total_size = 4096+base_size
//
// Empty files and empty directories have data_offset 0. Inode numbers are
// assigned breadth first from the root (ino 1), visiting each directory's
// entries in byte order of their names; every directory's entries are stored
// sorted by name. Hard links share one inode, so our images have no unused
// slots. Metadata therefore does not depend on the order entries were added
// in; file data offsets do. File bytes of a replaced file stay in the data
// area, unreferenced.
//
// A view (Writer.AddExternal, SetExternalBases) holds no file data of its
// own: its regular files point past the view's own end into layer images
// placed after it, and total_size/base_size cover the whole window.
//
// # Extension block
//
// Extension header in the base superblock's reserved area:
//
//	@48 u32 ExtMagic 0x31455844 ("DXE1")
//	@52 u32 ExtVersion 1
//	@56 u32 ext_flags: bit 0 (ExtFlagSorted) = every directory's entries
//	    are sorted by name in byte order (readers may binary search)
//	@60 u32 zero
//	@64 u64 ext_offset: block start, relative to the base start (0 if none)
//	@72 u64 ext_size: block length in bytes (0 if none)
//
// With WriterOptions.NoExtension the header is still written (the sorted
// flag is useful to every reader) but ext_offset and ext_size are 0.
//
// The block (inside the base image, 8-byte aligned):
//
//	header, 32 bytes:
//	  @0  u32 ExtMagic           @4  u32 ExtVersion
//	  @8  u32 inode_count (= the base superblock's)
//	  @12 u32 record_size (32)
//	  @16 u64 xattr_offset: start of the xattr area relative to the block
//	      start, exactly 32 + inode_count*32
//	  @24 u64 xattr_size; ext_size = xattr_offset + xattr_size
//	records, inode_count * 32 bytes, record i for inode i+1:
//	  @0  i64 mtime seconds since the Unix epoch
//	  @8  u32 mtime nanoseconds (< 1e9)
//	  @12 u32 xattr_count
//	  @16 u64 rdev (Linux dev_t encoding; nonzero only for char/block devices)
//	  @24 u64 xattr_off: the inode's first xattr, relative to the xattr area
//	      (0 when xattr_count is 0)
//	xattr area: for each inode in inode order, its xattr_count entries
//	back to back, sorted by name (byte order), names unique:
//	  @0 u16 name_len (1..255)  @2 u16 zero  @4 u32 value_len (<= 65536)
//	  @8 name bytes, then value bytes (no padding)
//	The inodes' runs are contiguous and in inode order: inode i's xattr_off
//	is where inode i-1's run ended, and the last run ends at xattr_size.
//	That makes the block checkable in one pass. Unused slots have all-zero
//	records.
//
// Device nodes, FIFOs and sockets keep their real mode in the inode table
// (size 0, data_offset 0); their rdev lives only in the extension block.
//
// # Reading
//
// Image reads an image in place (an mmapped window): names, file data and
// symlink targets alias the image bytes. Every accessor is bounds checked and
// returns an error instead of panicking on any input. Validate checks a
// whole image in time linear in its size.
package daxfs
