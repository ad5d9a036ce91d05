package daxmem

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"testing"
)

// TestRejoinFreesOwnDeadClaims: a daemon killed while writing a layer left
// its claim WRITING; restarted, it frees that claim as it joins, before it
// serves, so its first import has the whole region again (it once failed
// "layer image larger than the N bytes available" until a second try).
func TestRejoinFreesOwnDeadClaims(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 64<<20)
	idFile := filepath.Join(t.TempDir(), "participant")
	a := mustCreate(t, o)
	if _, err := a.Join(ctx, ParticipantInfo{PID: deadPID(t)}, idFile); err != nil {
		t.Fatal(err)
	}
	whole := a.Stats().LargestFree
	if _, err := a.Claim(ctx, KindLayer, key("half"), whole, ClaimOptions{Deferred: true}); err != nil {
		t.Fatal(err)
	}
	a.Close() // killed: no Abort, no Leave

	b := mustOpen(t, o)
	if _, err := b.Join(ctx, ParticipantInfo{}, idFile); err != nil {
		t.Fatal(err)
	}
	st := b.Stats()
	if st.Writing != 0 || st.LargestFree != whole {
		t.Fatalf("after re-join: %d claims WRITING, largest free %d, want none and %d", st.Writing, st.LargestFree, whole)
	}
}

// TestAliases: an alias finds its layer from any participant, never
// chains, never takes over another layer's alias, and goes with its layer.
func TestAliases(t *testing.T) {
	ctx := context.Background()
	_, a, b, _ := twoParticipants(t)
	layer, blob, twin := key("diffID"), key("blob digest"), key("twin diffID")
	publish(t, a, KindLayer, layer, 8192, 5000, ClaimOptions{})
	if err := a.Alias(ctx, blob, key("no such layer")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("alias of a missing layer: %v", err)
	}
	if err := a.Alias(ctx, blob, layer); err != nil {
		t.Fatal(err)
	}
	// Through an alias: the layer itself, not a chain of aliases.
	if err := a.Alias(ctx, twin, blob); err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{layer, blob, twin} {
		e, ok := b.Resolve(k)
		if !ok || e.Key != layer {
			t.Fatalf("participant b resolves %s to %v %v, want the layer", k.Short(), e.Key.Short(), ok)
		}
	}
	if e, _ := b.Lookup(KindAlias, twin); e.Target != layer {
		t.Fatalf("alias of an alias targets %s, want the layer", e.Target.Short())
	}
	if err := a.Alias(ctx, blob, layer); err != nil {
		t.Fatalf("the same alias again: %v", err)
	}
	other := key("other layer")
	publish(t, a, KindLayer, other, 4096, 4096, ClaimOptions{})
	if err := b.Alias(ctx, blob, other); !errors.Is(err, ErrExists) {
		t.Fatalf("alias naming another layer: %v, want ErrExists", err)
	}
	if st := a.Stats(); st.Aliases != 2 || st.Ready != 2 {
		t.Fatalf("stats count %d aliases and %d images", st.Aliases, st.Ready)
	}
	if err := b.VerifyEntry(mustLookup(t, b, KindAlias, blob)); err != nil {
		t.Fatal(err)
	}
	// The layer goes: GC takes its aliases with it.
	if err := a.Unref(KindLayer, layer); err != nil {
		t.Fatal(err)
	}
	st, err := a.GC(ctx, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := b.Resolve(blob); ok {
		t.Fatal("an alias still resolves after its layer was freed")
	}
	if s := a.Stats(); s.Aliases != 0 {
		t.Fatalf("%d aliases left after their layer went (last GC %+v)", s.Aliases, st)
	}
}

// TestGCFreesAliasesInOnePass: one collection frees unreferenced layers
// and their aliases, whichever slots they hash to (it once checked each
// alias in slot order, and kept those before their layer's slot until a
// second collection).
func TestGCFreesAliasesInOnePass(t *testing.T) {
	ctx := context.Background()
	_, a, _, _ := twoParticipants(t)
	const n = 32
	for i := range n {
		layer := key(fmt.Sprint("layer ", i))
		publish(t, a, KindLayer, layer, 4096, 4096, ClaimOptions{})
		if err := a.Alias(ctx, key(fmt.Sprint("blob ", i)), layer); err != nil {
			t.Fatal(err)
		}
		if err := a.Unref(KindLayer, layer); err != nil {
			t.Fatal(err)
		}
	}
	st, err := a.GC(ctx, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if s := a.Stats(); st.EntriesFreed != n || st.AliasesFreed != n || s.Aliases != 0 || s.Ready != 0 {
		t.Fatalf("one GC freed %d layers and %d aliases of %d each; %d aliases and %d images left", st.EntriesFreed, st.AliasesFreed, n, s.Aliases, s.Ready)
	}
}

func mustLookup(t *testing.T, r *Region, k Kind, key Key) Entry {
	t.Helper()
	e, ok := r.Lookup(k, key)
	if !ok {
		t.Fatalf("%s %s not found", k, key.Short())
	}
	return e
}

// TestPublishShared: a layer image with the bytes of one already in the
// region (a tar layer and its pre-converted form) is stored once: the
// second key becomes an alias and the claim's extent is given back.
func TestPublishShared(t *testing.T) {
	ctx := context.Background()
	_, a, b, bid := twoParticipants(t)
	first := publish(t, a, KindLayer, key("tar diffID"), 3<<20, 2<<20+100, ClaimOptions{})
	free := b.Stats().Free
	c, err := b.Claim(ctx, KindLayer, key("image diffID"), 4<<20, ClaimOptions{Deferred: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Reserve(0, c.Size()); err != nil {
		t.Fatal(err)
	}
	fill(c.Bytes()[:first.Length], first.Key) // the same bytes
	e, shared, err := c.PublishShared(ctx, first.Length)
	if err != nil || !shared || e.Key != first.Key {
		t.Fatalf("PublishShared = %v shared=%v %v, want the first image", e.Key.Short(), shared, err)
	}
	if got := b.Stats().Free; got != free {
		t.Fatalf("free %d after sharing, want %d (the claim given back)", got, free)
	}
	if r, ok := a.Resolve(key("image diffID")); !ok || r.Key != first.Key {
		t.Fatal("the second key does not resolve to the first image")
	}
	if r := mustLookup(t, a, KindLayer, first.Key); r.Refs&(1<<uint(bid)) == 0 {
		t.Fatalf("the sharer holds no reference on the image: refs %b", r.Refs)
	}
	// Different bytes of the same length are not shared.
	c, err = b.Claim(ctx, KindLayer, key("different"), 4<<20, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fill(c.Bytes()[:first.Length], key("different"))
	if _, shared, err := c.PublishShared(ctx, first.Length); err != nil || shared {
		t.Fatalf("different bytes: shared=%v %v", shared, err)
	}
	if !bytes.Equal(mustSlice(t, a, first), mustSlice(t, b, first)) {
		t.Fatal("views of the shared image differ")
	}
}

func mustSlice(t *testing.T, r *Region, e Entry) []byte {
	t.Helper()
	b, err := r.Slice(e.Offset, e.Length)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
