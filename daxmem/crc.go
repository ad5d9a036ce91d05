package daxmem

import (
	"fmt"
	"hash/crc32"
	"runtime"
	"runtime/debug"
	"sync"
)

// castagnoliReversed is the CRC-32C polynomial in the bit order of
// hash/crc32's (reflected) tables.
const castagnoliReversed = 0x82f63b78

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// parallelCRCMin is the size from which checksum splits its input across
// the CPUs: below it one core takes a few milliseconds.
const parallelCRCMin = 32 << 20

// checksum is CRC-32C (hardware accelerated on amd64 and arm64, >5 GB/s
// per core): it detects corruption, not tampering. Large images are
// checksummed in parts on all CPUs and the parts combined, which halves a
// layer's publish time on two cores. A fault while reading the mapping
// becomes an error instead of killing the process.
func checksum(b []byte) (uint64, error) {
	return checksumParts(b, min(runtime.GOMAXPROCS(0), len(b)/parallelCRCMin))
}

// checksumParts is checksum over parts goroutines, each taking an equal
// share of b (the last one the rest).
func checksumParts(b []byte, parts int) (uint64, error) {
	parts = min(parts, len(b))
	if parts <= 1 {
		sum, err := crcPart(b)
		return uint64(sum), err
	}
	size := len(b) / parts
	sums := make([]uint32, parts)
	errs := make([]error, parts)
	var wg sync.WaitGroup
	for i := range parts {
		lo, hi := i*size, (i+1)*size
		if i == parts-1 {
			hi = len(b)
		}
		wg.Go(func() { sums[i], errs[i] = crcPart(b[lo:hi]) })
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return 0, err
		}
	}
	sum := sums[0]
	for i := 1; i < parts; i++ {
		n := size
		if i == parts-1 {
			n = len(b) - i*size
		}
		sum = crc32Combine(sum, sums[i], int64(n))
	}
	return uint64(sum), nil
}

// crcPart checksums b, turning a fault on the mapping into an error (the
// setting is per goroutine).
func crcPart(b []byte) (sum uint32, err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			err = fmt.Errorf("fault reading the region: %v", p)
		}
	}()
	return crc32.Checksum(b, castagnoli), nil
}

// crc32Combine returns the CRC-32C of A followed by B from crcA, crcB and
// B's length: it appends lenB zero bits to crcA by repeated squaring of
// the CRC's shift operator over GF(2) (zlib's crc32_combine), then adds
// crcB.
func crc32Combine(crcA, crcB uint32, lenB int64) uint32 {
	if lenB <= 0 {
		return crcA
	}
	var even, odd [32]uint32
	// odd: the operator for one zero bit.
	odd[0] = castagnoliReversed
	row := uint32(1)
	for n := 1; n < 32; n++ {
		odd[n] = row
		row <<= 1
	}
	gf2Square(&even, &odd) // two zero bits
	gf2Square(&odd, &even) // four
	// Each step squares the operator (one zero byte, then two, four, ...)
	// and applies it where lenB has a bit.
	for {
		gf2Square(&even, &odd)
		if lenB&1 != 0 {
			crcA = gf2Times(&even, crcA)
		}
		lenB >>= 1
		if lenB == 0 {
			break
		}
		gf2Square(&odd, &even)
		if lenB&1 != 0 {
			crcA = gf2Times(&odd, crcA)
		}
		lenB >>= 1
		if lenB == 0 {
			break
		}
	}
	return crcA ^ crcB
}

func gf2Times(mat *[32]uint32, vec uint32) uint32 {
	var sum uint32
	for i := 0; vec != 0; i, vec = i+1, vec>>1 {
		if vec&1 != 0 {
			sum ^= mat[i]
		}
	}
	return sum
}

func gf2Square(square, mat *[32]uint32) {
	for n := range 32 {
		square[n] = gf2Times(mat, mat[n])
	}
}
