package daxmem

import (
	"hash/crc32"
	"math/rand/v2"
	"testing"
)

// TestCRC32Combine: the combination of two parts' CRCs is the CRC of the
// whole, for split points around byte, word and power-of-two boundaries.
func TestCRC32Combine(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	b := make([]byte, 1<<16+37)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	for _, split := range []int{0, 1, 2, 3, 7, 8, 63, 64, 65, 4095, 4096, 1 << 15, len(b) - 1, len(b)} {
		want := crc32.Checksum(b, castagnoli)
		got := crc32Combine(crc32.Checksum(b[:split], castagnoli), crc32.Checksum(b[split:], castagnoli), int64(len(b)-split))
		if got != want {
			t.Errorf("split at %d: combined %08x, whole %08x", split, got, want)
		}
	}
}

// TestChecksumParallel: split into any number of parts, the last one
// uneven, a buffer checksums to the CRC-32C of the whole.
func TestChecksumParallel(t *testing.T) {
	b := make([]byte, 1<<20+12345)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	for _, n := range []int{len(b), 1 << 20, 4099, 5, 1} {
		want := uint64(crc32.Checksum(b[:n], castagnoli))
		for parts := 1; parts <= 5; parts++ {
			got, err := checksumParts(b[:n], parts)
			if err != nil {
				t.Fatal(err)
			}
			if got != want {
				t.Errorf("%d bytes in %d parts: checksum %08x, want %08x", n, parts, got, want)
			}
		}
	}
	if got, err := checksum(b); err != nil || got != uint64(crc32.Checksum(b, castagnoli)) {
		t.Errorf("checksum of %d bytes: %08x, %v", len(b), got, err)
	}
}

// BenchmarkChecksum: CRC-32C of a 214 MB image (a Debian layer), in parts
// on all CPUs against one core.
func BenchmarkChecksum(b *testing.B) {
	buf := make([]byte, 214<<20)
	for i := range buf {
		buf[i] = byte(i)
	}
	b.SetBytes(int64(len(buf)))
	b.Run("parts", func(b *testing.B) {
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			if _, err := checksum(buf); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("one-core", func(b *testing.B) {
		b.SetBytes(int64(len(buf)))
		for b.Loop() {
			crc32.Checksum(buf, castagnoli)
		}
	})
}
