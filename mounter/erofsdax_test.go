package mounter

import (
	"strings"
	"testing"
)

// TestDAXMetaKey: only our device-mapper devices name a metadata image.
func TestDAXMetaKey(t *testing.T) {
	hex := strings.Repeat("ab", 32)
	for _, tc := range []struct {
		source string
		ok     bool
	}{
		{"/dev/mapper/daxfs-erofs-" + hex, true},
		{"/dev/mapper/daxfs-erofs-" + hex[:62], false},
		{"/dev/mapper/daxfs-erofs-" + strings.Repeat("zz", 32), false},
		{"/dev/mapper/other-" + hex, false},
		{"/dev/loop3", false},
		{"daxfs-erofs-" + hex, false},
		{"", false},
	} {
		k, ok := daxMetaKey(tc.source)
		if ok != tc.ok {
			t.Errorf("daxMetaKey(%q) = %v, want %v", tc.source, ok, tc.ok)
		}
		if ok && k[0] != 0xab {
			t.Errorf("daxMetaKey(%q) = %x", tc.source, k)
		}
	}
}
