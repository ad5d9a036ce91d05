package converter

import (
	"strconv"

	"github.com/containerd/errdefs"
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
	// holds about 150 bytes of memory per name.
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
