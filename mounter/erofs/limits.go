package erofs

import (
	"strings"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// What a layer may carry so that every view over it can be described by
// EROFS. The converter refuses (or, where containerd's applier ignores
// them, drops) attributes outside these, so that no layer makes a view
// fall back from the kernel's erofs to FUSE.

// KnownXattr reports whether name has a prefix EROFS (and Linux) knows:
// user., trusted., security. or a POSIX ACL. setxattr(2) of any other name
// fails with EOPNOTSUPP, which containerd's applier ignores.
func KnownXattr(name string) bool {
	for _, p := range xattrPrefixes {
		if p.whole && name == p.prefix || !p.whole && strings.HasPrefix(name, p.prefix) && len(name) > len(p.prefix) {
			return true
		}
	}
	return false
}

// CheckXattrs returns an error wrapping ErrUnsupported, naming the xattr,
// when an inode with these xattrs cannot be written.
func CheckXattrs(xs []daxfs.Xattr) error {
	_, err := encodeXattrs(xs)
	return err
}

// CheckDevice returns an error wrapping ErrUnsupported when rdev (a Linux
// dev_t as unix.Mkdev makes it) does not fit the kernel's 32-bit device
// numbers, which erofs stores and mknod(2) takes.
func CheckDevice(rdev uint64) error {
	_, err := encodeDev(rdev)
	return err
}
