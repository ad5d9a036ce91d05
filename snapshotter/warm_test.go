package snapshotter

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
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
