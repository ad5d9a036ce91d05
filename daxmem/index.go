package daxmem

import (
	"encoding/binary"
	"sort"
	"sync/atomic"
	"time"
)

// Entry state word: state(8) | kind(8)<<8 | writer(8)<<16 | generation(40)<<24.
func eWord(st State, k Kind, writer int, gen uint64) uint64 {
	return uint64(st) | uint64(k)<<8 | uint64(uint8(writer))<<16 | (gen&(1<<40-1))<<24
}
func eStateOf(w uint64) State { return State(w) }
func eKindOf(w uint64) Kind   { return Kind(w >> 8) }
func eWriterOf(w uint64) int  { return int(uint8(w >> 16)) }
func eGenOf(w uint64) uint64  { return w >> 24 }

// next is the word after a transition to st: the generation always moves.
func next(w uint64, st State, k Kind, writer int) uint64 {
	return eWord(st, k, writer, eGenOf(w)+1)
}

func (r *Region) eOff(s int) int64 { return r.g.indexOff + int64(s)*entrySize }

func (r *Region) home(k Kind, key Key) int {
	h := binary.LittleEndian.Uint64(key[:8]) ^ uint64(k)*0x9e3779b97f4a7c15
	return int(h % uint64(r.g.entries))
}

func (r *Region) keyAt(s int) Key {
	var k Key
	loadBytes(r.mem, r.eOff(s)+eKey, k[:])
	return k
}

// readEntry reads slot s consistently (the state word is unchanged across
// the field reads). ok is false for FREE slots.
func (r *Region) readEntry(s int) (Entry, uint64, bool) {
	off := r.eOff(s)
	for {
		w := load(r.mem, off+eState)
		if eStateOf(w) == StateFree {
			return Entry{}, w, false
		}
		e := Entry{
			Slot:              s,
			State:             eStateOf(w),
			Kind:              eKindOf(w),
			Key:               r.keyAt(s),
			Offset:            int64(load(r.mem, off+eOffset)),
			Extent:            int64(load(r.mem, off+eExtent)),
			Length:            int64(load(r.mem, off+eLength)),
			Checksum:          load(r.mem, off+eChecksum),
			Refs:              load(r.mem, off+eRefs),
			Writer:            ParticipantID(eWriterOf(w)),
			WriterIncarnation: uint32(load(r.mem, off+eWriterInc)),
			Created:           time.Unix(0, int64(load(r.mem, off+eCreated))),
			Generation:        eGenOf(w),
		}
		if p := int64(load(r.mem, off+ePublished)); p != 0 {
			e.Published = time.Unix(0, p)
		}
		if e.Kind == KindAlias {
			loadBytes(r.mem, off+eTarget, e.Target[:])
		}
		if load(r.mem, off+eState) == w {
			return e, w, true
		}
	}
}

// sane says whether an entry's extent lies in the data area: a damaged
// index must not make us hand out slices of metadata or beyond the end.
func (r *Region) sane(e Entry) bool {
	if e.Kind == KindAlias {
		return e.State == StateReady && e.Offset == 0 && e.Extent == 0 && e.Length == 0 && int(e.Writer) < MaxParticipants
	}
	return e.Kind.valid() && e.Offset >= r.g.dataOff && e.Offset%pageSize == 0 &&
		e.Extent > 0 && e.Extent <= r.g.size-e.Offset && e.Length >= 0 && e.Length <= e.Extent &&
		int(e.Writer) < MaxParticipants
}

// find returns the non-FREE entry for (kind, key) along its probe chain.
func (r *Region) find(k Kind, key Key) (Entry, uint64, bool) {
	h := r.home(k, key)
	maxProbe := int(load(r.mem, hMaxProbe))
	if maxProbe >= r.g.entries {
		maxProbe = r.g.entries - 1
	}
	want := binary.LittleEndian.Uint64(key[:8])
	for i := 0; i <= maxProbe; i++ {
		s := (h + i) % r.g.entries
		off := r.eOff(s)
		w := load(r.mem, off+eState)
		if eStateOf(w) == StateFree || eKindOf(w) != k || load(r.mem, off+eKey) != want {
			continue
		}
		e, w2, ok := r.readEntry(s)
		if ok && e.Kind == k && e.Key == key && r.sane(e) {
			return e, w2, true
		}
	}
	return Entry{}, 0, false
}

// Lookup returns the READY entry for (kind, key). It never locks.
func (r *Region) Lookup(k Kind, key Key) (Entry, bool) {
	if r.closed.Load() {
		return Entry{}, false
	}
	e, _, ok := r.find(k, key)
	if !ok || e.State != StateReady {
		return Entry{}, false
	}
	return e, true
}

// Entries lists every non-FREE entry, sorted by offset.
func (r *Region) Entries() []Entry {
	if r.closed.Load() {
		return nil
	}
	var out []Entry
	for s := 0; s < r.g.entries; s++ {
		if e, _, ok := r.readEntry(s); ok {
			out = append(out, e)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Offset < out[j].Offset })
	return out
}

// extent is an occupied range of the data area.
type extent struct{ off, end int64 }

// occupied returns the extents of all non-FREE entries, sorted and clipped
// to the data area (a damaged entry still blocks what it claims).
func (r *Region) occupied(skip int) []extent {
	var ex []extent
	for s := 0; s < r.g.entries; s++ {
		if s == skip {
			continue
		}
		off := r.eOff(s)
		w := load(r.mem, off+eState)
		if eStateOf(w) == StateFree || eKindOf(w) == KindAlias {
			continue
		}
		o := int64(load(r.mem, off+eOffset))
		n := int64(load(r.mem, off+eExtent))
		if load(r.mem, off+eState) != w {
			s-- // changed under us: read again
			continue
		}
		if o < r.g.dataOff {
			n -= r.g.dataOff - o
			o = r.g.dataOff
		}
		if n <= 0 || o >= r.g.size {
			continue
		}
		end := o + n
		if end > r.g.size || end < o {
			end = r.g.size
		}
		ex = append(ex, extent{o, end})
	}
	sort.Slice(ex, func(i, j int) bool { return ex[i].off < ex[j].off })
	return ex
}

// gaps returns the free ranges of the data area given sorted occupied extents.
func (r *Region) gaps(ex []extent) []extent {
	var g []extent
	pos := r.g.dataOff
	for _, e := range ex {
		if e.off > pos {
			g = append(g, extent{pos, e.off})
		}
		if e.end > pos {
			pos = e.end
		}
	}
	if pos < r.g.size {
		g = append(g, extent{pos, r.g.size})
	}
	return g
}

// place picks where an extent of kind k goes among gaps (sorted by
// offset): its start and length, or false when nothing fits.
//
// A view needs n bytes, ending at or below offset below (0: anywhere): a view lies
// below the layers it references. It takes the lowest fit in the view area
// at the bottom of the data area, where layers never go, or else the
// tightest gap below its layers.
//
// A layer needs n bytes and takes up to upTo at the start of a gap at or
// above floor (the top of the view area). Its size is known only once it
// is written: it is written from the start of its extent and Publish gives
// back the tail, which then joins the free space above it instead of
// leaving a hole. With flexible set, the layer's n is an estimate: it takes
// the tightest gap that holds n (so gaps are used up whole, not split by
// large bounds) or, when none does, the largest gap, and as much of it as
// upTo; without it, the lowest gap that holds upTo.
func place(gaps []extent, k Kind, n, upTo, below, floor int64, flexible bool) (start, length int64, ok bool) {
	if k != KindLayer {
		// The lowest fit in the view area; else the tightest gap below
		// the view's layers, so views that spill into the layer area
		// fill the holes layers leave rather than split large gaps.
		fit := extent{}
		for _, g := range gaps {
			if below > 0 {
				g.end = min(g.end, below)
			}
			size := g.end - g.off
			if size < n {
				continue
			}
			if g.off+n <= floor {
				return g.off, n, true
			}
			if fit.end == 0 || size < fit.end-fit.off {
				fit = g
			}
		}
		if fit.end == 0 {
			return 0, 0, false
		}
		return fit.off, n, true
	}
	best, largest := extent{}, extent{}
	for _, g := range gaps {
		g.off = max(g.off, floor)
		size := g.end - g.off
		if size <= 0 {
			continue
		}
		if !flexible {
			if size >= upTo {
				return g.off, upTo, true
			}
			continue
		}
		if size >= n && (best.end == 0 || size < best.end-best.off) {
			best = g
		}
		if size > largest.end-largest.off {
			largest = g
		}
	}
	if !flexible {
		return 0, 0, false
	}
	if best.end == 0 {
		best = largest
	}
	if best.end == 0 {
		return 0, 0, false
	}
	return best.off, min(upTo, best.end-best.off), true
}

// largestAbove is the largest free extent at or above floor.
func largestAbove(gaps []extent, floor int64) int64 {
	var m int64
	for _, g := range gaps {
		g.off = max(g.off, floor)
		m = max(m, g.end-g.off)
	}
	return m
}

func largest(gaps []extent) int64 {
	var m int64
	for _, g := range gaps {
		if g.end-g.off > m {
			m = g.end - g.off
		}
	}
	return m
}

func (r *Region) bumpMaxProbe(d int) {
	for {
		m := load(r.mem, hMaxProbe)
		if uint64(d) <= m || cas(r.mem, hMaxProbe, m, uint64(d)) {
			return
		}
	}
}

// freeEntry releases slot s from state word w: its memory is given back
// while the extent is still ours, then the slot is FREE.
func (r *Region) freeEntry(s int, w uint64) bool {
	off := r.eOff(s)
	o, n := int64(load(r.mem, off+eOffset)), int64(load(r.mem, off+eExtent))
	if load(r.mem, off+eState) != w {
		return false
	}
	if o >= r.g.dataOff && n > 0 && n <= r.g.size-o {
		r.be.releaseRange(o, n)
	}
	if !cas(r.mem, off+eState, w, eWord(StateFree, 0, 0, eGenOf(w)+1)) {
		return false
	}
	r.bumpGen()
	return true
}

func orBit(p *uint64, mask uint64) uint64 { return atomic.OrUint64(p, mask) }
