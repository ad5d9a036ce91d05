package daxmem

import (
	"fmt"
	"strings"

	"github.com/docker/go-units"
)

// MaxSize is the largest size ParseSize accepts (4 EiB): far beyond any
// region, and small enough that sums of sizes do not overflow an int64.
const MaxSize = 1 << 62

// ParseSize parses a byte size as every size of the project is written:
// the daemon's config (region.size, max_layer_size, view_area), its
// --region-size flag and `region init --size` and `--view-area`. A size
// is a number (a fraction is allowed) with an optional unit K, M, G, T or
// P, each optionally followed by "i", "B" or "iB", in any case, and an
// optional space before it. Units are binary: "8G", "8GiB" and "8GB" are
// all 8*2^30 bytes, as Docker's --memory reads them (go-units'
// RAMInBytes, which this wraps).
func ParseSize(s string) (int64, error) {
	n, err := units.RAMInBytes(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("size %q: %w: want a number of bytes with an optional unit K, M, G, T or P (binary: 1G = 1GiB = 1GB = 1073741824)", s, ErrInvalidSize)
	}
	// go-units converts a float: a value past int64 comes out negative or
	// saturated, depending on the CPU.
	if n < 0 || n > MaxSize {
		return 0, fmt.Errorf("size %q: %w: larger than %d bytes", s, ErrInvalidSize, int64(MaxSize))
	}
	return n, nil
}
