// Package erofs writes an EROFS metadata image that indexes a DAXFS
// image's file data in place, so the kernel's erofs can mount a DAXFS layer
// or view with large-folio page cache (FUSE on this kernel caches in 4 KiB
// folios only).
//
// The image holds metadata only: inodes, directories, symlink targets and
// xattrs. Every regular file is a chunk-based inode with one chunk that
// points into an extra erofs device: the region file the DAXFS image lives
// in, attached to a loop device and named at mount time:
//
//	mount -t erofs -o ro,device=/dev/loopDATA /dev/loopMETA DIR
//
// A file's data starts at byte Options.DataOffset + daxfs.BaseOffset +
// inode.DataOffset of that device (DAXFS inode data offsets count from the
// base image, 4096 bytes into the image), so every non-empty regular file
// must start on a 4096-byte boundary of the region; Write refuses an image where one does
// not (the caller then serves the image through FUSE instead).
//
// # Layout
//
// Block size 4096; integers little-endian; no compression, no superblock
// checksum, no shared xattrs, no xattr name filter.
//
//	byte 0       1024 zero bytes
//	byte 1024    superblock (128 bytes): features CHUNKED_FILE and
//	             DEVICE_TABLE, meta_blkaddr 0, extra_devices 1, devt_slotoff
//	             10, uuid derived from the image's bytes
//	byte 1280    the one device slot: empty tag, blocks =
//	             Options.DataSize/4096, mapped_blkaddr = the image's block
//	             count (mounted without device=, the kernel would read the
//	             data device's chunks from the metadata device at
//	             mapped_blkaddr + block: past its end, so reads fail with
//	             EIO instead of returning metadata bytes)
//	byte 1408    inodes, 32-byte aligned, root first (its nid must fit 16
//	             bits), then breadth first; nid = byte offset / 32. Each is
//	             a 64-byte extended inode, then its inline xattrs, then:
//	               regular file: one 8-byte chunk index (8-byte aligned):
//	                 device_id 1, startblk = the data block; chunk format
//	                 INDEXES | (chunkbits-12), one chunk covers the file
//	               symlink: the target (FLAT_INLINE) when the inode, its
//	                 xattrs and the target fit in one block; else FLAT_PLAIN
//	             An inode record of at most one block never crosses a block
//	             boundary.
//	then         directory blocks (FLAT_PLAIN): dirents sorted by name in
//	             byte order, "." and ".." included; in each block the
//	             12-byte dirents, then their names, then zeros
//	then         blocks of the symlinks that did not fit inline
//
// Hard links share one inode (one nid). Device numbers use the kernel's
// new_encode_dev; mtimes come from the DAXFS extension block (0 without).
//
// # Limits
//
//	xattr names need a prefix erofs knows: user., trusted., security.,
//	system.posix_acl_access, system.posix_acl_default; values up to 65535
//	bytes (DAXFS allows 65536); all of an inode's xattrs together under
//	256 KiB
//	the data device up to 2^32-1 blocks (16 TiB); files up to 8 TiB
//	device numbers: major < 4096, minor < 2^20
package erofs
