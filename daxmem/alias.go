package daxmem

import (
	"bytes"
	"context"
	"fmt"
	"runtime/debug"
	"time"
)

// Resolve returns the READY layer image that key names: the layer keyed
// key, or the layer an alias keyed key points at. It never locks.
func (r *Region) Resolve(key Key) (Entry, bool) {
	if e, ok := r.Lookup(KindLayer, key); ok {
		return e, true
	}
	a, ok := r.Lookup(KindAlias, key)
	if !ok {
		return Entry{}, false
	}
	return r.Lookup(KindLayer, a.Target)
}

// Alias records alias as another key of the READY layer image target (or
// of the layer target is itself an alias of: aliases never chain). The
// caller vouches for the alias: it made or checked the image from what
// alias names. An alias that exists already for the same layer, or a key
// that is a layer itself, is left as it is; an alias naming a layer that
// is gone is replaced. ErrNotFound: target is not a READY layer. ErrExists:
// alias names another layer (the first one stays).
func (r *Region) Alias(ctx context.Context, alias, target Key) error {
	const op = "alias"
	id, _, err := r.me()
	if err != nil {
		return r.keyErr(op, KindAlias, alias, nil, err, "")
	}
	t, ok := r.Resolve(target)
	if !ok {
		return r.keyErr(op, KindAlias, alias, nil, ErrNotFound, "target layer "+target.String())
	}
	if t.Key == alias {
		return nil
	}
	unlock, err := r.lock(ctx)
	if err != nil {
		return r.keyErr(op, KindAlias, alias, nil, err, "")
	}
	defer unlock()
	if _, ok := r.Lookup(KindLayer, alias); ok {
		return nil
	}
	for {
		a, w, ok := r.find(KindAlias, alias)
		if !ok {
			break
		}
		if a.Target == t.Key {
			return nil
		}
		if _, ok := r.Lookup(KindLayer, a.Target); ok {
			return r.keyErr(op, KindAlias, alias, &a, ErrExists, "names layer "+a.Target.String())
		}
		r.freeEntry(a.Slot, w) // stale: its layer is gone
	}
	slot, dist, w, ok := r.freeSlot(KindAlias, alias)
	if !ok {
		return r.keyErr(op, KindAlias, alias, nil, ErrFull, fmt.Sprintf("%s: index full, all %d entries in use", r.be.path, r.g.entries))
	}
	off := r.eOff(slot)
	now := uint64(time.Now().UnixNano())
	storeBytes(r.mem, off+eKey, alias[:], 32)
	for _, f := range []int64{eOffset, eExtent, eLength, eChecksum, eRefs, eWriterInc} {
		store(r.mem, off+f, 0)
	}
	store(r.mem, off+eCreated, now)
	store(r.mem, off+ePublished, now)
	storeBytes(r.mem, off+eTarget, t.Key[:], 32)
	r.bumpMaxProbe(dist)
	// Under the lock no one else fills this slot: the CAS publishes it.
	if !cas(r.mem, off+eState, w, next(w, StateReady, KindAlias, int(id))) {
		return r.keyErr(op, KindAlias, alias, nil, ErrBusy, "slot taken under the lock")
	}
	r.bumpGen()
	return nil
}

// freeSlot returns the first FREE slot along the probe chain of (k, key),
// its probe distance and its state word.
func (r *Region) freeSlot(k Kind, key Key) (slot, dist int, w uint64, ok bool) {
	h := r.home(k, key)
	for i := 0; i < r.g.entries; i++ {
		s := (h + i) % r.g.entries
		w = load(r.mem, r.eOff(s)+eState)
		if eStateOf(w) == StateFree {
			return s, i, w, true
		}
	}
	return -1, 0, 0, false
}

// identicalLayer returns a READY layer image, other than key, whose bytes
// are b (checksum sum): one with the same length and checksum, compared
// byte for byte.
func (r *Region) identicalLayer(key Key, b []byte, sum uint64) (Entry, bool, error) {
	for s := 0; s < r.g.entries; s++ {
		e, _, ok := r.readEntry(s)
		if !ok || e.Kind != KindLayer || e.State != StateReady || e.Key == key ||
			e.Length != int64(len(b)) || e.Checksum != sum || !r.sane(e) {
			continue
		}
		same, err := equalFaulting(r.mem[e.Offset:e.End()], b)
		if err != nil {
			return Entry{}, false, r.keyErr("dedup", KindLayer, e.Key, &e, err, "")
		}
		if same {
			return e, true, nil
		}
	}
	return Entry{}, false, nil
}

// equalFaulting compares two ranges of the mapping, turning a fault into
// an error.
func equalFaulting(a, b []byte) (same bool, err error) {
	old := debug.SetPanicOnFault(true)
	defer func() {
		debug.SetPanicOnFault(old)
		if p := recover(); p != nil {
			err = fmt.Errorf("fault reading the region: %v", p)
		}
	}()
	return bytes.Equal(a, b), nil
}
