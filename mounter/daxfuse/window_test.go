package daxfuse

import "testing"

// TestMapBounds: a window of a file is mapped from its page; a window of
// a device DAX instance is mapped in whole granules of the device's
// alignment (device DAX refuses other mappings), never past its end.
func TestMapBounds(t *testing.T) {
	const mib2 = 2 << 20
	for _, tc := range []struct {
		name                 string
		offset, length, size int64
		align                int64
		regular              bool
		start, end           int64
	}{
		{"file", 192512, 874254336, 1 << 30, 4096, true, 192512, 192512 + 874254336},
		{"file, unaligned offset", 5000, 100, 1 << 20, 4096, true, 4096, 5100},
		{"devdax view", 192512, 874254336, 1 << 30, mib2, false, 0, 417 * mib2},
		{"devdax at the end", (1 << 30) - 8192, 8192, 1 << 30, mib2, false, (1 << 30) - mib2, 1 << 30},
		{"devdax aligned", mib2, mib2, 1 << 30, mib2, false, mib2, 2 * mib2},
		{"devdax end clamped to the device", 4096, 4096, 3 << 20, 4 << 20, false, 0, 3 << 20},
	} {
		start, end := mapBounds(tc.offset, tc.length, tc.align, tc.size, tc.regular)
		if start != tc.start || end != tc.end {
			t.Errorf("%s: mapBounds = [%d, %d), want [%d, %d)", tc.name, start, end, tc.start, tc.end)
		}
		if start > tc.offset || end < tc.offset+tc.length {
			t.Errorf("%s: [%d, %d) does not cover the window", tc.name, start, end)
		}
	}
}
