package daxmem

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"sync/atomic"
	"unsafe"
)

// Format constants. Changing any layout below needs a new Version.
const (
	// Magic is the first 8 bytes of a region, "DAXMEM\x00\x01" read as little endian.
	Magic uint64 = 0x0100_4d45_4d58_4144
	// Version 2: index entries of 192 bytes with a target key (aliases),
	// and a view area at the bottom of the data area.
	Version uint32 = 2

	pageSize        = 4096
	headerSize      = pageSize
	participantSize = 256
	entrySize       = 192

	// MaxParticipants is the number of bits of an entry's reference bitmap.
	MaxParticipants = 64
	// MaxEntries bounds the index so a damaged header cannot make us map or
	// scan absurd tables.
	MaxEntries = 1 << 20

	checksumCRC32C = 1
)

// Header field offsets.
const (
	hMagic        = 0
	hVersion      = 8  // u32
	hHeaderSize   = 12 // u32
	hSize         = 16
	hAlign        = 24
	hParticipants = 32 // u32
	hPartSize     = 36 // u32
	hPartOff      = 40
	hEntries      = 48 // u32
	hEntrySize    = 52 // u32
	hIndexOff     = 56
	hDataOff      = 64
	hDataSize     = 72
	hCreated      = 80
	hChecksumAlg  = 88 // u32
	hFlags        = 92 // u32
	hUUID         = 96 // 16 bytes
	hViewArea     = 112
	hHeaderCRC    = 120
	hImmutableEnd = 120 // the CRC covers [8, hImmutableEnd)

	// Mutable words, each on its own cache line.
	hLock     = 128 // owner(8) | incarnation(24) | lease deadline seconds since creation(32)
	hGen      = 192 // bumped on every index change
	hMaxProbe = 256 // longest probe distance ever used
)

// Participant slot field offsets.
const (
	pState     = 0 // state(8) | incarnation(32)<<8
	pHeartbeat = 8 // unix ns
	pPID       = 16
	pStarted   = 24
	pBootID    = 32 // 16 bytes
	pPIDNS     = 48
	pToken     = 56 // 16 bytes
	pHost      = 72 // 64 bytes
	hostMax    = 64
)

// Index entry field offsets.
const (
	eState     = 0  // state(8) | kind(8)<<8 | writer(8)<<16 | gen(40)<<24
	eKey       = 8  // 32 bytes
	eOffset    = 40 // region offset of the extent
	eExtent    = 48 // allocated bytes (page multiple)
	eLength    = 56 // image bytes
	eChecksum  = 64
	eRefs      = 72 // one bit per participant
	eWriterInc = 80 // incarnation of the writer that claimed it
	eCreated   = 88
	ePublished = 96
	eTarget    = 104 // 32 bytes: an alias's layer key
)

// geometry is the immutable part of the header.
type geometry struct {
	size         int64
	align        int64
	participants int
	partOff      int64
	entries      int
	indexOff     int64
	dataOff      int64
	dataSize     int64
	// viewArea is the size of the view area: the first viewArea bytes of
	// the data area, where layers never go (see place).
	viewArea int64
	created  int64
	uuid     [16]byte
}

// layerFloor is the region offset layers are placed at or above.
func (g geometry) layerFloor() int64 { return g.dataOff + g.viewArea }

// defaultViewArea is the view area of a new region given its data area:
// an eighth. A view holds metadata only, about 370 bytes per file: a
// Debian image's (6,800 entries) is 2.4 MiB over 208 MiB of layers, but an
// image of 400,000 empty files has a view as large as its layer.
func defaultViewArea(dataSize, align int64) int64 {
	return max(dataSize/8/align*align, align)
}

func alignUp(v, a int64) int64 { return (v + a - 1) / a * a }

// layout computes the geometry of a new region. viewArea 0 takes the
// default.
func layout(size, align int64, participants, entries int, viewArea int64) (geometry, error) {
	if participants < 1 || participants > MaxParticipants {
		return geometry{}, fmt.Errorf("participants %d out of range 1..%d", participants, MaxParticipants)
	}
	if entries < 1 || entries > MaxEntries {
		return geometry{}, fmt.Errorf("entries %d out of range 1..%d", entries, MaxEntries)
	}
	if align < pageSize || align&(align-1) != 0 {
		return geometry{}, fmt.Errorf("alignment %d is not a power of two >= %d", align, pageSize)
	}
	g := geometry{size: size, align: align, participants: participants, entries: entries}
	g.partOff = headerSize
	g.indexOff = alignUp(g.partOff+int64(participants)*participantSize, pageSize)
	g.dataOff = alignUp(g.indexOff+int64(entries)*entrySize, pageSize)
	if size%align != 0 {
		return geometry{}, fmt.Errorf("size %d is not a multiple of the backend alignment %d", size, align)
	}
	if size < g.dataOff+pageSize {
		return geometry{}, fmt.Errorf("size %d too small: metadata for %d participants and %d entries needs %d bytes plus data", size, participants, entries, g.dataOff)
	}
	g.dataSize = size - g.dataOff
	if viewArea == 0 {
		viewArea = defaultViewArea(g.dataSize, align)
	}
	if viewArea < 0 || viewArea%align != 0 || viewArea >= g.dataSize {
		return geometry{}, fmt.Errorf("view area of %d bytes: want a multiple of the alignment %d below the data area's %d bytes", viewArea, align, g.dataSize)
	}
	g.viewArea = viewArea
	return g, nil
}

// encodeHeader writes the immutable header fields and their CRC into h.
// The magic is written by the caller last, once everything else is in place.
func encodeHeader(h []byte, g geometry) {
	le := binary.LittleEndian
	le.PutUint32(h[hVersion:], Version)
	le.PutUint32(h[hHeaderSize:], headerSize)
	le.PutUint64(h[hSize:], uint64(g.size))
	le.PutUint64(h[hAlign:], uint64(g.align))
	le.PutUint32(h[hParticipants:], uint32(g.participants))
	le.PutUint32(h[hPartSize:], participantSize)
	le.PutUint64(h[hPartOff:], uint64(g.partOff))
	le.PutUint32(h[hEntries:], uint32(g.entries))
	le.PutUint32(h[hEntrySize:], entrySize)
	le.PutUint64(h[hIndexOff:], uint64(g.indexOff))
	le.PutUint64(h[hDataOff:], uint64(g.dataOff))
	le.PutUint64(h[hDataSize:], uint64(g.dataSize))
	le.PutUint64(h[hCreated:], uint64(g.created))
	le.PutUint64(h[hViewArea:], uint64(g.viewArea))
	le.PutUint32(h[hChecksumAlg:], checksumCRC32C)
	le.PutUint32(h[hFlags:], 0)
	copy(h[hUUID:hUUID+16], g.uuid[:])
	le.PutUint64(h[hHeaderCRC:], uint64(crc32.Checksum(h[8:hImmutableEnd], castagnoli)))
}

// HeaderError reports a header that is not a valid region of this version.
type HeaderError struct {
	Path   string
	Reason string
}

func (e *HeaderError) Error() string {
	return fmt.Sprintf("region %s: invalid header: %s (refusing to use or reinitialise it)", e.Path, e.Reason)
}

func (e *HeaderError) Unwrap() error { return ErrBadHeader }

// parseHeader validates a header against the mapped length it came from.
// It never trusts a field before checking it: the bytes may be anything.
func parseHeader(path string, b []byte, mapped int64) (geometry, error) {
	bad := func(format string, a ...any) (geometry, error) {
		return geometry{}, &HeaderError{Path: path, Reason: fmt.Sprintf(format, a...)}
	}
	if len(b) < headerSize {
		return bad("only %d bytes, a header needs %d", len(b), headerSize)
	}
	le := binary.LittleEndian
	if m := le.Uint64(b[hMagic:]); m != Magic {
		allZero := true
		for _, c := range b[:headerSize] {
			if c != 0 {
				allZero = false
				break
			}
		}
		if allZero {
			return bad("all-zero header: not initialised (run `region init`)")
		}
		return bad("magic %#x, want %#x", m, Magic)
	}
	if v := le.Uint32(b[hVersion:]); v != Version {
		return bad("format version %d, this build reads version %d: a region holds only images that can be made again; stop every participant, then remove the file (a device: run `region init` on it) and pull the images again", v, Version)
	}
	if crc := uint32(le.Uint64(b[hHeaderCRC:])); crc != crc32.Checksum(b[8:hImmutableEnd], castagnoli) {
		return bad("header checksum mismatch")
	}
	if le.Uint32(b[hHeaderSize:]) != headerSize || le.Uint32(b[hPartSize:]) != participantSize || le.Uint32(b[hEntrySize:]) != entrySize {
		return bad("unexpected structure sizes")
	}
	if alg := le.Uint32(b[hChecksumAlg:]); alg != checksumCRC32C {
		return bad("unknown checksum algorithm %d", alg)
	}
	g := geometry{
		size:         int64(le.Uint64(b[hSize:])),
		align:        int64(le.Uint64(b[hAlign:])),
		participants: int(le.Uint32(b[hParticipants:])),
		entries:      int(le.Uint32(b[hEntries:])),
		created:      int64(le.Uint64(b[hCreated:])),
	}
	copy(g.uuid[:], b[hUUID:hUUID+16])
	if g.size <= 0 || g.align <= 0 {
		return bad("size %d / alignment %d", g.size, g.align)
	}
	want, err := layout(g.size, g.align, g.participants, g.entries, int64(le.Uint64(b[hViewArea:])))
	if err != nil {
		return bad("geometry: %v", err)
	}
	if int64(le.Uint64(b[hPartOff:])) != want.partOff || int64(le.Uint64(b[hIndexOff:])) != want.indexOff ||
		int64(le.Uint64(b[hDataOff:])) != want.dataOff || int64(le.Uint64(b[hDataSize:])) != want.dataSize {
		return bad("table offsets do not match the geometry")
	}
	if g.size > mapped {
		return bad("header says %d bytes but only %d are there (truncated?)", g.size, mapped)
	}
	want.created, want.uuid = g.created, g.uuid
	return want, nil
}

// word returns the uint64 at off in mem for atomic access. off must be 8
// aligned; mem is a page aligned mapping, so the word is 8 aligned too.
func word(mem []byte, off int64) *uint64 {
	return (*uint64)(unsafe.Pointer(&mem[off]))
}

func load(mem []byte, off int64) uint64     { return atomic.LoadUint64(word(mem, off)) }
func store(mem []byte, off int64, v uint64) { atomic.StoreUint64(word(mem, off), v) }
func cas(mem []byte, off int64, old, new uint64) bool {
	return atomic.CompareAndSwapUint64(word(mem, off), old, new)
}

// loadBytes and storeBytes move small byte fields (keys, names) word by word
// with atomics, so concurrent readers never see torn words and the race
// detector stays quiet within a process.
func loadBytes(mem []byte, off int64, dst []byte) {
	var w [8]byte
	for i := 0; i < len(dst); i += 8 {
		binary.LittleEndian.PutUint64(w[:], load(mem, off+int64(i)))
		copy(dst[i:], w[:])
	}
}

func storeBytes(mem []byte, off int64, src []byte, n int) {
	var w [8]byte
	for i := 0; i < n; i += 8 {
		clear(w[:])
		if i < len(src) {
			copy(w[:], src[i:])
		}
		store(mem, off+int64(i), binary.LittleEndian.Uint64(w[:]))
	}
}
