package daxmem

import "testing"

// TestDefaultLayout pins the offsets documented in doc.go.
func TestDefaultLayout(t *testing.T) {
	g, err := layout(DefaultSize, pageSize, DefaultParticipants, DefaultEntries, 0)
	if err != nil {
		t.Fatal(err)
	}
	if g.partOff != 4096 || g.indexOff != 20480 || g.dataOff != 806912 || g.dataSize != DefaultSize-806912 ||
		g.viewArea != g.dataSize/8/pageSize*pageSize || g.layerFloor() != g.dataOff+g.viewArea {
		t.Fatalf("default layout %+v", g)
	}
	// Every participant slot and index entry starts on a 64-byte line, so
	// no 8-byte word crosses a cache line.
	if participantSize%64 != 0 || entrySize%64 != 0 || g.partOff%64 != 0 || g.indexOff%64 != 0 {
		t.Fatal("slots not cache-line aligned")
	}
	for _, off := range []int64{hLock, hGen, hMaxProbe} {
		if off%64 != 0 {
			t.Fatalf("mutable header word at %d shares a line", off)
		}
	}
	for _, c := range []struct {
		size        int64
		align       int64
		parts, ents int
	}{
		{1 << 20, 3000, 1, 1},       // alignment not a power of two
		{1<<20 + 1, pageSize, 1, 1}, // size not aligned
		{8192, pageSize, 1, 1},      // too small for metadata plus data
		{1 << 20, pageSize, 0, 1},
		{1 << 20, pageSize, 65, 1},
		{1 << 20, pageSize, 1, 0},
	} {
		if _, err := layout(c.size, c.align, c.parts, c.ents, 0); err == nil {
			t.Errorf("layout(%d, %d, %d, %d) accepted", c.size, c.align, c.parts, c.ents)
		}
	}
}
