package snapshotter

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// prevRoot is testdata/prevroot/root.json: what the root made by the
// previous version holds (see gen_prevroot_test.go there).
type prevRoot struct {
	Commit string
	Layers []struct {
		Name, File   string
		Blob, DiffID digest.Digest
	}
	Snapshots []struct {
		Key, ID, Kind string
		Stage         *stageFile
	}
}

// openPrevRoot unpacks the previous version's root, and makes an
// environment over it whose region and content store hold its layers (the
// region is not part of a root). damage, when set, is run on the root
// before the snapshotter opens it.
func openPrevRoot(t *testing.T, damage func(root string)) (*testEnv, prevRoot, map[string]testLayer) {
	t.Helper()
	var pr prevRoot
	b, err := os.ReadFile("testdata/prevroot/root.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &pr); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(t.TempDir(), "root")
	untarGz(t, "testdata/prevroot/root.tar.gz", root)
	if damage != nil {
		damage(root)
	}
	e := newClosedTestEnv(t, root)
	layers := map[string]testLayer{}
	for _, l := range pr.Layers {
		if l.Name == "imgA" {
			continue // the pre-converted form of A: its image is A's
		}
		tl, tr := e.layerOf(l.File, "layer "+l.Name+"\n")
		if tl.diffID != l.DiffID || tl.desc.Digest != l.Blob {
			t.Fatalf("layer %s made here is %s (blob %s); the root has %s (blob %s)", l.Name, tl.diffID, tl.desc.Digest, l.DiffID, l.Blob)
		}
		layers[l.Name] = tl
		if l.Name != "D" { // D was never applied
			e.publishLayer(tr, l.DiffID)
		}
	}
	e.open()
	return e, pr, layers
}

// publishLayer converts tar into the region under diffID, as our differ
// did for the previous version, and drops the reference publishing took:
// the snapshotter must take it back from its metadata.
func (e *testEnv) publishLayer(tr []byte, diffID digest.Digest) {
	e.t.Helper()
	k, err := daxmem.KeyFromDigest(diffID.String())
	if err != nil {
		e.t.Fatal(err)
	}
	c, err := e.region.Claim(e.ctx, daxmem.KindLayer, k, 1<<20, daxmem.ClaimOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	res, err := converter.ConvertLayer(e.ctx, bytes.NewReader(tr), layerWindow(c), converter.LayerOptions{})
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := c.Publish(e.ctx, res.Size); err != nil {
		e.t.Fatal(err)
	}
	if err := e.region.Unref(daxmem.KindLayer, k); err != nil {
		e.t.Fatal(err)
	}
}

func untarGz(t *testing.T, archive, dir string) {
	t.Helper()
	f, err := os.Open(archive)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.FromSlash(h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			err = os.MkdirAll(p, fs.FileMode(h.Mode).Perm())
		case tar.TypeReg:
			var b []byte
			if b, err = io.ReadAll(tr); err == nil {
				err = os.WriteFile(p, b, fs.FileMode(h.Mode).Perm())
			}
		default:
			t.Fatalf("%s: unexpected entry type %c", h.Name, h.Typeflag)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
}

// stageFiles lists the stage files under root.
func stageFiles(t *testing.T, root string) []string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(root, "snapshots", "*", "stage*"))
	if err != nil {
		t.Fatal(err)
	}
	return files
}

// TestMigrateStageFiles: a root the previous version wrote, with a JSON
// stage file beside each extraction snapshot's upper (applied, a region
// hit, a pre-converted layer stored as an identical image under another
// key, a stage from before the layer was kept, one not applied yet), is
// migrated as the daemon starts: each stage is in its snapshot's private
// labels, the files are gone, our region references follow the snapshots,
// and every snapshot behaves as it did: mounts, Apply, Commit, Remove.
func TestMigrateStageFiles(t *testing.T) {
	e, pr, layers := openPrevRoot(t, nil)
	if files := stageFiles(t, e.root); len(files) != 0 {
		t.Fatalf("stage files left after the migration: %v", files)
	}
	staged := 0
	for _, ps := range pr.Snapshots {
		got := e.privateLabels(ps.Key)
		if ps.Stage == nil {
			if _, ok := got[labelExtract]; ok {
				t.Errorf("%s (no stage file) became an extraction: %v", ps.Key, got)
			}
			continue
		}
		staged++
		want := stage(*ps.Stage).labels()
		for k, v := range want {
			if got[k] != v {
				t.Errorf("%s: label %s=%q, want %q (stage file %+v)", ps.Key, k, got[k], v, *ps.Stage)
			}
		}
		if len(got) != len(want) {
			t.Errorf("%s: private labels %v, want %v", ps.Key, got, want)
		}
	}
	if staged != 5 {
		t.Fatalf("the root holds %d stage files, want 5", staged)
	}
	key := func(name string) string {
		t.Helper()
		for _, ps := range pr.Snapshots {
			// "<namespace>/<n>/<name>[ <chain ID>]"
			if rest := strings.SplitN(ps.Key, "/", 3)[2]; rest == name || strings.HasPrefix(rest, name+" ") {
				return ps.Key
			}
		}
		t.Fatalf("no snapshot %s in the root", name)
		return ""
	}
	a, bl, c, d := layers["A"], layers["B"], layers["C"], layers["D"]
	for _, l := range []testLayer{a, bl, c} {
		if !e.referenced(daxmem.KindLayer, l.diffID) {
			t.Errorf("layer %s, which snapshots of the root use, is not referenced after the start", l.diffID)
		}
	}

	// The hit's mount is read-only; the pending extraction's needs no
	// view; a container's lower is its parent's view.
	if m, err := e.sn.Mounts(e.ctx, key("extract-B-hit")); err != nil || len(m) != 1 || m[0].Type != "bind" || !m[0].ReadOnly() {
		t.Errorf("mounts of the hit: %+v, %v", m, err)
	}
	md, err := e.sn.Mounts(e.ctx, key("extract-D"))
	if err != nil || lowerOf(t, md) != filepath.Join(e.root, "empty") {
		t.Errorf("mounts of the pending extraction: %+v, %v", md, err)
	}
	nameA := pr.Snapshots[0].Key
	mc, err := e.sn.Mounts(e.ctx, key("container"))
	if err != nil || lowerOf(t, mc) != filepath.Join(e.root, "mnt", e.viewKeyOf(nameA).Encoded()) {
		t.Errorf("mounts of the container: %+v, %v", mc, err)
	}

	// Apply: refused where the layer is there, done where it is not.
	mb, err := e.sn.Mounts(e.ctx, key("extract-B"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.differ.Apply(e.ctx, bl.desc, mb); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("Apply to the applied extraction: %v, want failed precondition", err)
	}
	if _, err := e.differ.Apply(e.ctx, d.desc, md); err != nil {
		t.Fatalf("Apply to the pending extraction: %v", err)
	}
	if got := e.privateLabels(key("extract-D"))[labelLayer]; got != d.diffID.String() {
		t.Errorf("the applied pending extraction references %q, want %s", got, d.diffID)
	}

	// Commit and Remove account the references of the migrated stages.
	if err := e.sn.Commit(e.ctx, "default/20/AB", key("extract-B-hit"), snapshots.WithParent(nameA)); err != nil {
		t.Fatal(err)
	}
	if got := e.privateLabels("default/20/AB")[labelLayer]; got != bl.diffID.String() {
		t.Errorf("the committed hit's layer is %q, want %s", got, bl.diffID)
	}
	for _, k := range []string{key("extract-C"), key("extract-B"), key("extract-imgA")} {
		if err := e.sn.Remove(e.ctx, k); err != nil {
			t.Fatal(err)
		}
	}
	if e.referenced(daxmem.KindLayer, c.diffID) {
		t.Error("the layer of the legacy stage is still referenced after its snapshot went")
	}
	if !e.referenced(daxmem.KindLayer, bl.diffID) || !e.referenced(daxmem.KindLayer, a.diffID) {
		t.Error("a layer committed snapshots use lost its reference")
	}

	// A second start has nothing to migrate and changes nothing.
	before := e.privateLabels("default/20/AB")
	e.restart()
	if got := e.privateLabels("default/20/AB"); got[labelLayer] != before[labelLayer] || got[labelChain] != before[labelChain] {
		t.Errorf("labels after a second start %v, want %v", got, before)
	}
}

// TestMigrateDamagedStageFile: a stage file that does not parse leaves its
// snapshot marked damaged: Apply, Commit and Mounts fail with DataLoss
// naming it (as reading the file failed before), Remove works, and the
// other snapshots are migrated.
func TestMigrateDamagedStageFile(t *testing.T) {
	e, pr, layers := openPrevRoot(t, func(root string) {
		if err := os.WriteFile(filepath.Join(root, "snapshots", "5", "stage"), []byte(`{"diffID": "sha256:12`), 0o600); err != nil {
			t.Fatal(err)
		}
	})
	var damaged string
	for _, ps := range pr.Snapshots {
		if ps.ID == "5" {
			damaged = ps.Key
		}
	}
	if files := stageFiles(t, e.root); len(files) != 0 {
		t.Fatalf("stage files left after the migration: %v", files)
	}
	if _, err := e.sn.Mounts(e.ctx, damaged); !errdefs.IsDataLoss(err) {
		t.Errorf("Mounts of the damaged snapshot: %v, want data loss", err)
	}
	// The mounts its Prepare returned, which containerd hands the differ.
	m, err := overlay.Container([]string{e.sn.emptyDir()}, e.sn.upperPath("5"), e.sn.workPath("5"), overlay.DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.differ.Apply(e.ctx, layers["C"].desc, []mount.Mount{m}); !errdefs.IsDataLoss(err) {
		t.Errorf("Apply to the damaged snapshot: %v, want data loss", err)
	}
	if err := e.sn.Commit(e.ctx, "default/20/C", damaged); !errdefs.IsDataLoss(err) {
		t.Errorf("Commit of the damaged snapshot: %v, want data loss", err)
	}
	if e.referenced(daxmem.KindLayer, layers["C"].diffID) {
		t.Error("the damaged snapshot's layer is referenced: nothing says which it was")
	}
	if err := e.sn.Remove(e.ctx, damaged); err != nil {
		t.Fatal(err)
	}
	if got := e.privateLabels(pr.Snapshots[1].Key)[labelStaged]; got != stagedApplied {
		t.Errorf("the other snapshots were not migrated: %q", got)
	}
}
