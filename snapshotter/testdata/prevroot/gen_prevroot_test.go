package snapshotter

// This test made root.tar.gz and root.json beside it: a snapshotter root
// written by the snapshotter of commit f37680d, the last one keeping a
// JSON stage file per extraction snapshot (snapshots/<id>/stage), and what
// it holds. TestMigrateStageFiles migrates it. To make it again, copy this
// file into snapshotter/ of that commit and run, as root,
//
//	PREVROOT_OUT=/tmp/out go test -run TestGeneratePrevRoot ./snapshotter/
//	gzip -9 -n -c /tmp/out/prevroot.tar > root.tar.gz
//	cp /tmp/out/prevroot.json root.json

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

type genMounter struct{ m map[string]mounter.Source }

func (g *genMounter) Mount(ctx context.Context, src mounter.Source, target string) error {
	g.m[target] = src
	return nil
}
func (g *genMounter) Unmount(ctx context.Context, target string) error {
	delete(g.m, target)
	return nil
}
func (g *genMounter) Mounted(ctx context.Context) ([]mounter.MountInfo, error) { return nil, nil }

// PrevLayer is one layer of the scenario.
type PrevLayer struct {
	Name   string
	File   string // the one file the layer adds
	Blob   digest.Digest
	DiffID digest.Digest
}

// PrevSnapshot is a snapshot of the scenario and the stage file the
// previous version left for it.
type PrevSnapshot struct {
	Key   string
	ID    string
	Kind  string
	Stage *stage `json:",omitempty"`
}

// PrevRoot describes the generated root.
type PrevRoot struct {
	Commit    string
	Layers    []PrevLayer
	Snapshots []PrevSnapshot
}

func TestGeneratePrevRoot(t *testing.T) {
	out := os.Getenv("PREVROOT_OUT")
	if out == "" {
		t.Skip("PREVROOT_OUT not set")
	}
	ctx := namespaces.WithNamespace(context.Background(), "default")
	work := t.TempDir()
	root := filepath.Join(work, "root")
	region, err := daxmem.Create(ctx, daxmem.Options{Path: filepath.Join(work, "region"), Size: 64 << 20, Entries: 256, Participants: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer region.Close()
	if _, err := region.Join(ctx, daxmem.ParticipantInfo{Host: "gen", PID: os.Getpid()}, filepath.Join(work, "participant")); err != nil {
		t.Fatal(err)
	}
	cs, err := local.NewStore(filepath.Join(work, "content"))
	if err != nil {
		t.Fatal(err)
	}
	cf := func(context.Context) (content.Provider, error) { return cs, nil }
	sn, err := New(ctx, Config{Root: root, Region: region, Mounter: &genMounter{m: map[string]mounter.Source{}}, Overlay: overlay.DefaultOptions(), Content: cf})
	if err != nil {
		t.Fatal(err)
	}
	d := NewDiffer(sn, cf, DifferOptions{})

	put := func(mt string, b []byte) ocispec.Descriptor {
		desc := ocispec.Descriptor{MediaType: mt, Digest: digest.FromBytes(b), Size: int64(len(b))}
		if err := content.WriteBlob(ctx, cs, desc.Digest.String(), bytes.NewReader(b), desc); err != nil {
			t.Fatal(err)
		}
		return desc
	}
	var desc = map[string]ocispec.Descriptor{}
	var res PrevRoot
	res.Commit = "f37680d"
	for _, l := range []struct{ name, file string }{{"A", "a"}, {"B", "b"}, {"C", "c"}, {"D", "d"}} {
		tr, err := testimage.TarEntries([]testimage.Entry{testimage.File(l.file, []byte("layer "+l.name+"\n"), 0o644)})
		if err != nil {
			t.Fatal(err)
		}
		gz, err := testimage.Compress(tr, testimage.Gzip)
		if err != nil {
			t.Fatal(err)
		}
		desc[l.name] = put(ocispec.MediaTypeImageLayerGzip, gz)
		res.Layers = append(res.Layers, PrevLayer{Name: l.name, File: l.file, Blob: desc[l.name].Digest, DiffID: digest.FromBytes(tr)})
	}
	diff := func(name string) digest.Digest {
		for _, l := range res.Layers {
			if l.Name == name {
				return l.DiffID
			}
		}
		t.Fatalf("no layer %s", name)
		return ""
	}
	// The pre-converted form of layer A: the image its tar converts to.
	trA, _ := testimage.TarEntries([]testimage.Entry{testimage.File("a", []byte("layer A\n"), 0o644)})
	imgPath := filepath.Join(work, "imgA")
	f, err := os.Create(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	cres, err := converter.ConvertLayer(ctx, bytes.NewReader(trA), f, converter.LayerOptions{})
	if err != nil {
		t.Fatal(err)
	}
	f.Close()
	imgA, _ := os.ReadFile(imgPath)
	imgA = imgA[:cres.Size]
	desc["imgA"] = put(converter.MediaTypeLayer, imgA)
	res.Layers = append(res.Layers, PrevLayer{Name: "imgA", File: "a", Blob: desc["imgA"].Digest, DiffID: digest.FromBytes(imgA)})

	// A manifest listing A and B, so that a second extraction of B is a
	// proven region hit.
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"},
		RootFS: ocispec.RootFS{Type: "layers", DiffIDs: []digest.Digest{diff("A"), diff("B")}}}
	cb, _ := json.Marshal(cfg)
	cdesc := put(ocispec.MediaTypeImageConfig, cb)
	man := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest,
		Config: cdesc, Layers: []ocispec.Descriptor{desc["A"], desc["B"]}}
	mb, _ := json.Marshal(man)
	mdesc := put(ocispec.MediaTypeImageManifest, mb)

	chainA := identity.ChainID([]digest.Digest{diff("A")})
	chainAB := identity.ChainID([]digest.Digest{diff("A"), diff("B")})
	extract := func(key, parent string, labels map[string]string, layer string) []mount.Mount {
		m, err := sn.Prepare(ctx, key, parent, snapshots.WithLabels(labels))
		if err != nil {
			t.Fatalf("prepare %s: %v", key, err)
		}
		if layer != "" {
			if _, err := d.Apply(ctx, desc[layer], m); err != nil {
				t.Fatalf("apply %s: %v", layer, err)
			}
		}
		return m
	}
	nameA := "default/2/" + chainA.String()
	extract("default/1/extract-A "+chainA.String(), "", map[string]string{labelSnapshotRef: chainA.String(), labelDiffID: diff("A").String()}, "A")
	if err := sn.Commit(ctx, nameA, "default/1/extract-A "+chainA.String()); err != nil {
		t.Fatal(err)
	}
	keys := []string{nameA}
	k := "default/3/extract-B " + chainAB.String()
	extract(k, nameA, map[string]string{labelSnapshotRef: chainAB.String(), labelDiffID: diff("B").String()}, "B")
	keys = append(keys, k)
	k = "default/4/extract-B-hit " + chainAB.String()
	extract(k, "", map[string]string{labelSnapshotRef: chainAB.String(), labelDiffID: diff("B").String(),
		labelParentChain: chainA.String(), labelLayerDigest: desc["B"].Digest.String(), labelManifestDigest: mdesc.Digest.String()}, "")
	keys = append(keys, k)
	k = "default/5/extract-imgA"
	extract(k, "", map[string]string{labelSnapshotRef: identity.ChainID([]digest.Digest{diff("imgA")}).String(), labelDiffID: diff("imgA").String()}, "imgA")
	keys = append(keys, k)
	k = "default/6/extract-C"
	extract(k, "", map[string]string{labelSnapshotRef: identity.ChainID([]digest.Digest{diff("C")}).String(), labelDiffID: diff("C").String()}, "C")
	keys = append(keys, k)
	// Stages written before the Layer field: an applied layer keyed by
	// its diffID (omitempty leaves the field out, as they did).
	id, _, _, err := sn.infoID(ctx, k)
	if err != nil {
		t.Fatal(err)
	}
	if err := sn.writeStage(id, stage{DiffID: diff("C"), Applied: true}); err != nil {
		t.Fatal(err)
	}
	k = "default/7/extract-D"
	extract(k, "", map[string]string{labelSnapshotRef: identity.ChainID([]digest.Digest{diff("D")}).String(), labelDiffID: diff("D").String()}, "")
	keys = append(keys, k)
	k = "default/8/container"
	if _, err := sn.Prepare(ctx, k, nameA); err != nil {
		t.Fatal(err)
	}
	keys = append(keys, k)
	k = "default/9/view"
	if _, err := sn.View(ctx, k, nameA); err != nil {
		t.Fatal(err)
	}
	keys = append(keys, k)

	for _, k := range keys {
		id, info, _, err := sn.infoID(ctx, k)
		if err != nil {
			t.Fatal(err)
		}
		ps := PrevSnapshot{Key: k, ID: id, Kind: info.Kind.String()}
		if st, ok, err := sn.readStage(id); err != nil {
			t.Fatal(err)
		} else if ok {
			ps.Stage = &st
		}
		res.Snapshots = append(res.Snapshots, ps)
	}
	if err := sn.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	b, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(filepath.Join(out, "prevroot.json"), append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
	tarOut, err := exec.Command("tar", "-C", root, "--sort=name", "--owner=0", "--group=0", "--numeric-owner",
		"--mtime=2026-01-01 00:00:00", "-cf", filepath.Join(out, "prevroot.tar"), ".").CombinedOutput()
	if err != nil {
		t.Fatalf("tar: %v: %s", err, tarOut)
	}
}

func (s *Snapshotter) infoID(ctx context.Context, key string) (id string, info snapshots.Info, u snapshots.Usage, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		id, info, u, err = storage.GetInfo(ctx, key)
		return err
	})
	return
}
