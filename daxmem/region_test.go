package daxmem

import (
	"golang.org/x/sys/unix"

	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func testOpts(t testing.TB, size int64) Options {
	return Options{
		Path:              filepath.Join(t.TempDir(), "region"),
		Size:              size,
		Entries:           256,
		Participants:      16,
		HeartbeatInterval: 20 * time.Millisecond,
		LeaseTimeout:      300 * time.Millisecond,
	}
}

func mustCreate(t testing.TB, o Options) *Region {
	t.Helper()
	r, err := Create(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func mustOpen(t testing.TB, o Options) *Region {
	t.Helper()
	r, err := Open(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

func mustJoin(t testing.TB, r *Region) ParticipantID {
	t.Helper()
	id, err := r.Join(context.Background(), ParticipantInfo{}, "")
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func key(s string) Key { return Key(sha256.Sum256([]byte(s))) }

// fill writes a pattern derived from the key so content can be checked.
func fill(b []byte, k Key) {
	for i := range b {
		b[i] = k[i%32] ^ byte(i>>8)
	}
}

func publish(t testing.TB, r *Region, k Kind, kk Key, claimSize, size int64, opts ClaimOptions) Entry {
	t.Helper()
	ctx := context.Background()
	c, err := r.Claim(ctx, k, kk, claimSize, opts)
	if err != nil {
		t.Fatal(err)
	}
	fill(c.Bytes()[:size], kk)
	e, err := c.Publish(ctx, size)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// deadPID returns the PID of a process that has exited.
func deadPID(t testing.TB) int {
	cmd := exec.Command("/bin/true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	return cmd.Process.Pid
}

func TestCreateOpenRoundTrip(t *testing.T) {
	o := testOpts(t, 8<<20)
	r := mustCreate(t, o)
	if r.DataOffset()%pageSize != 0 || r.DataOffset() < headerSize+16*participantSize+256*entrySize {
		t.Fatalf("data offset %d", r.DataOffset())
	}
	if r.Size() != 8<<20 || r.DataSize() != 8<<20-r.DataOffset() {
		t.Fatalf("size %d data %d", r.Size(), r.DataSize())
	}
	if _, err := Create(context.Background(), o); !errors.Is(err, ErrExist) {
		t.Fatalf("second Create: %v, want ErrExist", err)
	}
	r2 := mustOpen(t, Options{Path: o.Path})
	if r2.g != r.g {
		t.Fatalf("geometry differs after Open: %+v vs %+v", r2.g, r.g)
	}
	if _, ok := r2.PhysAddr(); ok {
		t.Fatal("file backend claims to know a physical address")
	}
}

func TestOpenCreatesMissingFile(t *testing.T) {
	o := testOpts(t, 4<<20)
	o.Path = filepath.Join(t.TempDir(), "sub", "dir", "region")
	r := mustOpen(t, o)
	if r.Size() != 4<<20 {
		t.Fatalf("size %d", r.Size())
	}
}

func TestOpenRefusesDamage(t *testing.T) {
	o := testOpts(t, 4<<20)
	r := mustCreate(t, o)
	r.Close()
	orig, err := os.ReadFile(o.Path)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name   string
		mutate func(b []byte) []byte
		want   string
	}{
		{"magic", func(b []byte) []byte { b[0] ^= 0xff; return b }, "magic"},
		{"version", func(b []byte) []byte { b[hVersion] = 99; return b }, "version 99"},
		{"geometry", func(b []byte) []byte { b[hEntries] ^= 1; return b }, "checksum"},
		{"zero", func(b []byte) []byte { clear(b[:headerSize]); return b }, "not initialised"},
		{"truncated", func(b []byte) []byte { return b[:1<<20] }, "truncated"},
		{"tiny", func(b []byte) []byte { return b[:100] }, "too small"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b := tc.mutate(bytes.Clone(orig))
			p := filepath.Join(t.TempDir(), "r")
			if err := os.WriteFile(p, b, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := Open(context.Background(), Options{Path: p})
			if !errors.Is(err, ErrBadHeader) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Open: %v, want ErrBadHeader mentioning %q", err, tc.want)
			}
			after, _ := os.ReadFile(p)
			if !bytes.Equal(after, b) {
				t.Fatal("Open modified a damaged region")
			}
			if _, err := Create(context.Background(), Options{Path: p, Size: 4 << 20}); err == nil || errors.Is(err, ErrExist) {
				t.Fatalf("Create over a damaged region: %v, want a refusal", err)
			}
		})
	}
}

func TestClaimPublishLookupVerify(t *testing.T) {
	ctx := context.Background()
	r := mustCreate(t, testOpts(t, 8<<20))
	id := mustJoin(t, r)
	k := key("layer1")
	if _, ok := r.Lookup(KindLayer, k); ok {
		t.Fatal("lookup of an empty region found something")
	}
	c, err := r.Claim(ctx, KindLayer, k, 100000, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if c.Offset()%pageSize != 0 || len(c.Bytes()) != 100000 {
		t.Fatalf("claim at %d len %d", c.Offset(), len(c.Bytes()))
	}
	if _, ok := r.Lookup(KindLayer, k); ok {
		t.Fatal("a WRITING entry is visible to Lookup")
	}
	free0 := r.Stats().Free
	fill(c.Bytes()[:5000], k)
	e, err := c.Publish(ctx, 5000)
	if err != nil {
		t.Fatal(err)
	}
	if e.State != StateReady || e.Length != 5000 || e.Extent != 8192 || e.Writer != id || e.Refs != 1<<uint(id) {
		t.Fatalf("published entry %+v", e)
	}
	if got := r.Stats().Free; got != free0+alignUp(100000, pageSize)-8192 {
		t.Fatalf("free after shrink %d, want %d", got, free0+alignUp(100000, pageSize)-8192)
	}
	got, ok := r.Lookup(KindLayer, k)
	if !ok || got.Offset != e.Offset || got.Checksum != e.Checksum {
		t.Fatalf("lookup %+v %v", got, ok)
	}
	if _, ok := r.Lookup(KindView, k); ok {
		t.Fatal("kinds are not separate")
	}
	if err := r.Verify(KindLayer, k); err != nil {
		t.Fatal(err)
	}
	b, err := r.Slice(e.Offset, e.Length)
	if err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 5000)
	fill(want, k)
	if !bytes.Equal(b, want) {
		t.Fatal("slice content differs")
	}
	if _, err := r.Claim(ctx, KindLayer, k, 10, ClaimOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("claim of a READY key: %v", err)
	} else if ee, ok := EntryOf(err); !ok || ee.Offset != e.Offset {
		t.Fatalf("ErrExists carries %+v %v", ee, ok)
	}
	// Corrupt one byte: Verify must notice and name the key.
	b[100] ^= 1
	if err := r.Verify(KindLayer, k); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), k.String()) {
		t.Fatalf("verify of a corrupt image: %v", err)
	}
	if _, err := r.Slice(0, 10); err == nil {
		t.Fatal("Slice of the header allowed")
	}
	if _, err := r.Slice(r.Size()-10, 11); err == nil {
		t.Fatal("Slice past the end allowed")
	}
}

func TestAbortLeavesNothing(t *testing.T) {
	ctx := context.Background()
	r := mustCreate(t, testOpts(t, 8<<20))
	mustJoin(t, r)
	free := r.Stats().Free
	c, err := r.Claim(ctx, KindLayer, key("x"), 1<<20, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	if len(r.Entries()) != 0 || r.Stats().Free != free {
		t.Fatalf("after abort: entries %v free %d want %d", r.Entries(), r.Stats().Free, free)
	}
	if _, err := c.Publish(ctx, 10); err == nil {
		t.Fatal("publish after abort succeeded")
	}
	// The key can be claimed again.
	publish(t, r, KindLayer, key("x"), 10, 10, ClaimOptions{})
}

func TestBusyAndWait(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	b := mustOpen(t, Options{Path: o.Path, HeartbeatInterval: o.HeartbeatInterval, LeaseTimeout: o.LeaseTimeout})
	mustJoin(t, a)
	mustJoin(t, b)
	k := key("busy")
	c, err := a.Claim(ctx, KindLayer, k, 4096, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Claim(ctx, KindLayer, k, 4096, ClaimOptions{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("second claimant: %v, want ErrBusy", err)
	}
	done := make(chan Entry)
	go func() {
		e, err := b.Wait(ctx, KindLayer, k)
		if err != nil {
			t.Error(err)
		}
		done <- e
	}()
	time.Sleep(50 * time.Millisecond)
	fill(c.Bytes(), k)
	pe, err := c.Publish(ctx, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if we := <-done; we.Offset != pe.Offset || we.State != StateReady {
		t.Fatalf("Wait returned %+v", we)
	}
}

func TestDeadWriterIsReclaimed(t *testing.T) {
	ctx := context.Background()
	_, a, b, bid := twoParticipants(t)
	k := key("dies")
	if _, err := b.Claim(ctx, KindLayer, k, 8192, ClaimOptions{}); err != nil {
		t.Fatal(err)
	}
	publish(t, b, KindLayer, key("refd-by-b"), 4096, 4096, ClaimOptions{})
	// b stops heartbeating (as if killed): after the lease it is dead.
	b.Close()
	if _, err := a.Claim(ctx, KindLayer, k, 8192, ClaimOptions{}); !errors.Is(err, ErrBusy) {
		t.Fatalf("claim while the writer's lease runs: %v", err)
	}
	if _, err := a.Wait(ctx, KindLayer, k); !errors.Is(err, ErrAbandoned) {
		t.Fatalf("wait on a dead writer: %v, want ErrAbandoned", err)
	}
	st, err := a.GC(ctx, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.DeadParticipants) != 1 || st.DeadParticipants[0] != bid || st.ClaimsReclaimed != 1 || st.EntriesFreed != 1 {
		t.Fatalf("gc stats %+v", st)
	}
	if len(a.Entries()) != 0 || a.Stats().Free != a.DataSize() {
		t.Fatalf("leftovers after GC: %+v", a.Entries())
	}
	publish(t, a, KindLayer, k, 8192, 100, ClaimOptions{})
}

func TestRejoinAfterRestartKeepsRefs(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	idFile := filepath.Join(t.TempDir(), "participant")
	a := mustCreate(t, o)
	dead := deadPID(t)
	// The first "daemon" runs as a PID that has already exited, so the
	// restarted one (this process) sees it as gone at once.
	id1, err := a.Join(ctx, ParticipantInfo{PID: dead}, idFile)
	if err != nil {
		t.Fatal(err)
	}
	kept := key("kept")
	publish(t, a, KindLayer, kept, 4096, 4096, ClaimOptions{})
	half := key("half-written")
	if _, err := a.Claim(ctx, KindLayer, half, 4096, ClaimOptions{}); err != nil {
		t.Fatal(err)
	}
	a.Close()

	b := mustOpen(t, o)
	id2, err := b.Join(ctx, ParticipantInfo{}, idFile)
	if err != nil {
		t.Fatal(err)
	}
	if id2 != id1 {
		t.Fatalf("re-join got participant %d, want %d", id2, id1)
	}
	if e, _ := b.Lookup(KindLayer, kept); e.Refs != 1<<uint(id1) {
		t.Fatalf("reference bits after re-join: %b", e.Refs)
	}
	// The old incarnation's claim is dead: we may claim the key again.
	publish(t, b, KindLayer, half, 4096, 10, ClaimOptions{})
	if st, _ := b.GC(ctx, GCOptions{}); st.EntriesFreed != 0 {
		t.Fatalf("GC freed referenced entries: %+v", st)
	}
	// A second live process with the same participant file is refused.
	c := mustOpen(t, o)
	if _, err := c.Join(ctx, ParticipantInfo{}, idFile); !errors.Is(err, ErrInUse) {
		t.Fatalf("join with a live holder's file: %v, want ErrInUse", err)
	}
}

func TestRefUnrefGC(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	b := mustOpen(t, o)
	mustJoin(t, a)
	mustJoin(t, b)
	k1, k2, k3 := key("1"), key("2"), key("3")
	publish(t, a, KindLayer, k1, 4096, 4096, ClaimOptions{})
	publish(t, a, KindLayer, k2, 4096, 4096, ClaimOptions{})
	publish(t, a, KindLayer, k3, 4096, 4096, ClaimOptions{})
	if err := b.Ref(KindLayer, k1); err != nil {
		t.Fatal(err)
	}
	for _, k := range []Key{k1, k2, k3} {
		if err := a.Unref(KindLayer, k); err != nil {
			t.Fatal(err)
		}
	}
	if err := b.Ref(KindLayer, key("absent")); !errors.Is(err, ErrNotFound) {
		t.Fatalf("ref of a missing key: %v", err)
	}
	st, err := a.GC(ctx, GCOptions{Keep: func(e Entry) bool { return e.Key == k3 }})
	if err != nil {
		t.Fatal(err)
	}
	if st.EntriesFreed != 1 || st.Kept != 1 {
		t.Fatalf("gc %+v", st)
	}
	if _, ok := a.Lookup(KindLayer, k1); !ok {
		t.Fatal("GC freed an entry b references")
	}
	if _, ok := a.Lookup(KindLayer, k2); ok {
		t.Fatal("GC kept an unreferenced entry")
	}
	if _, ok := a.Lookup(KindLayer, k3); !ok {
		t.Fatal("GC ignored Keep")
	}
	st, _ = a.GC(ctx, GCOptions{MinAge: time.Hour})
	if st.EntriesFreed != 0 {
		t.Fatalf("MinAge ignored: %+v", st)
	}
}

// TestViewsBelowLayers: layers are placed from the top of the view area
// upward, each claim's unused tail rejoining the free space above it, and
// views in the view area below every layer.
func TestViewsBelowLayers(t *testing.T) {
	ctx := context.Background()
	r := mustCreate(t, testOpts(t, 8<<20))
	mustJoin(t, r)
	floor := r.DataOffset() + r.Stats().ViewArea
	// Claimed with a generous bound, published smaller: the tail goes back.
	l1 := publish(t, r, KindLayer, key("l1"), 2<<20, 1<<20, ClaimOptions{})
	l2 := publish(t, r, KindLayer, key("l2"), 1<<20, 1<<20, ClaimOptions{})
	if l1.Offset != floor || l2.Offset != l1.Offset+l1.Extent {
		t.Fatalf("layers not packed from the view area's top %d: %d-%d, %d-%d", floor, l1.Offset, l1.End(), l2.Offset, l2.End())
	}
	if st := r.Stats(); st.LargestFree != r.Size()-l2.End() {
		t.Fatalf("largest free %d, want everything above the layers (%d)", st.LargestFree, r.Size()-l2.End())
	}
	v := publish(t, r, KindView, key("v"), 64<<10, 5000, ClaimOptions{Below: l1.Offset})
	if v.Offset != r.DataOffset() || v.End() > floor {
		t.Fatalf("view at %d-%d, want the bottom of the view area", v.Offset, v.End())
	}
	// A layer never takes the view area, however full the rest is.
	if _, err := r.Claim(ctx, KindLayer, key("big"), r.Size()-l2.End()+4096, ClaimOptions{}); !errors.Is(err, ErrFull) {
		t.Fatalf("layer larger than the room above the view area: %v", err)
	}
	// Nothing fits below the bottom of the data area.
	if _, err := r.Claim(ctx, KindView, key("v2"), 4096, ClaimOptions{Below: r.DataOffset() + 4096}); !errors.Is(err, ErrFull) {
		t.Fatalf("claim below a full range: %v", err)
	}
}

func TestRegionFull(t *testing.T) {
	ctx := context.Background()
	r := mustCreate(t, testOpts(t, 4<<20))
	mustJoin(t, r)
	var ready []Entry
	for i := 0; ; i++ {
		k := key(string(rune('a' + i)))
		c, err := r.Claim(ctx, KindLayer, k, 512<<10, ClaimOptions{})
		if err != nil {
			if !errors.Is(err, ErrFull) || !strings.Contains(err.Error(), "region") || !strings.Contains(err.Error(), "full") {
				t.Fatalf("claim in a full region: %v", err)
			}
			t.Logf("full: %v", err)
			break
		}
		fill(c.Bytes(), k)
		e, err := c.Publish(ctx, 512<<10)
		if err != nil {
			t.Fatal(err)
		}
		ready = append(ready, e)
	}
	if len(ready) < 5 {
		t.Fatalf("only %d images fit", len(ready))
	}
	for _, e := range ready {
		if err := r.Verify(e.Kind, e.Key); err != nil {
			t.Fatal(err)
		}
		b, err := r.Slice(e.Offset, e.Length)
		if err != nil {
			t.Fatal(err)
		}
		want := make([]byte, e.Length)
		fill(want, e.Key)
		if !bytes.Equal(b, want) {
			t.Fatalf("image %s damaged by the failed claim", e.Key.Short())
		}
	}
	if n := len(r.Entries()); n != len(ready) {
		t.Fatalf("%d entries after a failed claim, want %d", n, len(ready))
	}
	if _, err := r.Claim(ctx, KindLayer, key("huge"), r.Size(), ClaimOptions{}); !errors.Is(err, ErrFull) || !strings.Contains(err.Error(), "larger than the whole data area") {
		t.Fatalf("claim larger than the region: %v", err)
	}
	// A small one still fits in what is left.
	if st := r.Stats(); st.LargestFree >= 4096 {
		publish(t, r, KindView, key("small"), 4096, 4096, ClaimOptions{})
	}
}

func TestIndexFull(t *testing.T) {
	o := testOpts(t, 8<<20)
	o.Entries = 4
	r := mustCreate(t, o)
	mustJoin(t, r)
	for i := range 4 {
		publish(t, r, KindLayer, key(string(rune('a'+i))), 4096, 4096, ClaimOptions{})
	}
	for i := range 4 {
		if _, ok := r.Lookup(KindLayer, key(string(rune('a'+i)))); !ok {
			t.Fatalf("lookup %d failed with a full index", i)
		}
	}
	if _, err := r.Claim(context.Background(), KindLayer, key("e"), 4096, ClaimOptions{}); !errors.Is(err, ErrFull) || !strings.Contains(err.Error(), "index full") {
		t.Fatalf("claim with a full index: %v", err)
	}
}

func TestLockTakenFromDeadHolder(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	b := mustOpen(t, o)
	mustJoin(t, a)
	bid := mustJoin(t, b)
	// b "crashes" holding the lock.
	_, binc, _ := b.me()
	store(a.mem, hLock, b.lockWord(bid, binc, time.Now().Add(time.Hour)))
	b.Close()
	start := time.Now()
	ctx2, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := a.Claim(ctx2, KindLayer, key("after"), 4096, ClaimOptions{}); err != nil {
		t.Fatalf("claim after a holder died: %v", err)
	}
	if d := time.Since(start); d < o.LeaseTimeout/2 {
		t.Fatalf("lock taken after %v, before the holder's heartbeat went stale", d)
	}
	if load(a.mem, hLock) != 0 {
		t.Fatal("lock not released")
	}
}

func TestKeyFromDigest(t *testing.T) {
	good := "sha256:" + strings.Repeat("ab", 32)
	k, err := KeyFromDigest(good)
	if err != nil || k.String() != good {
		t.Fatalf("%v %v", k, err)
	}
	for _, bad := range []string{"", "sha256:abc", "sha512:" + strings.Repeat("ab", 64), "sha256:" + strings.Repeat("zz", 32)} {
		if _, err := KeyFromDigest(bad); err == nil {
			t.Errorf("KeyFromDigest(%q) accepted", bad)
		}
	}
}

// TestFutureHeartbeatStillDies: a participant whose heartbeat was stamped
// by a clock far ahead of ours must not live forever: once we have seen
// its heartbeat stand still for a lease it is dead.
func TestFutureHeartbeatStillDies(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	mustJoin(t, a)
	b := mustOpen(t, o)
	bid := mustJoin(t, b)
	publish(t, b, KindLayer, key("skewed"), 4096, 4096, ClaimOptions{})
	b.Close()
	store(a.mem, a.pOff(int(bid))+pHeartbeat, uint64(time.Now().Add(time.Hour).UnixNano()))
	if !a.alive(int(bid), nil, time.Now()) {
		t.Fatal("dead before a lease of observation")
	}
	time.Sleep(o.LeaseTimeout + 50*time.Millisecond)
	st, err := a.GC(ctx, GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.DeadParticipants) != 1 || st.EntriesFreed != 1 {
		t.Fatalf("gc %+v", st)
	}
}

// TestStolenLeaseCannotDoubleClaim: A holds the lock but is slow (its
// lease deadline passes) between choosing an extent and claiming its slot;
// B takes the lock over and claims the same key in the same place. The
// re-validation after the CAS must leave exactly one claim and no overlap.
func TestStolenLeaseCannotDoubleClaim(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	b := mustOpen(t, o)
	aid := mustJoin(t, a)
	mustJoin(t, b)
	k := key("contended")
	var bClaim *Claim
	var bErr error
	// beforeCAS runs f once, inside A's next claim.
	beforeCAS := func(f func()) {
		testHookBeforeClaimCAS = func(r *Region) {
			if r == a {
				testHookBeforeClaimCAS = nil
				f()
			}
		}
	}
	t.Cleanup(func() { testHookBeforeClaimCAS = nil })
	beforeCAS(func() {
		_, ainc, _ := a.me()
		store(a.mem, hLock, a.lockWord(aid, ainc, time.Unix(0, a.g.created))) // A's lease expired
		bClaim, bErr = b.Claim(ctx, KindLayer, k, 64<<10, ClaimOptions{})
	})
	aClaim, aErr := a.Claim(ctx, KindLayer, k, 64<<10, ClaimOptions{})
	if bErr != nil {
		t.Fatalf("B (took the lock over, claimed first): %v", bErr)
	}
	if !errors.Is(aErr, ErrBusy) || aClaim != nil {
		t.Fatalf("A after losing its lease: claim %v, err %v; want ErrBusy", aClaim, aErr)
	}
	es := a.Entries()
	if len(es) != 1 || es[0].Writer != b.ID() {
		t.Fatalf("entries %+v, want only B's claim", es)
	}
	if _, err := bClaim.Publish(ctx, 100); err != nil {
		t.Fatal(err)
	}
	// Same race on different keys: both may keep their claims, but never
	// overlapping extents.
	beforeCAS(func() {
		_, ainc, _ := a.me()
		store(a.mem, hLock, a.lockWord(aid, ainc, time.Unix(0, a.g.created)))
		bClaim, bErr = b.Claim(ctx, KindLayer, key("b-only"), 64<<10, ClaimOptions{})
	})
	aClaim, aErr = a.Claim(ctx, KindLayer, key("a-only"), 64<<10, ClaimOptions{})
	if aErr != nil || bErr != nil {
		t.Fatalf("claims of different keys: %v, %v", aErr, bErr)
	}
	if aClaim.Offset() < bClaim.Offset()+64<<10 && bClaim.Offset() < aClaim.Offset()+64<<10 {
		t.Fatalf("extents overlap: A at %d, B at %d", aClaim.Offset(), bClaim.Offset())
	}
}

// TestEvictedParticipantIsFenced: a participant that stalled past its
// lease and was reclaimed notices at its next heartbeat and fails its
// operations instead of acting on state it no longer owns.
func TestEvictedParticipantIsFenced(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	b := mustOpen(t, o)
	mustJoin(t, a)
	mustJoin(t, b)
	c, err := b.Claim(ctx, KindLayer, key("stalled"), 4096, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	b.stopHeartbeat() // b stalls
	time.Sleep(o.LeaseTimeout + 50*time.Millisecond)
	if st, err := a.GC(ctx, GCOptions{}); err != nil || len(st.DeadParticipants) != 1 || st.ClaimsReclaimed != 1 {
		t.Fatalf("gc %+v %v", st, err)
	}
	b.startHeartbeat(ctx) // b wakes up
	deadline := time.Now().Add(5 * time.Second)
	for !b.evicted.Load() && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if _, err := c.Publish(ctx, 4096); !errors.Is(err, ErrEvicted) {
		t.Fatalf("publish after eviction: %v", err)
	}
	if _, err := b.Claim(ctx, KindLayer, key("again"), 4096, ClaimOptions{}); !errors.Is(err, ErrEvicted) {
		t.Fatalf("claim after eviction: %v", err)
	}
	if len(a.Entries()) != 0 {
		t.Fatalf("entries %+v", a.Entries())
	}
}

// TestDeferredClaim checks that a Deferred claim allocates no memory until
// the writer reserves it, that Reserve backs exactly what it is asked for,
// and that Publish of a short image leaves only that image allocated.
func TestDeferredClaim(t *testing.T) {
	ctx := context.Background()
	o := testOpts(t, 64<<20)
	r := mustCreate(t, o)
	mustJoin(t, r)
	allocated := func() int64 {
		t.Helper()
		var st unix.Stat_t
		if err := unix.Stat(o.Path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	before := allocated()
	k := key("deferred")
	c, err := r.Claim(ctx, KindLayer, k, 32<<20, ClaimOptions{Deferred: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := allocated() - before; got > 1<<20 {
		t.Fatalf("a deferred claim of 32 MiB allocated %d bytes up front", got)
	}
	if err := c.Reserve(0, 4<<20); err != nil {
		t.Fatal(err)
	}
	if got := allocated() - before; got < 4<<20 || got > 5<<20 {
		t.Fatalf("Reserve of 4 MiB allocated %d bytes", got)
	}
	for _, bad := range [][2]int64{{-1, 1}, {0, 33 << 20}, {32 << 20, 1}, {4096, -1}} {
		if err := c.Reserve(bad[0], bad[1]); !errors.Is(err, ErrInvalidSize) || !strings.Contains(err.Error(), k.Short()) {
			t.Errorf("Reserve(%d, %d) = %v, want ErrInvalidSize naming the key", bad[0], bad[1], err)
		}
	}
	fill(c.Bytes()[:3<<20], k)
	e, err := c.Publish(ctx, 3<<20)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Verify(e.Kind, e.Key); err != nil {
		t.Fatal(err)
	}
	if got := allocated() - before; got > 4<<20 {
		t.Fatalf("after publishing 3 MiB, %d bytes stay allocated", got)
	}

	// Without Deferred the whole claim is backed at once.
	before = allocated()
	c, err = r.Claim(ctx, KindLayer, key("eager"), 8<<20, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Abort(ctx)
	if got := allocated() - before; got < 8<<20 {
		t.Fatalf("an eager claim of 8 MiB allocated only %d bytes", got)
	}
}

// TestReapAfter: a participant past its lease keeps its reference bits
// (and so its images) until it has been silent for ReapAfter; its WRITING
// claim is reclaimed at lease expiry all the same.
func TestReapAfter(t *testing.T) {
	ctx := context.Background()
	o, a, b, bid := twoParticipants(t)
	held := key("held-by-b")
	publish(t, b, KindLayer, held, 4096, 4096, ClaimOptions{})
	if _, err := b.Claim(ctx, KindLayer, key("half"), 4096, ClaimOptions{}); err != nil {
		t.Fatal(err)
	}
	b.Close()
	time.Sleep(2 * o.LeaseTimeout)

	st, err := a.GC(ctx, GCOptions{ReapAfter: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.DeadParticipants) != 0 || st.EntriesFreed != 0 || st.ClaimsReclaimed != 1 {
		t.Fatalf("GC within ReapAfter: %+v; want no participant reaped, nothing freed, the claim reclaimed", st)
	}
	if e, ok := a.Lookup(KindLayer, held); !ok || e.Refs != 1<<uint(bid) {
		t.Fatalf("entry after GC within ReapAfter: %+v %v", e, ok)
	}

	st, err = a.GC(ctx, GCOptions{ReapAfter: o.LeaseTimeout})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.DeadParticipants) != 1 || st.DeadParticipants[0] != bid || st.EntriesFreed != 1 {
		t.Fatalf("GC after ReapAfter: %+v; want participant %d reaped and its entry freed", st, bid)
	}
}

// twoParticipants creates an 8 MiB region joined by a, and opens and joins
// it again as b (another process would), with the test's short lease.
func twoParticipants(t *testing.T) (Options, *Region, *Region, ParticipantID) {
	t.Helper()
	o := testOpts(t, 8<<20)
	a := mustCreate(t, o)
	mustJoin(t, a)
	b := mustOpen(t, Options{Path: o.Path, HeartbeatInterval: o.HeartbeatInterval, LeaseTimeout: o.LeaseTimeout})
	return o, a, b, mustJoin(t, b)
}
