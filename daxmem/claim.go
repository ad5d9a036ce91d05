package daxmem

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"syscall"
	"time"

	"github.com/containerd/log"
)

// ClaimOptions refine a claim.
type ClaimOptions struct {
	// Below, when non-zero, is a region offset the extent must end at or
	// below: a view must lie below the layers it references.
	Below int64
	// Deferred leaves the extent unbacked: the writer calls Claim.Reserve
	// for each range before it writes there. A generous size (a bound on
	// an image whose size is not known yet) then costs nothing until it
	// is used; Publish gives the unused tail back either way.
	Deferred bool
	// Expect, for a layer whose size is known only once it is written,
	// is about how many bytes it will take (at most the size asked). The
	// claim takes the tightest free extent that holds Expect, or the
	// largest one when none does, and as much of it as the size asked:
	// Claim.Size says how much that is, and a writer that needs more
	// claims again. 0: the size asked is needed whole.
	Expect int64
}

// Claim is a WRITING entry owned by this participant: write the image into
// Bytes, then Publish or Abort.
type Claim struct {
	r      *Region
	slot   int
	word   uint64 // our WRITING state word
	kind   Kind
	key    Key
	off    int64
	size   int64
	extent int64
	mu     sync.Mutex
	done   bool
}

// Bytes is the writable extent, size bytes as claimed.
func (c *Claim) Bytes() []byte { return c.r.mem[c.off : c.off+c.size : c.off+c.size] }

// Offset is the extent's region offset.
func (c *Claim) Offset() int64 { return c.off }

// Size is the claimed upper bound.
func (c *Claim) Size() int64 { return c.size }

// Kind and Key name the image being written.
func (c *Claim) Kind() Kind { return c.kind }
func (c *Claim) Key() Key   { return c.key }

func (r *Region) keyErr(op string, k Kind, key Key, e *Entry, err error, detail string) error {
	return &KeyError{Op: op, Kind: k, Key: key, Entry: e, Err: err, Detail: detail}
}

// writerAlive says whether a WRITING entry's writer is alive in the
// incarnation that claimed it.
func (r *Region) writerAlive(e Entry, now time.Time) bool {
	inc := e.WriterIncarnation
	return r.alive(int(e.Writer), &inc, now)
}

// Claim reserves size bytes for the image (kind, key) and marks it WRITING
// by us. Errors: ErrExists (READY: EntryOf(err) is the entry to use),
// ErrBusy (a live participant is writing it: call Wait), ErrFull (no free
// extent of that size, message with sizes; nothing else changes).
func (r *Region) Claim(ctx context.Context, k Kind, key Key, size int64, opts ClaimOptions) (*Claim, error) {
	const op = "claim"
	id, inc, err := r.me()
	if err != nil {
		return nil, r.keyErr(op, k, key, nil, err, "")
	}
	if !k.valid() || !k.hasExtent() {
		return nil, r.keyErr(op, k, key, nil, fmt.Errorf("invalid kind %d for a claim", k), "")
	}
	if size <= 0 {
		return nil, r.keyErr(op, k, key, nil, ErrInvalidSize, fmt.Sprintf("%d bytes", size))
	}
	if size > r.g.dataSize {
		return nil, r.keyErr(op, k, key, nil, ErrFull, fmt.Sprintf("%s: an image of %d bytes is larger than the whole data area (%d bytes)", r.be.path, size, r.g.dataSize))
	}
	if opts.Below < 0 || (opts.Below > 0 && opts.Below <= r.g.dataOff) {
		return nil, r.keyErr(op, k, key, nil, ErrFull, fmt.Sprintf("nothing fits below offset %d (data area starts at %d)", opts.Below, r.g.dataOff))
	}
	if e, ok := r.Lookup(k, key); ok {
		return nil, r.keyErr(op, k, key, &e, ErrExists, "")
	}
	extentLen := alignUp(size, pageSize)
	for attempt := 0; ; attempt++ {
		unlock, stole, err := r.lockClaim(ctx)
		if err != nil {
			return nil, r.keyErr(op, k, key, nil, err, "")
		}
		c, err := r.claimLocked(ctx, id, inc, k, key, size, extentLen, opts)
		if !unlock() && err == nil {
			stole = true // our lease was taken while we held it
		}
		if err == nil && stole && r.conflicts(c.slot, k, key, c.off, c.off+c.extent) {
			// Two claimants may have run under "the" lock at once: of
			// the two, at least one sees the other here and backs out.
			r.freeEntry(c.slot, c.word)
			err = errConflict
		}
		if !errors.Is(err, errConflict) {
			if err != nil {
				return nil, err
			}
			if opts.Deferred {
				return c, nil
			}
			if err := c.Reserve(0, c.extent); err != nil {
				c.Abort(ctx)
				return nil, err
			}
			return c, nil
		}
		if attempt > 100 {
			return nil, r.keyErr(op, k, key, nil, ErrBusy, "claims keep colliding")
		}
		time.Sleep(time.Duration(attempt+1) * 100 * time.Microsecond)
	}
}

var errConflict = errors.New("claim conflict")

// reclaimDeadClaims frees the WRITING entries whose writer is dead (or a
// later incarnation of it). The caller holds the region lock.
func (r *Region) reclaimDeadClaims(ctx context.Context, now time.Time) int {
	n := 0
	for s := 0; s < r.g.entries; s++ {
		w := load(r.mem, r.eOff(s)+eState)
		if eStateOf(w) != StateWriting {
			continue
		}
		e, w, ok := r.readEntry(s)
		if !ok || e.State != StateWriting || r.writerAlive(e, now) {
			continue
		}
		if r.freeEntry(s, w) {
			log.G(ctx).WithField("key", e.Key.String()).WithField("writer", int(e.Writer)).Info("reclaimed the image claim of a dead participant")
			n++
		}
	}
	return n
}

// testHookBeforeClaimCAS, set by tests only, runs inside a claim of r
// just before the FREE -> WRITING CAS, to interleave a second claimant.
// It is nil in production; tests that set it do not run in parallel.
var testHookBeforeClaimCAS func(r *Region)

func (r *Region) claimLocked(ctx context.Context, id ParticipantID, inc uint32, k Kind, key Key, size, extentLen int64, opts ClaimOptions) (*Claim, error) {
	const op = "claim"
	now := time.Now()
	// Resolve what is already there for this key.
	for {
		e, w, ok := r.find(k, key)
		if !ok {
			break
		}
		switch e.State {
		case StateReady:
			return nil, r.keyErr(op, k, key, &e, ErrExists, "")
		case StateWriting:
			if r.writerAlive(e, now) {
				return nil, r.keyErr(op, k, key, &e, ErrBusy, fmt.Sprintf("participant %d is writing it", e.Writer))
			}
			log.G(ctx).WithField("key", key.String()).WithField("writer", int(e.Writer)).Info("reclaiming image claim of a dead participant")
			r.freeEntry(e.Slot, w)
		case StateDying:
			// We hold the lock and GC only frees under it: this DYING was
			// left by a GC that died. Finish its work.
			r.resolveDying(e.Slot, w)
		}
	}
	// Claims of dead writers hold extents no one will publish: give them
	// back before placing, so a restarted or dead writer's half-written
	// images never crowd out new ones.
	r.reclaimDeadClaims(ctx, now)
	ex := r.occupied(-1)
	gaps := r.gaps(ex)
	need := extentLen
	if k == KindLayer && opts.Expect > 0 && opts.Expect < size {
		need = alignUp(opts.Expect, pageSize)
	}
	start, got, ok := place(gaps, k, need, extentLen, opts.Below, r.g.layerFloor(), opts.Expect > 0)
	if ok && got < extentLen {
		extentLen, size = got, got
	}
	if !ok {
		var free int64
		for _, g := range gaps {
			free += g.end - g.off
		}
		where, largestFit := "", largest(gaps)
		if k == KindLayer {
			where, largestFit = fmt.Sprintf(" above the view area (offset %d)", r.g.layerFloor()), largestAbove(gaps, r.g.layerFloor())
		}
		if opts.Below > 0 {
			where += fmt.Sprintf(" ending at or below offset %d (the view lies below its layers)", opts.Below)
		}
		return nil, r.keyErr(op, k, key, nil, ErrFull, fmt.Sprintf("%s: need %d bytes%s; largest free extent there %d, free %d of %d data bytes",
			r.be.path, need, where, largestFit, free, r.g.dataSize))
	}
	slot, dist, w, ok := r.freeSlot(k, key)
	if !ok {
		return nil, r.keyErr(op, k, key, nil, ErrFull, fmt.Sprintf("%s: index full, all %d entries in use", r.be.path, r.g.entries))
	}
	off := r.eOff(slot)
	storeBytes(r.mem, off+eKey, key[:], 32)
	store(r.mem, off+eOffset, uint64(start))
	store(r.mem, off+eExtent, uint64(extentLen))
	store(r.mem, off+eLength, uint64(size))
	store(r.mem, off+eChecksum, 0)
	store(r.mem, off+eRefs, 0)
	store(r.mem, off+eWriterInc, uint64(inc))
	store(r.mem, off+eCreated, uint64(now.UnixNano()))
	store(r.mem, off+ePublished, 0)
	r.bumpMaxProbe(dist)
	mine := next(w, StateWriting, k, int(id))
	if testHookBeforeClaimCAS != nil {
		testHookBeforeClaimCAS(r)
	}
	if !cas(r.mem, off+eState, w, mine) {
		return nil, errConflict
	}
	r.bumpGen()
	return &Claim{r: r, slot: slot, word: mine, kind: k, key: key, off: start, size: size, extent: extentLen}, nil
}

// conflicts reports another non-FREE entry with the same key or an extent
// overlapping [start, end).
func (r *Region) conflicts(slot int, k Kind, key Key, start, end int64) bool {
	for s := 0; s < r.g.entries; s++ {
		if s == slot {
			continue
		}
		e, _, ok := r.readEntry(s)
		if !ok {
			continue
		}
		if e.Kind == k && e.Key == key && r.sane(e) {
			return true
		}
		if e.Offset < end && start < e.Offset+e.Extent {
			return true
		}
	}
	return false
}

// WriterAt returns a writer of the claim's bytes through the backing
// file (pwrite at the claim's offsets), or nil when the backend has no
// write(2) (device DAX, hugetlbfs): then write through Bytes.
//
// For a file on tmpfs this is the cheaper way to fill a new extent: the
// kernel copies into freshly allocated pages without zeroing them first
// and without a page fault per page, where stores through the mapping pay
// both (about half the time for a layer's file data on this kind of
// virtual machine). The page cache is the mapping's, so Bytes sees what
// was written at once. Writes need no Reserve: a full tmpfs fails the
// write itself with ENOSPC instead of raising SIGBUS.
func (c *Claim) WriterAt() io.WriterAt {
	if c.r.be.f == nil || c.r.be.name != BackendFile {
		return nil
	}
	return &claimFile{c: c}
}

type claimFile struct{ c *Claim }

func (w *claimFile) WriteAt(p []byte, off int64) (int, error) {
	c := w.c
	if off < 0 || off > c.size || int64(len(p)) > c.size-off {
		return 0, c.r.keyErr("write", c.kind, c.key, nil, ErrInvalidSize, fmt.Sprintf("range [%d,%d) outside the claimed %d bytes", off, off+int64(len(p)), c.size))
	}
	// Once published (checksummed, READY) or aborted (freed), the extent
	// is not the writer's any more; holding the lock keeps a write from
	// landing after Publish's checksum.
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return 0, c.r.keyErr("write", c.kind, c.key, nil, ErrClaimDone, "")
	}
	n, err := c.r.be.f.WriteAt(p, c.off+off)
	if err != nil {
		detail := fmt.Sprintf("writing %d bytes at %d of %s", len(p), c.off+off, c.r.be.path)
		if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
			// As Reserve says it: the backing store is full.
			return n, c.r.keyErr("write", c.kind, c.key, nil, ErrFull, detail+": "+err.Error())
		}
		return n, c.r.keyErr("write", c.kind, c.key, nil, err, detail)
	}
	return n, nil
}

// Reserve backs bytes [off, off+n) of the claim with memory, so that
// stores there cannot fault (see backend.reserveRange). A claim made
// without ClaimOptions.Deferred is reserved whole already. A full backing
// store (tmpfs, filesystem) is ErrFull.
func (c *Claim) Reserve(off, n int64) error {
	if off < 0 || n < 0 || off > c.extent || n > c.extent-off {
		return c.r.keyErr("reserve", c.kind, c.key, nil, ErrInvalidSize, fmt.Sprintf("range [%d,%d) outside the claimed %d bytes", off, off+n, c.extent))
	}
	if err := c.r.be.reserveRange(c.r.mem, c.off+off, n); err != nil {
		return c.r.keyErr("reserve", c.kind, c.key, nil, ErrFull, fmt.Sprintf("backing store of %s cannot hold %d more bytes: %v", c.r.be.path, n, err))
	}
	return nil
}

// Publish makes the image READY: finalSize bytes (at most the claimed
// size) are checksummed and flushed, the extent shrinks to finalSize
// rounded up to the page (the tail is freed), our reference bit is set and
// the entry turns READY with one atomic store.
func (c *Claim) Publish(ctx context.Context, finalSize int64) (Entry, error) {
	e, _, err := c.publish(ctx, finalSize, false)
	return e, err
}

// PublishShared publishes a layer image as Publish does, unless the region
// holds a READY layer image with the same bytes under another key (the
// same layer reached by another diffID: a tar layer and its pre-converted
// form): then the claim is given back, our key becomes an alias of that
// image, our reference is set on it, and it is returned with shared true.
func (c *Claim) PublishShared(ctx context.Context, finalSize int64) (e Entry, shared bool, err error) {
	return c.publish(ctx, finalSize, c.kind == KindLayer)
}

func (c *Claim) publish(ctx context.Context, finalSize int64, dedup bool) (Entry, bool, error) {
	const op = "publish"
	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.r
	if c.done {
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, ErrClaimDone, "")
	}
	id, _, err := r.me()
	if err != nil {
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, err, "")
	}
	if finalSize <= 0 || finalSize > c.size {
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, ErrInvalidSize, fmt.Sprintf("final size %d not in 1..%d (the claimed size)", finalSize, c.size))
	}
	off := r.eOff(c.slot)
	if load(r.mem, off+eState) != c.word {
		c.done = true
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, ErrClaimLost, "")
	}
	sum, err := checksum(r.mem[c.off : c.off+finalSize])
	if err != nil {
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, err, "")
	}
	if dedup {
		same, found, err := r.identicalLayer(c.key, r.mem[c.off:c.off+finalSize], sum)
		if err != nil {
			return Entry{}, false, err
		}
		// Referenced first, so GC cannot free it between our abort and
		// the alias; if it went meanwhile, publish ours after all.
		if found && r.Ref(KindLayer, same.Key) == nil {
			c.done = true
			r.freeEntry(c.slot, c.word)
			if err := r.Alias(ctx, c.key, same.Key); err != nil {
				return Entry{}, false, err
			}
			return same, true, nil
		}
	}
	if err := r.be.flush(r.mem, c.off, finalSize); err != nil {
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, err, "")
	}
	if ext := alignUp(finalSize, pageSize); ext < c.extent {
		// The tail is still ours until the extent word shrinks.
		r.be.releaseRange(c.off+ext, c.extent-ext)
		store(r.mem, off+eExtent, uint64(ext))
		c.extent = ext
	}
	store(r.mem, off+eLength, uint64(finalSize))
	store(r.mem, off+eChecksum, sum)
	store(r.mem, off+ePublished, uint64(time.Now().UnixNano()))
	r.refMu.Lock()
	orBit(word(r.mem, off+eRefs), 1<<uint(id))
	ready := next(c.word, StateReady, c.kind, int(id))
	ok := cas(r.mem, off+eState, c.word, ready)
	r.refMu.Unlock()
	c.done = true
	if !ok {
		return Entry{}, false, r.keyErr(op, c.kind, c.key, nil, ErrClaimLost, "")
	}
	r.bumpGen()
	e, _, _ := r.readEntry(c.slot)
	return e, false, nil
}

// Abort releases the claim and its extent. Nothing was visible to readers.
func (c *Claim) Abort(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done {
		return nil
	}
	c.done = true
	if !c.r.freeEntry(c.slot, c.word) {
		return c.r.keyErr("abort", c.kind, c.key, nil, ErrClaimLost, "")
	}
	return nil
}

// Wait blocks until (kind, key) is READY and returns it, or fails with
// ErrAbandoned when there is no live writer any more (the writer aborted or
// died: the caller may Claim again).
func (r *Region) Wait(ctx context.Context, k Kind, key Key) (Entry, error) {
	delay := 200 * time.Microsecond
	for {
		e, _, ok := r.find(k, key)
		if !ok {
			return Entry{}, r.keyErr("wait", k, key, nil, ErrAbandoned, "")
		}
		switch e.State {
		case StateReady:
			return e, nil
		case StateDying:
			// Being freed (or resolved by the next claimant): nothing to
			// wait for.
			return Entry{}, r.keyErr("wait", k, key, &e, ErrAbandoned, "image is being freed")
		case StateWriting:
			if !r.writerAlive(e, time.Now()) {
				return Entry{}, r.keyErr("wait", k, key, &e, ErrAbandoned, fmt.Sprintf("writer %d is dead", e.Writer))
			}
		}
		select {
		case <-ctx.Done():
			return Entry{}, r.keyErr("wait", k, key, nil, ctx.Err(), "")
		case <-time.After(delay):
		}
		if delay < 20*time.Millisecond {
			delay *= 2
		}
	}
}
