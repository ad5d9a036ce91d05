package daxfs

import (
	"errors"
	"math/rand/v2"
	"testing"
	"time"
)

// TestMutatedImagesNeverPanic flips metadata fields of good images to
// boundary values (seeded, so it is repeatable): Validate must reject or
// accept without panicking or hanging, and every accessor must survive.
func TestMutatedImagesNeverPanic(t *testing.T) {
	seeds := [][]byte{readFixture(t, "static.daxfs"), goodImage(t)}
	_, ops := genTree(3, 300)
	seeds = append(seeds, buildImage(t, WriterOptions{}, func(w *Writer) { applyOps(t, w, ops) }))
	r := rand.New(rand.NewPCG(7, 9))
	vals := []uint64{0, 1, 2, 255, 256, 271, 272, 4095, 4096, 1 << 31, 1<<32 - 1, 1 << 32, 1<<63 - 1, 1 << 63, ^uint64(0), ^uint64(0) - 1}
	var worst time.Duration // logged: time limits belong in benchmarks
	iters := 3000
	if testing.Short() {
		iters = 500
	}
	for i := 0; i < iters; i++ {
		src := seeds[i%len(seeds)]
		b := append([]byte(nil), src...)
		// Mutate mostly in metadata: the superblocks and the first/last 64 KiB.
		for k := 0; k < 1+r.IntN(4); k++ {
			var off int
			switch r.IntN(3) {
			case 0:
				off = r.IntN(min(len(b), 8192))
			case 1:
				off = r.IntN(len(b))
			default:
				off = len(b) - 1 - r.IntN(min(len(b), 1<<16))
			}
			off &^= 3
			if r.IntN(2) == 0 && off+8 <= len(b) {
				le.PutUint64(b[off:], vals[r.IntN(len(vals))])
			} else if off+4 <= len(b) {
				le.PutUint32(b[off:], uint32(vals[r.IntN(len(vals))]))
			}
		}
		s := time.Now()
		if err := Validate(b); err == nil {
			im, _ := Open(b)
			if _, err := im.Tree(); err != nil {
				t.Fatalf("iteration %d: Validate accepted but Tree failed: %v", i, err)
			}
		} else if !errors.Is(err, ErrCorrupt) {
			t.Fatalf("iteration %d: error %v does not wrap ErrCorrupt", i, err)
		}
		exercise(b)
		d := time.Since(s)
		worst = max(worst, d)

	}
	t.Logf("worst %v", worst)
}
