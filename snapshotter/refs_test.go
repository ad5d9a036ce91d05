package snapshotter

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// TestLayerReferenceFollowsSnapshots: our region reference on a layer
// image is set while any snapshot references it (a committed snapshot, an
// extraction whose layer was a region hit or applied) and dropped with
// the last of them, whichever goes last; the stage is in the snapshot's
// labels.
func TestLayerReferenceFollowsSnapshots(t *testing.T) {
	e := newTestEnv(t)
	a := e.layer("a")
	chain := identity.ChainID([]digest.Digest{a.diffID})
	committed := e.pull("default/1", a)[0]

	// An extraction of the same layer in another image: a proven hit.
	hitLabels := extractLabels(a, chain)
	hitLabels[labelLayerDigest] = a.desc.Digest.String()
	hitLabels[labelManifestDigest] = e.manifest(a).Digest.String()
	m := e.prepare("default/2/extract-hit", "", hitLabels)
	if len(m) != 1 || m[0].Type != "bind" || !m[0].ReadOnly() {
		t.Fatalf("a region hit's mounts are %+v, want a read-only bind", m)
	}
	if got := e.privateLabels("default/2/extract-hit"); got[labelStaged] != stagedHit || got[labelLayer] != a.diffID.String() || got[labelExtract] != a.diffID.String() {
		t.Fatalf("stage of the hit: %v", got)
	}
	if mm, err := e.sn.Mounts(e.ctx, "default/2/extract-hit"); err != nil || len(mm) != 1 || mm[0].Type != "bind" {
		t.Fatalf("Mounts of the hit: %+v, %v", mm, err)
	}
	// An extraction our differ applies: the region's image, proven by
	// the blob.
	ma := e.prepare("default/3/extract-applied", "", extractLabels(a, chain))
	if _, err := e.differ.Apply(e.ctx, a.desc, ma); err != nil {
		t.Fatal(err)
	}
	if got := e.privateLabels("default/3/extract-applied"); got[labelStaged] != stagedApplied || got[labelLayer] != a.diffID.String() {
		t.Fatalf("stage of the applied extraction: %v", got)
	}
	if _, err := os.Stat(filepath.Join(e.root, "snapshots", "3", "stage")); !os.IsNotExist(err) {
		t.Fatalf("a stage file was written: %v", err)
	}

	for _, key := range []string{committed, "default/2/extract-hit", "default/3/extract-applied"} {
		if !e.referenced(daxmem.KindLayer, a.diffID) {
			t.Fatalf("layer not referenced before removing %s", key)
		}
		if err := e.sn.Remove(e.ctx, key); err != nil {
			t.Fatal(err)
		}
	}
	if e.referenced(daxmem.KindLayer, a.diffID) {
		t.Fatal("layer still referenced after its last snapshot went")
	}
}

// TestCommitFailureGivesReferenceBack: a Commit that fails after taking
// its reference gives it back unless another snapshot uses the layer.
func TestCommitFailureGivesReferenceBack(t *testing.T) {
	e := newTestEnv(t)
	top := e.pull("default/1", e.layer("a"))[0]
	// A container writes a file, and is committed under a name in use:
	// its layer (converted from the upper) was published and referenced
	// by the Commit, and is no snapshot's.
	m := e.prepare("default/2/c", "", nil)
	upper, _ := overlay.UpperDir(m)
	if err := os.WriteFile(filepath.Join(upper, "new"), []byte("new\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Commit(e.ctx, top, "default/2/c"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("commit under a name in use: %v, want already exists", err)
	}
	if got := e.sn.Metrics().LayersConverted.Load(); got != 2 {
		t.Fatalf("%d layers converted, want the pulled one and the container's", got)
	}
	if stray := strayReferences(e); len(stray) != 0 {
		t.Fatalf("the failed commit's layer is still referenced: %v", stray)
	}
	// An extraction whose Commit fails keeps its reference: the
	// extraction snapshot still references its layer.
	b := e.layer("b")
	mb := e.prepare("default/3/extract-b", "", extractLabels(b, b.diffID))
	if _, err := e.differ.Apply(e.ctx, b.desc, mb); err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Commit(e.ctx, top, "default/3/extract-b"); !errdefs.IsAlreadyExists(err) {
		t.Fatalf("commit under a name in use: %v, want already exists", err)
	}
	if !e.referenced(daxmem.KindLayer, b.diffID) {
		t.Fatal("a failed commit dropped the reference of the extraction it left")
	}
}

// TestReferenceKeptWhenMetadataUnreadable: a reference is given back only
// when the metadata says no snapshot uses the layer; when it cannot be
// read, the reference stays.
func TestReferenceKeptWhenMetadataUnreadable(t *testing.T) {
	e := newTestEnv(t)
	a := e.layer("a")
	e.pull("default/1", a)
	e.sn.ms.Close() // every transaction fails from here
	e.sn.refMu.Lock()
	e.sn.unrefUnlessUsed(e.ctx, a.diffID)
	e.sn.refMu.Unlock()
	if !e.referenced(daxmem.KindLayer, a.diffID) {
		t.Fatal("a reference was dropped on a metadata read error")
	}
	if err := e.sn.Remove(e.ctx, "default/1/"+a.diffID.String()); err == nil {
		t.Fatal("Remove succeeded without its metadata")
	}
	if !e.referenced(daxmem.KindLayer, a.diffID) {
		t.Fatal("a failed Remove dropped the reference")
	}
}

// TestReferenceRaces: extractions of one layer prepared, applied,
// committed and removed concurrently with the removal of the snapshots
// that referenced it first. While a snapshot references the layer, our
// reference is set (another participant's GC cannot free the image);
// after the last goes, it is not.
func TestReferenceRaces(t *testing.T) {
	e := newTestEnv(t)
	a := e.layer("a")
	chain := identity.ChainID([]digest.Digest{a.diffID})
	first := e.pull("default/1", a)[0]
	hitLabels := extractLabels(a, chain)
	hitLabels[labelLayerDigest] = a.desc.Digest.String()
	hitLabels[labelManifestDigest] = e.manifest(a).Digest.String()

	const workers, rounds = 4, 10
	var wg sync.WaitGroup
	check := func(what string) {
		if !e.referenced(daxmem.KindLayer, a.diffID) {
			t.Errorf("%s: a snapshot references the layer, and we do not", what)
		}
	}
	for w := range workers {
		wg.Go(func() {
			for i := range rounds {
				key := fmt.Sprintf("default/%d/extract-%d", 10+w, i)
				name := fmt.Sprintf("default/%d/layer-%d", 10+w, i)
				labels := extractLabels(a, chain)
				if (w+i)%2 == 0 {
					labels = hitLabels
				}
				m, err := e.sn.Prepare(e.ctx, key, "", snapshots.WithLabels(labels))
				if err != nil {
					t.Error(err)
					return
				}
				if (w+i)%2 != 0 {
					if _, err := e.differ.Apply(e.ctx, a.desc, m); err != nil {
						t.Error(err)
						return
					}
				}
				check("after Prepare/Apply of " + key)
				if err := e.sn.Commit(e.ctx, name, key); err != nil {
					t.Error(err)
					return
				}
				check("after Commit of " + name)
				if err := e.sn.Remove(e.ctx, name); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Go(func() {
		if err := e.sn.Remove(e.ctx, first); err != nil {
			t.Error(err)
		}
	})
	wg.Wait()
	if e.referenced(daxmem.KindLayer, a.diffID) {
		t.Fatal("layer still referenced after every snapshot went")
	}
}
