package converter

import (
	"archive/tar"
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/erofs"
)

// What a layer's entries may carry. The rules follow containerd's applier
// (pkg/archive) where it decides, and otherwise keep every layer image
// describable by every mounter: a layer never makes a view fall back from
// the kernel's erofs to FUSE.
//
//   - xattrs under trusted. are dropped from tars (they could steer the
//     overlay above the view: trusted.overlay.*), and a pre-converted image
//     carrying any but our own implicit-directory marker is refused;
//   - xattrs outside the namespaces Linux knows are dropped, as setxattr(2)
//     fails on them with EOPNOTSUPP, which containerd's applier ignores;
//   - a value over 65535 bytes (erofs's limit, one byte under Linux's), or
//     more xattrs on one entry than erofs holds inline (256 KiB), fails
//     the layer: containerd fails on a value its filesystem cannot hold;
//   - device numbers must fit the kernel's 32-bit dev_t (mknod(2) would
//     silently truncate them);
//   - uid and gid 4294967295 are (uid_t)-1, which chown(2) takes as "leave
//     unchanged": containerd's file keeps its creator's owner, root.

// tarXattrs returns the xattrs of a tar entry the image keeps, whether the
// entry marks an opaque directory the overlay way, and how many xattrs it
// dropped.
func tarXattrs(hdr *tar.Header) (xs map[string][]byte, opaque bool, dropped int, err error) {
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok {
			continue
		}
		if strings.HasPrefix(name, "trusted.") || !erofs.KnownXattr(name) {
			// trusted.overlay.opaque included: on a lower layer that
			// containerd applies through an overlay mount, overlayfs
			// refuses to set it.
			dropped++
			continue
		}
		if isOverlayXattr(name) {
			// An overlay upper holding this xattr (userxattr overlays)
			// would make the directory opaque: say so the OCI way.
			if v == "y" && name == opaqueXattrs[1] && hdr.Typeflag == tar.TypeDir {
				opaque = true
			}
			continue
		}
		if xs == nil {
			xs = make(map[string][]byte)
		}
		xs[name] = []byte(v)
	}
	if err := checkXattrs(xs); err != nil {
		return nil, false, 0, err
	}
	return xs, opaque, dropped, nil
}

// checkXattrs checks that an entry's kept xattrs fit every mounter.
func checkXattrs(m map[string][]byte) error {
	if len(m) == 0 {
		return nil
	}
	xs := make([]daxfs.Xattr, 0, len(m))
	for k, v := range m {
		xs = append(xs, daxfs.Xattr{Name: k, Value: v})
	}
	sort.Slice(xs, func(i, j int) bool { return xs[i].Name < xs[j].Name })
	return erofs.CheckXattrs(xs)
}

// tarOwner maps a tar entry's uid or gid to the owner containerd's applier
// leaves on the file.
func tarOwner(id int) (uint32, error) {
	switch {
	case id == 1<<32-1:
		return 0, nil // chown(2)'s -1: the creator, root
	case id < 0 || int64(id) > 1<<32-1:
		return 0, fmt.Errorf("uid or gid %d out of range", id)
	}
	return uint32(id), nil
}

// checkImageAttrs applies the same rules to a pre-converted layer image,
// which is copied as it is: what a tar would lose is refused instead.
func checkImageAttrs(im *daxfs.Image) error {
	if !im.HasExtension() {
		return nil
	}
	for ino := uint32(1); ino <= im.InodeCount(); ino++ {
		in, err := im.Inode(ino)
		if errors.Is(err, daxfs.ErrNotExist) {
			continue // an unused slot
		}
		if err != nil {
			return err
		}
		if t := in.Mode & daxfs.ModeTypeMask; t == daxfs.ModeChar || t == daxfs.ModeBlock {
			if err := erofs.CheckDevice(im.Rdev(ino)); err != nil {
				return im.InodeError(ino, err)
			}
		}
		xs, err := im.Xattrs(ino)
		if err != nil {
			return err
		}
		for _, x := range xs {
			switch {
			case x.Name == ImplicitDirXattr && in.Mode&daxfs.ModeTypeMask == daxfs.ModeDir:
			case strings.HasPrefix(x.Name, "trusted."), isOverlayXattr(x.Name):
				return im.InodeError(ino, fmt.Errorf("xattr %q: a layer may not carry trusted.* xattrs (a tar's are dropped)", x.Name))
			case !erofs.KnownXattr(x.Name):
				return im.InodeError(ino, fmt.Errorf("xattr %q: Linux knows no such namespace (a tar's are dropped)", x.Name))
			}
		}
		if err := erofs.CheckXattrs(xs); err != nil {
			return im.InodeError(ino, err)
		}
	}
	return nil
}
