package daxfs

import (
	"bytes"
	"fmt"
	"slices"
	"strings"
)

// Validate checks the whole image in time linear in its size: every offset,
// size, count and inode number, names (non-empty, no '/', no NUL, at most
// 255 bytes, no duplicates, not "." or ".."), 4096 alignment of file data,
// NUL-terminated symlinks, nlink, that no entry points at an unused slot,
// and that every used inode is reachable from the root. The error names the
// inode and the rule broken.
func Validate(b []byte) error {
	im, err := Open(b)
	if err != nil {
		return err
	}
	return im.Validate()
}

// validator holds the per-inode state of one Validate run.
type validator struct {
	im *Image
	// For directories reached from the root: the parent directory and the
	// entry index, to name paths in errors. parent[ino] == 0: not reached.
	parent []uint32
	entry  []uint32
	refs   []uint32 // names seen per non-directory inode
}

// Validate checks the image im reads; see the package function Validate.
func (im *Image) Validate() error {
	if err := im.checkInodes(); err != nil {
		return err
	}
	n := im.count
	v := &validator{im: im}
	v.parent = make([]uint32, n+1)
	v.entry = make([]uint32, n+1)
	v.refs = make([]uint32, n+1)
	v.parent[RootIno] = RootIno
	queue := []uint32{RootIno}
	var seen map[string]struct{}
	for qi := 0; qi < len(queue); qi++ {
		d := queue[qi]
		din := im.rawInode(d)
		cnt := din.Size / DirentSize
		var subdirs uint64
		var prev string
		if !im.sorted && cnt > 1 {
			if seen == nil {
				seen = make(map[string]struct{}, cnt)
			}
			clear(seen)
		}
		for i := range cnt {
			de, err := im.direntAt(din, i)
			if err != nil {
				return fmt.Errorf("%s: %w", v.path(d), err)
			}
			name := de.Name
			where := func() string { return v.path(d) + "/" + name }
			switch {
			case name == "." || name == "..":
				return corrupt("inode %d: entry %d %q (rule: no . or .. entries)", d, i, where())
			case strings.IndexByte(name, '/') >= 0 || strings.IndexByte(name, 0) >= 0:
				return corrupt("inode %d: entry %d %q: '/' or NUL in name (rule: valid names)", d, i, where())
			}
			if im.sorted {
				if i > 0 && name <= prev {
					if name == prev {
						return corrupt("inode %d: %q: duplicate name (rule: unique names)", d, where())
					}
					return corrupt("inode %d: %q after %q (rule: entries sorted by name)", d, where(), prev)
				}
				prev = name
			} else if cnt > 1 {
				if _, dup := seen[name]; dup {
					return corrupt("inode %d: %q: duplicate name (rule: unique names)", d, where())
				}
				seen[name] = struct{}{}
			}
			c := de.Ino
			if c == 0 || c > n {
				return corrupt("inode %d: %q points at inode %d of %d (rule: entry inode in range)", d, where(), c, n)
			}
			cin := im.rawInode(c)
			if cin.Ino == 0 && cin.Mode == 0 {
				return corrupt("inode %d: %q points at unused slot %d (rule: no entry at an unused slot)", d, where(), c)
			}
			if de.Mode != cin.Mode {
				return corrupt("inode %d: %q has mode %#o but inode %d has %#o (rule: entry mode = inode mode)", d, where(), de.Mode, c, cin.Mode)
			}
			if cin.IsDir() {
				if v.parent[c] != 0 {
					return corrupt("inode %d: %q: directory %d reached twice (rule: no hard-linked directories or cycles)", d, where(), c)
				}
				v.parent[c], v.entry[c] = d, uint32(i)
				subdirs++
				queue = append(queue, c)
			} else {
				v.refs[c]++
			}
		}
		if uint64(din.Nlink) != 2+subdirs {
			return corrupt("inode %d (%s): directory nlink %d, want %d = 2 + %d subdirectories (rule: nlink)", d, v.path(d), din.Nlink, 2+subdirs, subdirs)
		}
	}
	for ino := uint32(1); ino <= n; ino++ {
		in := im.rawInode(ino)
		if in.Ino == 0 && in.Mode == 0 {
			continue
		}
		if in.IsDir() {
			if v.parent[ino] == 0 {
				return corrupt("inode %d: directory not reachable from the root (rule: every used inode reachable)", ino)
			}
			continue
		}
		if v.refs[ino] == 0 {
			return corrupt("inode %d: not reachable from the root (rule: every used inode reachable)", ino)
		}
		if v.refs[ino] != in.Nlink {
			return corrupt("inode %d: nlink %d but %d names (rule: nlink counts names)", ino, in.Nlink, v.refs[ino])
		}
	}
	return v.checkExt()
}

// checkInodes checks every inode table slot on its own: type, sizes and
// the bounds of what it points at.
func (im *Image) checkInodes() error {
	var sumDir uint64
	for ino := uint32(1); ino <= im.count; ino++ {
		in := im.rawInode(ino)
		if in.Ino == 0 && in.Mode == 0 {
			if ino == RootIno {
				return corrupt("inode 1 (/): root slot unused")
			}
			continue
		}
		if in.Ino != ino {
			return im.inodeErr(ino, "slot holds ino %d (rule: ino = slot index + 1)", in.Ino)
		}
		if ino == RootIno && !in.IsDir() {
			return corrupt("inode 1 (/): root is not a directory (mode %#o)", in.Mode)
		}
		if in.Nlink == 0 {
			return im.inodeErr(ino, "nlink 0 (rule: used inodes have nlink >= 1)")
		}
		switch in.Mode & ModeTypeMask {
		case ModeRegular:
			if in.DataOffset%BlockSize != 0 {
				return im.inodeErr(ino, "file data_offset %d not 4096-aligned (rule: file data is page aligned)", in.DataOffset)
			}
			if in.Size > 0 {
				if _, err := im.span(in.DataOffset, in.Size, "file data", ino); err != nil {
					return im.withPath(ino, err)
				}
			}
		case ModeDir:
			if in.Size%DirentSize != 0 {
				return im.inodeErr(ino, "directory size %d not a multiple of %d (rule: size = count*271)", in.Size, DirentSize)
			}
			sumDir += in.Size
			if sumDir > uint64(len(im.base)) {
				return im.inodeErr(ino, "directory sizes add up to more than the base image (%d bytes)", len(im.base))
			}
			if c := in.Size / DirentSize; c > 0 {
				if _, err := im.span(in.DataOffset, (c-1)*DirentStride+direntName, "directory entries", ino); err != nil {
					return im.withPath(ino, err)
				}
			}
		case ModeSymlink:
			if in.Size == 0 || in.Size > MaxSymlinkLen {
				return im.inodeErr(ino, "symlink target length %d (rule: 1..%d)", in.Size, MaxSymlinkLen)
			}
			t, err := im.span(in.DataOffset, in.Size+1, "symlink target", ino)
			if err != nil {
				return im.withPath(ino, err)
			}
			if t[in.Size] != 0 {
				return im.inodeErr(ino, "symlink target not NUL terminated (rule: target followed by NUL)")
			}
			if bytes.IndexByte(t[:in.Size], 0) >= 0 {
				return im.inodeErr(ino, "NUL inside symlink target")
			}
		case ModeChar, ModeBlock, ModeFIFO, ModeSocket:
			if in.Size != 0 {
				return im.inodeErr(ino, "special file with size %d (rule: size 0)", in.Size)
			}
		default:
			return im.inodeErr(ino, "unknown file type in mode %#o", in.Mode)
		}
	}

	return nil
}

// inodeErr reports a broken rule about inode ino, naming its path when a
// bounded search finds one.
func (im *Image) inodeErr(ino uint32, format string, args ...any) error {
	return im.withPath(ino, corrupt(format, args...))
}

func (im *Image) withPath(ino uint32, err error) error {
	return im.InodeError(ino, err)
}

// InodeError wraps err about inode ino with the inode's number and, when a
// bounded search finds one, a path naming it: for errors about an image
// (validated or not) that a user must be able to act on.
func (im *Image) InodeError(ino uint32, err error) error {
	if p := im.findPath(ino); p != "" {
		return fmt.Errorf("inode %d (%s): %w", ino, p, err)
	}
	return fmt.Errorf("inode %d: %w", ino, err)
}

// findPath looks for a path naming inode ino by scanning directories for
// its parent, level by level. It runs only on the error path, on an image
// not yet known to be sane, so it is bounded in depth and in entries read.
func (im *Image) findPath(ino uint32) string {
	if ino == RootIno {
		return "/"
	}
	budget := 1 << 22
	var parts []string
	for depth := 0; ino != RootIno; depth++ {
		if depth == 256 {
			return ""
		}
		parent, name, ok := im.findParent(ino, &budget)
		if !ok {
			return ""
		}
		parts = append(parts, name)
		ino = parent
	}
	var sb strings.Builder
	for _, part := range slices.Backward(parts) {
		sb.WriteByte('/')
		sb.WriteString(part)
	}
	return sb.String()
}

func (im *Image) findParent(ino uint32, budget *int) (uint32, string, bool) {
	for d := uint32(1); d <= im.count; d++ {
		in := im.rawInode(d)
		if !in.IsDir() || in.Ino != d {
			continue
		}
		cnt := in.Size / DirentSize
		for i := range cnt {
			if *budget--; *budget <= 0 {
				return 0, "", false
			}
			de, err := im.direntAt(in, i)
			if err != nil {
				break
			}
			if de.Ino == ino && d != ino {
				return d, strings.Clone(de.Name), true
			}
		}
	}
	return 0, "", false
}

// path names directory ino (reached from the root) for errors.
func (v *validator) path(ino uint32) string {
	if ino == RootIno {
		return "/"
	}
	var parts []string
	for i := 0; ino != RootIno && i <= int(v.im.count); i++ {
		p := v.parent[ino]
		if p == 0 {
			return fmt.Sprintf("inode %d", ino)
		}
		pin := v.im.rawInode(p)
		d, err := v.im.direntAt(pin, uint64(v.entry[ino]))
		if err != nil {
			return fmt.Sprintf("inode %d", ino)
		}
		parts = append(parts, d.Name)
		ino = p
	}
	var sb strings.Builder
	for _, part := range slices.Backward(parts) {
		sb.WriteByte('/')
		sb.WriteString(part)
	}
	return sb.String()
}

// checkExt checks the extension block in one pass over records and xattrs.
func (v *validator) checkExt() error {
	im := v.im
	if im.ext == nil {
		return nil
	}
	var cursor uint64
	for ino := uint32(1); ino <= im.count; ino++ {
		r := im.record(ino)
		in := im.rawInode(ino)
		if in.Ino == 0 && in.Mode == 0 {
			for _, c := range r {
				if c != 0 {
					return corrupt("inode %d: extension record of an unused slot is not zero", ino)
				}
			}
			continue
		}
		if nsec := erMtimeNsec.get(r); nsec >= 1e9 {
			return corrupt("inode %d: mtime nanoseconds %d (rule: < 1e9)", ino, nsec)
		}
		typ := in.Mode & ModeTypeMask
		if rdev := erRdev.get(r); rdev != 0 && typ != ModeChar && typ != ModeBlock {
			return corrupt("inode %d: rdev %#x on a non-device (rule: rdev only for devices)", ino, rdev)
		}
		cnt, off := erXattrCount.get(r), erXattrOff.get(r)
		if cnt == 0 {
			if off != 0 {
				return corrupt("inode %d: xattr offset %d with no xattrs", ino, off)
			}
			continue
		}
		if off != cursor {
			return corrupt("inode %d: xattrs at %d, want %d (rule: xattr runs contiguous in inode order)", ino, off, cursor)
		}
		var prev string
		for i := range cnt {
			name, _, next, err := im.xattrAt(ino, cursor)
			if err != nil {
				return err
			}
			if strings.IndexByte(name, 0) >= 0 {
				return corrupt("inode %d: NUL in xattr name %q", ino, name)
			}
			if i > 0 && name <= prev {
				return corrupt("inode %d: xattr %q after %q (rule: xattrs sorted by name, unique)", ino, name, prev)
			}
			prev = name
			cursor = next
		}
	}
	if cursor != uint64(len(im.xattrs)) {
		return corrupt("extension block: xattr runs end at %d of a %d-byte area", cursor, len(im.xattrs))
	}
	return nil
}
