package converter

import (
	"fmt"
	"strconv"

	"github.com/containerd/errdefs"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// ErrLimit is the error of a layer that exceeds one of the operator's Limits. Such a layer
// is refused as invalid, as containerd refuses a path the kernel cannot
// create ("file name too long").
var ErrLimit error = &classError{"layer exceeds a limit", errdefs.ErrInvalidArgument}

// Limits bound what one layer may make the daemon hold and do: every cost
// of a conversion is linear in the layer's entries and path bytes, and
// these bound those. A zero field takes its default.
type Limits struct {
	// MaxEntries bounds the names in a layer image: its entries, hard
	// links and the directories made as missing parents. The converter
	// peaks at about 500 bytes of heap per name (1,000,000 names in one
	// directory: 500 MiB, BenchmarkHostileWideDir).
	MaxEntries int
	// MaxPathLen bounds an entry's path in bytes, after cleaning. The
	// default is the kernel's PATH_MAX: containerd's applier cannot create
	// a longer path either.
	MaxPathLen int
	// MaxDepth bounds an entry's path in components.
	MaxDepth int
}

// Default limits.
const (
	DefaultMaxEntries = 2_000_000
	DefaultMaxPathLen = 4096
	DefaultMaxDepth   = 2048
)

func (l Limits) withDefaults() Limits {
	if l.MaxEntries <= 0 {
		l.MaxEntries = DefaultMaxEntries
	}
	if l.MaxPathLen <= 0 {
		l.MaxPathLen = DefaultMaxPathLen
	}
	if l.MaxDepth <= 0 {
		l.MaxDepth = DefaultMaxDepth
	}
	return l
}

// quotePath quotes a path for an error message, shortened: a hostile
// layer's path may be megabytes long.
func quotePath(p string) string {
	const keep = 96
	if len(p) <= 2*keep {
		return strconv.Quote(p)
	}
	return strconv.Quote(p[:keep]) + "..." + strconv.Quote(p[len(p)-keep:]) + " (" + strconv.Itoa(len(p)) + " bytes)"
}

// checkImage applies the limits to a validated layer image (a
// pre-converted layer, which no tar parse bounded): its names, and every
// entry's depth and path length, in one walk of its directories.
func (l Limits) checkImage(im *daxfs.Image) error {
	l = l.withDefaults()
	if n := int64(im.InodeCount()); n > int64(l.MaxEntries) {
		return fmt.Errorf("%w: %d inodes, more than %d (limits.max_entries)", ErrLimit, n, l.MaxEntries)
	}
	type dir struct {
		ino          uint32
		depth, bytes int
	}
	names := 0
	queue := []dir{{ino: daxfs.RootIno}}
	for len(queue) > 0 {
		d := queue[len(queue)-1]
		queue = queue[:len(queue)-1]
		ents, err := im.ReadDir(d.ino)
		if err != nil {
			return err
		}
		names += len(ents)
		if names > l.MaxEntries {
			return im.InodeError(d.ino, fmt.Errorf("%w: more than %d names (limits.max_entries)", ErrLimit, l.MaxEntries))
		}
		for _, e := range ents {
			depth, bytes := d.depth+1, d.bytes+len(e.Name)
			if d.depth > 0 {
				bytes++ // the slash
			}
			switch {
			case depth > l.MaxDepth:
				return im.InodeError(e.Ino, fmt.Errorf("%w: path of %d components exceeds the limit of %d (limits.max_depth)", ErrLimit, depth, l.MaxDepth))
			case bytes > l.MaxPathLen:
				return im.InodeError(e.Ino, fmt.Errorf("%w: path of %d bytes exceeds the limit of %d (limits.max_path_len)", ErrLimit, bytes, l.MaxPathLen))
			}
			if e.Mode&daxfs.ModeTypeMask == daxfs.ModeDir {
				queue = append(queue, dir{e.Ino, depth, bytes})
			}
		}
	}
	return nil
}
