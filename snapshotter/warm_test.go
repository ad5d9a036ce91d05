package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// TestWarmTopOfParallelUnpack: containerd's parallel unpack (a snapshotter
// with the rebase capability) prepares every layer's extraction snapshot,
// without a parent but naming the chain below in parent-chain-id, before
// it commits the first, then commits them in order over their parents.
// Only the top layer's view is warmed, even when each commit comes long
// after the one below (a slow layer): the commit of a chain that a
// prepared extraction awaits is not the image's top. Names are what
// containerd's metadata store hands a proxy snapshotter (namespaced, with
// a sequence number), the labels bare chain IDs.
func TestWarmTopOfParallelUnpack(t *testing.T) {
	testenv.RequireRoot(t)
	ctx := namespaces.WithNamespace(context.Background(), "test")
	sn, cleanup, err := newTestSnapshotter(ctx, t.TempDir(), func(c *Config) { c.WarmViews = time.Minute })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := cleanup(); err != nil {
			t.Error(err)
		}
	})

	const layers = 3
	diffIDs := make([]digest.Digest, layers)
	for i := range diffIDs {
		diffIDs[i] = digest.FromString(fmt.Sprintf("layer %d", i))
	}
	chains := identity.ChainIDs(append([]digest.Digest(nil), diffIDs...))
	keys := make([]string, layers)
	names := make([]string, layers)
	for i := range layers {
		names[i] = fmt.Sprintf("test/%d/%s", 10+i, chains[i])
		labels := map[string]string{
			labelSnapshotRef: chains[i].String(),
			labelDiffID:      diffIDs[i].String(),
		}
		if i > 0 {
			labels[labelParentChain] = chains[i-1].String()
		}
		keys[i] = fmt.Sprintf("test/%d/extract-%d %s", i+1, i, chains[i])
		mounts, err := sn.Prepare(ctx, keys[i], "", snapshots.WithLabels(labels))
		if err != nil {
			t.Fatalf("prepare layer %d: %v", i, err)
		}
		upper, ok := overlay.UpperDir(mounts)
		if !ok {
			t.Fatalf("layer %d: no upper directory in %v", i, mounts)
		}
		// What the walking differ would write; Commit converts it.
		if err := os.WriteFile(filepath.Join(upper, fmt.Sprintf("file%d", i)), []byte("data"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i := range layers {
		if i > 0 {
			// A slow layer: longer than a warming waits for a follower.
			time.Sleep(3 * warmDelay)
		}
		var opts []snapshots.Opt
		if i > 0 {
			opts = append(opts, snapshots.WithParent(names[i-1]))
		}
		if err := sn.Commit(ctx, names[i], keys[i], opts...); err != nil {
			t.Fatalf("commit layer %d: %v", i, err)
		}
	}
	m := sn.Metrics()
	for deadline := time.Now().Add(10 * time.Second); m.ViewsWarmed.Load() < 1; {
		if time.Now().After(deadline) {
			t.Fatal("the top layer's view was not warmed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(3 * warmDelay)
	if w, b := m.ViewsWarmed.Load(), m.ViewsBuilt.Load(); w != 1 || b != 1 {
		t.Fatalf("%d views warmed and %d built after a %d-layer parallel unpack; want 1 and 1 (the top's)", w, b, layers)
	}
	// The warm view is the top's: the first container uses it.
	if _, err := sn.Prepare(ctx, "test/20/container", names[layers-1]); err != nil {
		t.Fatal(err)
	}
	if b, mo := m.ViewsBuilt.Load(), m.ViewsMounted.Load(); b != 1 || mo != 1 {
		t.Fatalf("the first container built %d views and mounted %d in all; want the warm view reused", b, mo)
	}
}

// TestWarmerFiresAndCancels: a scheduled warming runs after the delay,
// once; a cancelled one (by name or by chain) and one the caller says is
// awaited never run; nothing is scheduled after stop.
func TestWarmerFiresAndCancels(t *testing.T) {
	warmed := make(chan string, 10)
	w := newWarmer(time.Millisecond, func(name string) { warmed <- name })
	w.schedule("top", "chain-top", func() bool { return false })
	select {
	case got := <-warmed:
		if got != "top" {
			t.Fatalf("warmed %q, want top", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the scheduled warming did not run")
	}

	w = newWarmer(time.Hour, func(name string) { warmed <- name })
	w.schedule("a", "chain-a", func() bool { return false })
	w.schedule("b", "chain-b", func() bool { return false })
	w.schedule("c", "chain-c", func() bool { return true })
	w.schedule("d", "", func() bool { t.Error("awaited asked for a snapshot without a chain"); return true })
	if got := pendingNames(w); !slices.Equal(got, []string{"a", "b", "d"}) {
		t.Fatalf("pending %v, want a, b, d (c is awaited)", got)
	}
	w.cancel("a")
	w.cancelChain("chain-b")
	if got := pendingNames(w); !slices.Equal(got, []string{"d"}) {
		t.Fatalf("pending %v after cancelling a and chain-b, want d", got)
	}
	w.stop()
	w.schedule("e", "", nil)
	if got := pendingNames(w); len(got) != 0 {
		t.Fatalf("pending %v after stop", got)
	}
	var nilWarmer *warmer // views are not warmed: every call is a no-op
	nilWarmer.schedule("x", "", nil)
	nilWarmer.cancel("x")
	nilWarmer.cancelChain("x")
	nilWarmer.stop()
}

func pendingNames(w *warmer) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []string
	for name := range w.pending {
		out = append(out, name)
	}
	slices.Sort(out)
	return out
}

// holdWarmings makes the snapshotter's warmings wait an hour: a test
// then sees what is pending, however slow the machine.
func holdWarmings(e *testEnv) {
	e.sn.warmer.mu.Lock()
	e.sn.warmer.delay = time.Hour
	e.sn.warmer.mu.Unlock()
}

// TestWarmViewOfImageTop: after a sequential unpack (each layer prepared
// over the one committed before it) only the top layer's view is to be
// warmed; warming it mounts it; the first container uses it; Cleanup keeps
// it while the image is there, and takes it off once the image goes.
func TestWarmViewOfImageTop(t *testing.T) {
	e := newTestEnv(t, func(c *Config) { c.WarmViews = time.Minute })
	holdWarmings(e)
	names := e.pull("default/1", e.layer("a"), e.layer("b"), e.layer("c"))
	top := names[len(names)-1]
	if got := pendingNames(e.sn.warmer); !slices.Equal(got, []string{top}) {
		t.Fatalf("warmings pending after the unpack: %v, want the top's only", got)
	}
	e.sn.warmView(top) // what its timer does
	if got := e.sn.Metrics().ViewsWarmed.Load(); got != 1 {
		t.Fatalf("%d views warmed, want 1", got)
	}
	dir := filepath.Join(e.root, "mnt", e.viewKeyOf(top).Encoded())
	if m, _, targets := e.mnt.state(); m != 1 || len(targets) != 1 || targets[0] != dir {
		t.Fatalf("%d mounts, mounted %v; want the top's view %s", m, targets, dir)
	}
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if !e.mnt.isMounted(dir) {
		t.Fatal("Cleanup took off the warm view of an image that is still here")
	}
	if got := lowerOf(t, e.prepare("default/2/c", top, nil)); got != dir {
		t.Fatalf("the first container's lower is %s, want the warm view", got)
	}
	if m, _, _ := e.mnt.state(); m != 1 {
		t.Fatalf("%d mounts; the first container should have used the warm view", m)
	}
	if err := e.sn.Remove(e.ctx, "default/2/c"); err != nil {
		t.Fatal(err)
	}
	for _, name := range slices.Backward(names) {
		if err := e.sn.Remove(e.ctx, name); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if e.mnt.isMounted(dir) {
		t.Fatal("the warm view outlived its image")
	}
}

// TestWarmCancelled: the warming of a committed snapshot is cancelled when
// the next layer's extraction is prepared over it, when it is removed, when a parallel unpack's
// extraction awaits its chain (prepared after the commit, or before it:
// then it is never scheduled), or when the snapshotter closes.
func TestWarmCancelled(t *testing.T) {
	warm := func(c *Config) { c.WarmViews = time.Minute }
	for _, tc := range []struct {
		name string
		// after runs after the commit of layer a (chain ID chain) as
		// name over no parent.
		after func(e *testEnv, name string, chain digest.Digest)
	}{
		{"extraction on it", func(e *testEnv, name string, chain digest.Digest) {
			b := e.layer("b")
			e.prepare("default/2/extract", name, extractLabels(b, identity.ChainID([]digest.Digest{chain, b.diffID})))
		}},
		{"removed", func(e *testEnv, name string, _ digest.Digest) {
			if err := e.sn.Remove(e.ctx, name); err != nil {
				e.t.Fatal(err)
			}
		}},
		{"parallel extraction after", func(e *testEnv, _ string, chain digest.Digest) {
			b := e.layer("b")
			labels := extractLabels(b, identity.ChainID([]digest.Digest{chain, b.diffID}))
			labels[labelParentChain] = chain.String()
			e.prepare("default/2/extract", "", labels)
		}},
		{"closed", func(e *testEnv, _ string, _ digest.Digest) {
			if err := e.sn.Close(); err != nil {
				e.t.Fatal(err)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t, warm)
			holdWarmings(e)
			a := e.layer("a")
			name := e.pull("default/1", a)[0]
			if got := pendingNames(e.sn.warmer); !slices.Equal(got, []string{name}) {
				t.Fatalf("warmings pending after the commit: %v, want %s", got, name)
			}
			tc.after(e, name, a.diffID)
			if got := pendingNames(e.sn.warmer); len(got) != 0 {
				t.Fatalf("warmings pending: %v, want none", got)
			}
		})
	}
	t.Run("parallel extraction before", func(t *testing.T) {
		e := newTestEnv(t, warm)
		holdWarmings(e)
		a, b := e.layer("a"), e.layer("b")
		chainA := identity.ChainID([]digest.Digest{a.diffID})
		labels := extractLabels(b, identity.ChainID([]digest.Digest{a.diffID, b.diffID}))
		labels[labelParentChain] = chainA.String()
		mb := e.prepare("default/1/extract-b", "", labels)
		e.pull("default/1", a)
		if got := pendingNames(e.sn.warmer); len(got) != 0 {
			t.Fatalf("warmings pending: %v; the commit of a chain an extraction awaits is not the top", got)
		}
		// The awaited layer commits over it: now it is the top.
		if _, err := e.differ.Apply(e.ctx, b.desc, mb); err != nil {
			t.Fatal(err)
		}
		if err := e.sn.Commit(e.ctx, "default/1/top", "default/1/extract-b", snapshots.WithParent("default/1/"+chainA.String())); err != nil {
			t.Fatal(err)
		}
		if got := pendingNames(e.sn.warmer); !slices.Equal(got, []string{"default/1/top"}) {
			t.Fatalf("warmings pending: %v, want the top's", got)
		}
	})
}
