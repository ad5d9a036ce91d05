package snapshotter

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// TestApplyErrorClasses: our differ answers containerd with the errdefs
// class that makes it do the right thing: NotImplemented for mounts and
// media types that are not ours (the diff service moves on to the walking
// differ), FailedPrecondition for a layer already there or a blob that is
// not its diffID (as containerd's applier), NotFound for a blob or
// snapshot that does not exist, InvalidArgument for a malformed layer,
// ResourceExhausted for one too large; and nothing is left claimed or
// referenced by a failure.
func TestApplyErrorClasses(t *testing.T) {
	for _, tc := range []struct {
		name  string
		class func(error) bool
		want  string // in the message
		// apply sets up a case on e and applies.
		apply func(e *testEnv) error
	}{
		{"not our mounts", errdefs.IsNotImplemented, "not a daxfs extraction snapshot", func(e *testEnv) error {
			_, err := e.differ.Apply(e.ctx, e.layer("a").desc, []mount.Mount{{Type: "bind", Source: e.t.TempDir(), Options: []string{"rbind"}}})
			return err
		}},
		{"container snapshot", errdefs.IsNotImplemented, "not an extraction snapshot", func(e *testEnv) error {
			_, err := e.differ.Apply(e.ctx, e.layer("a").desc, e.prepare("default/1/c", "", nil))
			return err
		}},
		{"media type not ours", errdefs.IsNotImplemented, "media type", func(e *testEnv) error {
			a := e.layer("a")
			desc := a.desc
			desc.MediaType = "application/vnd.example.layer"
			_, err := e.differ.Apply(e.ctx, desc, e.prepare("default/1/x", "", extractLabels(a, a.diffID)))
			return err
		}},
		{"region hit", errdefs.IsFailedPrecondition, "already staged", func(e *testEnv) error {
			a := e.layer("a")
			e.pull("default/1", a)
			labels := extractLabels(a, a.diffID)
			labels[labelLayerDigest] = a.desc.Digest.String()
			labels[labelManifestDigest] = e.manifest(a).Digest.String()
			_, err := e.differ.Apply(e.ctx, a.desc, e.prepare("default/2/x", "", labels))
			return err
		}},
		{"applied twice", errdefs.IsFailedPrecondition, "already in the region", func(e *testEnv) error {
			a := e.layer("a")
			m := e.prepare("default/1/x", "", extractLabels(a, a.diffID))
			if _, err := e.differ.Apply(e.ctx, a.desc, m); err != nil {
				e.t.Fatal(err)
			}
			_, err := e.differ.Apply(e.ctx, a.desc, m)
			return err
		}},
		{"wrong diffID", errdefs.IsFailedPrecondition, "wrong diff id", func(e *testEnv) error {
			a, b := e.layer("a"), e.layer("b")
			_, err := e.differ.Apply(e.ctx, b.desc, e.prepare("default/1/x", "", extractLabels(a, a.diffID)))
			return err
		}},
		{"wrong diffID of a region image", errdefs.IsFailedPrecondition, "wrong diff id", func(e *testEnv) error {
			a, b := e.layer("a"), e.layer("b")
			e.pull("default/1", a)
			_, err := e.differ.Apply(e.ctx, b.desc, e.prepare("default/2/x", "", extractLabels(a, a.diffID)))
			return err
		}},
		{"no namespace", errdefs.IsFailedPrecondition, "namespace is required", func(e *testEnv) error {
			a := e.layer("a")
			_, err := e.differ.Apply(context.Background(), a.desc, e.prepare("default/1/x", "", extractLabels(a, a.diffID)))
			return err
		}},
		{"blob not in the content store", errdefs.IsNotFound, "", func(e *testEnv) error {
			a := e.layer("a")
			desc := a.desc
			desc.Digest = digest.FromString("no such blob")
			_, err := e.differ.Apply(e.ctx, desc, e.prepare("default/1/x", "", extractLabels(a, a.diffID)))
			return err
		}},
		{"malformed layer", errdefs.IsInvalidArgument, "", func(e *testEnv) error {
			desc := e.blob(ocispec.MediaTypeImageLayerGzip, []byte("\x1f\x8b\x08\x00 not gzip at all"))
			diffID := digest.FromString("whatever")
			_, err := e.differ.Apply(e.ctx, desc, e.prepare("default/1/x", "", extractLabels(testLayer{diffID: diffID}, diffID)))
			return err
		}},
		{"snapshot removed", errdefs.IsNotFound, "", func(e *testEnv) error {
			a := e.layer("a")
			m := e.prepare("default/1/x", "", extractLabels(a, a.diffID))
			if err := e.sn.Remove(e.ctx, "default/1/x"); err != nil {
				e.t.Fatal(err)
			}
			_, err := e.differ.Apply(e.ctx, a.desc, m)
			return err
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t)
			err := tc.apply(e)
			if err == nil || !tc.class(err) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Apply: %v; want an error of the right class containing %q", err, tc.want)
			}
			for _, ent := range e.region.Entries() {
				if ent.State == daxmem.StateWriting {
					t.Errorf("a claim is left: %+v", ent)
				}
			}
			if stray := strayReferences(e); len(stray) != 0 {
				t.Errorf("a failed Apply left references no snapshot has: %v", stray)
			}
		})
	}
}

// strayReferences lists the layer images we reference that no snapshot
// of ours does.
func strayReferences(e *testEnv) []string {
	e.t.Helper()
	var inUse map[string]bool
	if err := e.sn.ms.WithTransaction(e.ctx, false, func(ctx context.Context) error {
		var err error
		inUse, err = layersInUse(ctx)
		return err
	}); err != nil && !errdefs.IsNotFound(err) {
		e.t.Fatal(err)
	}
	var stray []string
	for _, ent := range e.region.Entries() {
		if ent.Kind == daxmem.KindLayer && ent.Refs&(1<<uint(e.region.ID())) != 0 && !inUse[ent.Key.String()] {
			stray = append(stray, ent.Key.String())
		}
	}
	return stray
}

// gatedProvider holds every question about a blob until its gate closes.
type gatedProvider struct {
	content.Store
	gate <-chan struct{}
}

func (g gatedProvider) ReaderAt(ctx context.Context, desc ocispec.Descriptor) (content.ReaderAt, error) {
	<-g.gate
	return g.Store.ReaderAt(ctx, desc)
}

func (g gatedProvider) Info(ctx context.Context, d digest.Digest) (content.Info, error) {
	<-g.gate
	return g.Store.Info(ctx, d)
}

// TestApplyToRemovedSnapshot: an extraction snapshot removed while our
// differ is at work gets no stage, Apply fails NotFound, and the reference
// the apply took on the layer image is given back, unless another
// snapshot uses the image.
func TestApplyToRemovedSnapshot(t *testing.T) {
	for _, used := range []bool{false, true} {
		t.Run(fmt.Sprintf("used elsewhere %v", used), func(t *testing.T) {
			e := newTestEnv(t)
			a := e.layer("a")
			if used {
				e.pull("default/0", a)
			}
			gate := make(chan struct{})
			e.differ = NewDiffer(e.sn, func(context.Context) (content.Provider, error) { return gatedProvider{e.cs, gate}, nil }, DifferOptions{})
			m := e.prepare("default/1/x", "", extractLabels(a, identity.ChainID([]digest.Digest{a.diffID})))
			errc := make(chan error, 1)
			go func() {
				_, err := e.differ.Apply(e.ctx, a.desc, m)
				errc <- err
			}()
			if err := e.sn.Remove(e.ctx, "default/1/x"); err != nil {
				t.Fatal(err)
			}
			close(gate)
			if err := <-errc; !errdefs.IsNotFound(err) {
				t.Fatalf("Apply to a snapshot removed meanwhile: %v, want not found", err)
			}
			if got := e.referenced(daxmem.KindLayer, a.diffID); got != used {
				t.Fatalf("referenced %v after the failed Apply", got)
			}
		})
	}
}

// TestApplyPreconvertedAlias: a pre-converted layer identical to a layer
// image in the region is stored once: the extraction's stage names the
// region image, not its diffID, and Commit and Remove account the
// reference on that image.
func TestApplyPreconvertedAlias(t *testing.T) {
	e := newTestEnv(t)
	a := e.layer("a")
	e.pull("default/1", a)
	img := e.regionImage(a.diffID)
	pre := e.blob(converter.MediaTypeLayer, img)
	diffID := pre.Digest
	m := e.prepare("default/2/x", "", extractLabels(testLayer{diffID: diffID}, diffID))
	if _, err := e.differ.Apply(e.ctx, pre, m); err != nil {
		t.Fatal(err)
	}
	st := e.privateLabels("default/2/x")
	if st[labelExtract] != diffID.String() || st[labelLayer] != a.diffID.String() {
		t.Fatalf("stage of the shared layer: %v; want diffID %s and layer %s", st, diffID, a.diffID)
	}
	if err := e.sn.Commit(e.ctx, "default/2/pre", "default/2/x"); err != nil {
		t.Fatal(err)
	}
	if got := e.privateLabels("default/2/pre")[labelLayer]; got != a.diffID.String() {
		t.Fatalf("committed layer %s, want the shared image %s", got, a.diffID)
	}
	if err := e.sn.Remove(e.ctx, "default/1/"+a.diffID.String()); err != nil {
		t.Fatal(err)
	}
	if !e.referenced(daxmem.KindLayer, a.diffID) {
		t.Fatal("the shared image lost our reference while the pre-converted snapshot uses it")
	}
	if err := e.sn.Remove(e.ctx, "default/2/pre"); err != nil {
		t.Fatal(err)
	}
	if e.referenced(daxmem.KindLayer, a.diffID) {
		t.Fatal("the shared image is still referenced after both snapshots went")
	}
}

// regionImage returns the bytes of layer image d in the region.
func (e *testEnv) regionImage(d digest.Digest) []byte {
	e.t.Helper()
	k, _ := daxmem.KeyFromDigest(d.String())
	ent, ok := e.region.Lookup(daxmem.KindLayer, k)
	if !ok {
		e.t.Fatalf("layer %s not in the region", d)
	}
	b, err := e.region.Slice(ent.Offset, ent.Length)
	if err != nil {
		e.t.Fatal(err)
	}
	return append([]byte(nil), b...)
}
