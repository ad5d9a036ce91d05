package daxfs

// Layout: inode numbers and the offsets of every piece of metadata, fixed
// once the tree is complete.

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
)

// layout is the result of Layout.
type layout struct {
	order     []int32 // nodes in inode order
	inodeOff  uint64
	extOff    uint64
	extSize   uint64
	xattrSize uint64
	end       uint64 // own base image size (page aligned)
}

func alignUp(v, a uint64) uint64 { return (v + a - 1) &^ (a - 1) }

// Layout freezes the tree and returns the final image size in bytes. It is
// optional; Close calls it. After Layout only SetExternalBases and Close may
// be called.
func (w *Writer) Layout() (int64, error) {
	if w.err != nil {
		return 0, w.err
	}
	if w.closed {
		return 0, errors.New("daxfs: writer is closed")
	}
	if w.laidOut {
		return int64(BaseOffset + w.lay.end), nil
	}
	order := make([]int32, 1, w.nodes.n)
	order[0] = 0
	w.nodes.at(0).ino = 1
	less := func(a, b int32) int { return strings.Compare(w.ents.at(a).name, w.ents.at(b).name) }
	for i := 0; i < len(order); i++ {
		dn := w.nodes.at(order[i])
		if dn.dir < 0 {
			continue
		}
		kids := w.dirs[dn.dir]
		live := kids[:0]
		for _, k := range kids {
			if !w.ents.at(k).dead {
				live = append(live, k)
			}
		}
		clear(kids[len(live):])
		slices.SortFunc(live, less)
		w.dirs[dn.dir] = live
		dn.nlink = 2
		for _, k := range live {
			cn := w.ents.at(k).node
			c := w.nodes.at(cn)
			if c.dir >= 0 {
				w.nodes.at(order[i]).nlink++
			} else {
				c.nlink++
			}
			if c.ino == 0 {
				if uint64(len(order)) >= MaxInodes {
					return 0, fmt.Errorf("daxfs: %w", ErrTooManyNodes)
				}
				order = append(order, cn)
				c.ino = uint32(len(order))
			}
		}
	}
	l := layout{order: order}
	l.inodeOff = w.pos
	cur := l.inodeOff + uint64(len(order))*InodeSize
	for _, n := range order {
		nd := w.nodes.at(n)
		if nd.dir < 0 {
			continue
		}
		cnt := uint64(len(w.dirs[nd.dir]))
		nd.size = cnt * DirentSize
		nd.data = 0
		if cnt > 0 {
			nd.data = cur
			cur += cnt * DirentStride
		}
	}
	for _, n := range order {
		nd := w.nodes.at(n)
		if nd.mode&ModeTypeMask == ModeSymlink {
			nd.data = cur
			cur += nd.size + 1
		}
	}
	if !w.opts.NoExtension {
		if w.opts.ImplicitDirXattr != "" {
			mark := []Xattr{{Name: w.opts.ImplicitDirXattr, Value: []byte("1")}}
			for _, n := range order {
				if nd := w.nodes.at(n); nd.implicit {
					// Made by dirFor with no extras: the mark is all.
					w.setExtra(nd, wextra{xattrs: mark})
				}
			}
		}
		cur = alignUp(cur, 8)
		l.extOff = cur
		for _, n := range order {
			if x := w.nodes.at(n).extra; x >= 0 {
				for _, xa := range w.extras[x].xattrs {
					l.xattrSize += xattrHdrSize + uint64(len(xa.Name)) + uint64(len(xa.Value))
				}
			}
		}
		l.extSize = extHeaderSize + uint64(len(order))*extRecordSize + l.xattrSize
		cur += l.extSize
	}
	l.end = alignUp(cur, BlockSize)
	if l.end > math.MaxInt64-BaseOffset {
		return 0, fmt.Errorf("daxfs: %w: image of %d bytes", ErrNoSpace, l.end)
	}
	w.lay = l
	w.laidOut = true
	w.index = nil // names are frozen: let the lookup map go before Close
	w.lastDir, w.lastDirEnt = "", -1
	return int64(BaseOffset + l.end), nil
}

// SetExternalBases gives, for each external ref, the offset of that blob's
// byte 0 relative to this image's byte 0 (so an external file's data_offset
// becomes bases[ref] + offset - BaseOffset), and the size of the whole window
// from this image's start to the end of the last blob: the image's
// total_size and base_size are written to cover it.
func (w *Writer) SetExternalBases(bases []uint64, windowSize uint64) error {
	if _, err := w.Layout(); err != nil {
		return err
	}
	own := BaseOffset + w.lay.end
	if windowSize < own {
		return fmt.Errorf("daxfs: window of %d bytes is smaller than the image (%d bytes)", windowSize, own)
	}
	if windowSize%BlockSize != 0 {
		return fmt.Errorf("daxfs: window size %d is not a multiple of %d", windowSize, BlockSize)
	}
	for _, n := range w.lay.order {
		nd := w.nodes.at(n)
		if nd.ref < 0 || nd.size == 0 {
			continue // empty files get data_offset 0 like our own
		}
		var ino = nd.ino
		if int(nd.ref) >= len(bases) {
			return fmt.Errorf("daxfs: inode %d: external ref %d has no base (%d given)", ino, nd.ref, len(bases))
		}
		abs := bases[nd.ref] + nd.data
		if abs < bases[nd.ref] || abs < BaseOffset || abs%BlockSize != 0 {
			return fmt.Errorf("daxfs: inode %d: external data at %d+%d is not page aligned past the superblock", ino, bases[nd.ref], nd.data)
		}
		if abs+nd.size < abs || abs+nd.size > windowSize {
			return fmt.Errorf("daxfs: inode %d: external data %d+%d ends past the window (%d bytes)", ino, abs, nd.size, windowSize)
		}
	}
	w.bases = slices.Clone(bases)
	w.window = windowSize
	w.basesSet = true
	return nil
}
