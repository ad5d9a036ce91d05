package daxfs

// Checking a Header's attributes into a node.

import (
	"fmt"
	"slices"
	"strings"
)

func checkType(mode uint32) bool {
	switch mode & ModeTypeMask {
	case ModeRegular, ModeDir, ModeSymlink, ModeChar, ModeBlock, ModeFIFO, ModeSocket:
		return true
	}
	return false
}

// attrs validates h's attributes into n (type bits excepted) and returns
// the extras it needs.
func (w *Writer) attrs(h *Header, n *wnode, ex *wextra) error {
	n.mode = n.mode&ModeTypeMask | h.Mode&ModePermMask
	n.uid, n.gid = h.UID, h.GID
	n.mtimeSec, n.mtimeNsec = 0, 0
	if !h.ModTime.IsZero() {
		n.mtimeSec, n.mtimeNsec = h.ModTime.Unix(), uint32(h.ModTime.Nanosecond())
	}
	if len(h.Xattrs) > 0 && !w.opts.NoExtension {
		xs := make([]Xattr, 0, len(h.Xattrs))
		for k, v := range h.Xattrs {
			switch {
			case k == "" || len(k) > MaxNameLen || strings.IndexByte(k, 0) >= 0:
				return fmt.Errorf("%w: xattr name %q", ErrInvalidHeader, k)
			case len(v) > MaxXattrValue:
				return fmt.Errorf("%w: xattr %s: value of %d bytes", ErrInvalidHeader, k, len(v))
			}
			xs = append(xs, Xattr{Name: k, Value: slices.Clone(v)})
		}
		slices.SortFunc(xs, func(a, b Xattr) int { return strings.Compare(a.Name, b.Name) })
		ex.xattrs = xs
	}
	return nil
}

func (w *Writer) setExtra(n *wnode, ex wextra) {
	if ex.target == "" && ex.rdev == 0 && ex.xattrs == nil {
		n.extra = -1
		return
	}
	if n.extra >= 0 {
		w.extras[n.extra] = ex
		return
	}
	w.extras = append(w.extras, ex)
	n.extra = int32(len(w.extras) - 1)
}
