package daxmem

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
)

// Ref sets this participant's reference bit on the READY image (kind,
// key), so no GC frees it until Unref (or until we are declared dead).
// Ref is idempotent.
func (r *Region) Ref(k Kind, key Key) error {
	id, _, err := r.me()
	if err != nil {
		return r.keyErr("ref", k, key, nil, err, "")
	}
	mask := uint64(1) << uint(id)
	r.refMu.Lock()
	defer r.refMu.Unlock()
	for {
		e, w, ok := r.find(k, key)
		if !ok || e.State == StateWriting {
			return r.keyErr("ref", k, key, nil, ErrNotFound, "")
		}
		if e.State == StateDying {
			// A GC is deciding; if it stays DYING the GC died: resolve it
			// under the lock ourselves.
			if !r.waitDying(e.Slot, w) {
				return r.keyErr("ref", k, key, nil, ErrNotFound, "")
			}
			continue
		}
		refs := word(r.mem, r.eOff(e.Slot)+eRefs)
		old := orBit(refs, mask)
		// GC moves READY -> DYING before it reads the bitmap; we set the
		// bit before re-reading the state. One of us sees the other.
		now := load(r.mem, r.eOff(e.Slot)+eState)
		if now == w {
			return nil
		}
		if eStateOf(now) == StateDying {
			// Keep the bit: GC will see it and restore READY, or it read
			// the bitmap before we set it and frees the entry; wait.
			r.waitDying(e.Slot, now)
			now = load(r.mem, r.eOff(e.Slot)+eState)
			if eStateOf(now) == StateReady && r.keyAt(e.Slot) == key && eKindOf(now) == k &&
				atomic.LoadUint64(refs)&mask != 0 {
				return nil
			}
		}
		if old&mask == 0 {
			atomic.AndUint64(refs, ^mask) // the slot changed hands: take our stray bit back
		}
	}
}

// waitDying waits for slot s to leave DYING word w; when a GC died
// leaving it, it resolves the slot under the lock. It reports false when
// the lock could not be had.
func (r *Region) waitDying(s int, w uint64) bool {
	off := r.eOff(s) + eState
	for range 100 {
		if load(r.mem, off) != w {
			return true
		}
		time.Sleep(50 * time.Microsecond)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*r.opts.LeaseTimeout)
	defer cancel()
	unlock, err := r.lock(ctx)
	if err != nil {
		return false
	}
	defer unlock()
	if load(r.mem, off) == w {
		r.resolveDying(s, w) // we hold the lock: this DYING is orphaned
	}
	return true
}

// Unref clears this participant's reference bit.
func (r *Region) Unref(k Kind, key Key) error {
	id, _, err := r.me()
	if err != nil {
		return r.keyErr("unref", k, key, nil, err, "")
	}
	r.refMu.Lock()
	defer r.refMu.Unlock()
	e, _, ok := r.find(k, key)
	if !ok {
		return r.keyErr("unref", k, key, nil, ErrNotFound, "")
	}
	atomic.AndUint64(word(r.mem, r.eOff(e.Slot)+eRefs), ^(uint64(1) << uint(id)))
	return nil
}

// GCOptions tune a collection.
type GCOptions struct {
	// Keep, when set, is asked about every READY entry no live participant
	// references; returning true keeps it (e.g. a cache policy).
	Keep func(Entry) bool
	// MinAge keeps unreferenced entries published less than MinAge ago
	// (a grace period for a participant about to Ref what it just found).
	MinAge time.Duration
	// DryRun counts what would be freed without freeing it.
	DryRun bool
	// ReapAfter, when set, keeps the reference bits of a participant whose
	// lease ran out until its last heartbeat is ReapAfter old. Its WRITING
	// claims are reclaimed at lease expiry regardless. A daemon's mounts
	// outlive it (kernel erofs mounts, the FUSE serving process) and keep
	// reading the images it referenced; a restart within ReapAfter re-joins
	// the same slot and finds its references where it left them.
	ReapAfter time.Duration
}

// GCStats reports what a collection did.
type GCStats struct {
	DeadParticipants []ParticipantID
	BitsCleared      int
	ClaimsReclaimed  int
	EntriesFreed     int
	BytesFreed       int64
	AliasesFreed     int
	Kept             int
}

// GC reclaims dead participants (their reference bits and WRITING claims),
// then frees READY entries that no live participant references. Any joined
// participant may run it at any time.
func (r *Region) GC(ctx context.Context, opts GCOptions) (GCStats, error) {
	var st GCStats
	me, _, err := r.me()
	if err != nil {
		return st, fmt.Errorf("gc region %s: %w", r.be.path, err)
	}
	unlock, err := r.lock(ctx)
	if err != nil {
		return st, fmt.Errorf("gc region %s: %w", r.be.path, err)
	}
	defer unlock()
	now := time.Now()
	logger := log.G(ctx)
	for p := 0; p < r.g.participants; p++ {
		if ParticipantID(p) == me || opts.DryRun {
			continue
		}
		off := r.pOff(p)
		w := load(r.mem, off+pState)
		inc := pIncOf(w)
		switch pStateOf(w) {
		case pAlive, pJoining:
			if r.alive(p, nil, now) {
				continue
			}
			if hb := int64(load(r.mem, off+pHeartbeat)); opts.ReapAfter > 0 && hb <= now.UnixNano() && now.UnixNano()-hb < int64(opts.ReapAfter) {
				continue // silent, but not for long enough to drop its references
			}
			if !cas(r.mem, off+pState, w, pWord(pReclaiming, inc)) {
				continue
			}
		case pReclaiming:
			// Left by a GC that died holding the lock (we hold it now).
		default:
			continue
		}
		bits, claims := r.reclaimParticipant(p, inc)
		st.DeadParticipants = append(st.DeadParticipants, ParticipantID(p))
		st.BitsCleared += bits
		st.ClaimsReclaimed += claims
		logger.WithField("participant", p).WithField("bits", bits).WithField("claims", claims).Info("reclaimed dead participant")
	}
	// Aliases after every image: one pass frees an alias whose layer it
	// frees, wherever their slots lie.
	var aliases []int
	for s := 0; s < r.g.entries; s++ {
		if err := ctx.Err(); err != nil {
			return st, err
		}
		e, w, ok := r.readEntry(s)
		if !ok {
			continue
		}
		if !r.sane(e) {
			// A damaged entry (impossible kind or extent) can serve no
			// one and would block its key and bytes: free it.
			logger.WithField("slot", s).WithField("entry", fmt.Sprintf("%+v", e)).Error("freeing damaged index entry")
			if !opts.DryRun && r.freeEntry(s, w) {
				st.EntriesFreed++
			}
			continue
		}
		switch e.State {
		case StateWriting:
			if !r.writerAlive(e, now) && !opts.DryRun && r.freeEntry(s, w) {
				st.ClaimsReclaimed++
			}
		case StateDying:
			if !opts.DryRun {
				r.resolveDying(s, w)
			}
		case StateReady:
			if e.Kind == KindAlias {
				aliases = append(aliases, s)
				continue
			}
			if e.Refs != 0 {
				continue
			}
			if (opts.MinAge > 0 && now.Sub(e.Published) < opts.MinAge) || (opts.Keep != nil && opts.Keep(e)) {
				st.Kept++
				continue
			}
			if opts.DryRun {
				st.EntriesFreed++
				st.BytesFreed += e.Extent
				continue
			}
			dying := next(w, StateDying, e.Kind, int(e.Writer))
			if !cas(r.mem, r.eOff(s)+eState, w, dying) {
				continue
			}
			if r.resolveDying(s, dying) {
				st.EntriesFreed++
				st.BytesFreed += e.Extent
			}
		}
	}
	for _, s := range aliases {
		// An alias lives as long as its layer: it holds no reference of
		// its own. (A dry run counts it only if its layer is gone now.)
		e, w, ok := r.readEntry(s)
		if !ok || e.Kind != KindAlias || e.State != StateReady {
			continue
		}
		if _, _, ok := r.find(KindLayer, e.Target); !ok {
			if opts.DryRun || r.freeEntry(s, w) {
				st.AliasesFreed++
			}
		}
	}
	return st, nil
}

// resolveDying finishes a DYING slot: back to READY if anyone set a bit
// meanwhile, else free. It reports whether the slot was freed.
func (r *Region) resolveDying(s int, w uint64) bool {
	off := r.eOff(s)
	if load(r.mem, off+eRefs) != 0 {
		cas(r.mem, off+eState, w, next(w, StateReady, eKindOf(w), eWriterOf(w)))
		return false
	}
	return r.freeEntry(s, w)
}

// Verify recomputes the checksum of the READY image (kind, key).
func (r *Region) Verify(k Kind, key Key) error {
	e, ok := r.Lookup(k, key)
	if !ok {
		return r.keyErr("verify", k, key, nil, ErrNotFound, "")
	}
	return r.VerifyEntry(e)
}

// VerifyEntry checks one entry (from Entries or Lookup): an image's bytes
// against its checksum, an alias's layer being there.
func (r *Region) VerifyEntry(e Entry) error {
	if !r.sane(e) {
		return r.keyErr("verify", e.Kind, e.Key, &e, ErrCorrupt, fmt.Sprintf("index entry %d has an impossible extent [%d,+%d)", e.Slot, e.Offset, e.Extent))
	}
	if e.Kind == KindAlias {
		if _, ok := r.Lookup(KindLayer, e.Target); !ok {
			return r.keyErr("verify", e.Kind, e.Key, &e, ErrNotFound, "its layer "+e.Target.String()+" is gone (the next GC frees the alias)")
		}
		return nil
	}
	if r.closed.Load() {
		return ErrClosed
	}
	sum, err := checksum(r.mem[e.Offset : e.Offset+e.Length])
	if err != nil {
		return r.keyErr("verify", e.Kind, e.Key, &e, err, "")
	}
	if sum != e.Checksum {
		return r.keyErr("verify", e.Kind, e.Key, &e, ErrCorrupt, fmt.Sprintf("crc32c %08x, index says %08x (offset %d, %d bytes)", sum, e.Checksum, e.Offset, e.Length))
	}
	return nil
}

// Stats summarises a region.
type Stats struct {
	Path       string
	Backend    string
	Durability string
	PhysAddr   uint64
	PhysKnown  bool
	Size       int64
	DataOffset int64
	DataSize   int64
	Used       int64 // bytes in non-FREE extents
	Free       int64
	// LargestFree is the largest free extent a layer can take: above the
	// view area.
	LargestFree int64
	// ViewArea is the size of the view area at the bottom of the data
	// area (views only); ViewFree the free bytes in it.
	ViewArea     int64
	ViewFree     int64
	Align        int64 // the alignment the region records (see Options.Align)
	EntrySlots   int
	Ready        int // images
	Writing      int
	Dying        int
	Aliases      int
	Participants []Participant
	MaxProbe     int
	Generation   uint64
	Created      time.Time
}

// Stats reads the region's state without locking.
func (r *Region) Stats() Stats {
	gaps := r.gaps(r.occupied(-1))
	var free, viewFree int64
	for _, g := range gaps {
		free += g.end - g.off
		viewFree += max(0, min(g.end, r.g.layerFloor())-g.off)
	}
	s := Stats{
		Path: r.be.path, Backend: r.be.name, Durability: r.be.Durability(),
		PhysAddr: r.be.phys, PhysKnown: r.be.physKnown,
		Size: r.g.size, Align: r.g.align, DataOffset: r.g.dataOff, DataSize: r.g.dataSize,
		Free: free, Used: r.g.dataSize - free, LargestFree: largestAbove(gaps, r.g.layerFloor()),
		ViewArea: r.g.viewArea, ViewFree: viewFree,
		EntrySlots: r.g.entries, Participants: r.Participants(),
		MaxProbe: int(load(r.mem, hMaxProbe)), Generation: r.Generation(),
		Created: time.Unix(0, r.g.created),
	}
	for _, e := range r.Entries() {
		switch {
		case e.Kind == KindAlias:
			s.Aliases++
		case e.State == StateReady:
			s.Ready++
		case e.State == StateWriting:
			s.Writing++
		case e.State == StateDying:
			s.Dying++
		}
	}
	return s
}
