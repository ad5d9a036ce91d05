package tests

import (
	"strings"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

const secret = "alice's private file\n"

// secretImage is busybox plus a layer holding /secret.
func secretImage(tb testing.TB) testimage.Image {
	return testenv.BusyboxImage(tb, testimage.Layer{Entries: []testimage.Entry{
		testimage.File("secret", []byte(secret), 0o644),
	}})
}

// TestDaxfsCrossNamespaceDiffID: a namespace cannot read another's layer
// by naming its diffID. Alice's image is converted into the region on one
// participant; on another participant of the same region, Mallory imports
// an image whose config lists Alice's diffID over an unrelated blob, once
// plainly and once with labels that name Alice's blob and manifest. Every
// import fails as overlayfs's does ("wrong diff id"), and Mallory's image
// has no root. Bob, who holds Alice's image himself, converts nothing.
func TestDaxfsCrossNamespaceDiffID(t *testing.T) {
	first, d1 := startWithDaxfs(t, testenv.ContainerdOptions{})
	alice := first.InNamespace("alice")
	archive, built := testenv.WriteImageArchive(t, secretImage(t), "docker.io/alice/secret:1")
	alice.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	secretLayer := built.Layers[len(built.Layers)-1].Descriptor
	secretDiffID := built.DiffIDs[len(built.DiffIDs)-1]
	if out := alice.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", "docker.io/alice/secret:1", "a", "cat", "/secret"); out != secret {
		t.Fatalf("alice reads %q", out)
	}

	second, d2 := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{Region: d1.Region})
	mallory := second.InNamespace("mallory")
	decoy, err := testimage.TarEntries([]testimage.Entry{testimage.File("decoy", []byte("nothing here\n"), 0o644)})
	if err != nil {
		t.Fatal(err)
	}
	decoyGz, err := testimage.Compress(decoy, testimage.Gzip)
	if err != nil {
		t.Fatal(err)
	}
	evil := func(annotations map[string]string) testimage.Image {
		return testenv.BusyboxImage(t, testimage.Layer{
			Blob: decoyGz, DiffID: secretDiffID, MediaType: testimage.Gzip.MediaType(), Annotations: annotations,
		})
	}
	for _, tc := range []struct {
		name        string
		annotations map[string]string
	}{
		{"diffID only", nil},
		{"labels naming alice's blob and manifest", map[string]string{
			"containerd.io/snapshot/cri.layer-digest":    secretLayer.Digest.String(),
			"containerd.io/snapshot/cri.manifest-digest": built.Manifest.Descriptor.Digest.String(),
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ref := "docker.io/mallory/evil:" + strings.ReplaceAll(tc.name, " ", "-")
			archive, _ := testenv.WriteImageArchive(t, evil(tc.annotations), ref)
			for _, sn := range []string{"overlayfs", "daxfs"} {
				out, err := mallory.Ctr(t, "image", "import", "--snapshotter", sn, archive)
				if err == nil || !strings.Contains(err.Error(), "wrong diff id") {
					t.Fatalf("%s: import of a config naming another namespace's diffID over an unrelated blob: %v\n%s", sn, err, out)
				}
			}
			if out, err := mallory.Ctr(t, "run", "--rm", "--snapshotter", "daxfs", ref, "m", "cat", "/secret"); err == nil || strings.Contains(out, secret) {
				t.Fatalf("mallory ran the image: %q %v", out, err)
			}
		})
	}

	// Bob has the image's blobs: the region's images are proven his.
	bob := second.InNamespace("bob")
	bob.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	if m := d2.metrics(t); m["daxfs_layers_converted_total"] != 0 {
		t.Fatalf("bob's import converted %v layers, want 0", m["daxfs_layers_converted_total"])
	}
	if out := bob.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", "docker.io/alice/secret:1", "b", "cat", "/secret"); out != secret {
		t.Fatalf("bob reads %q", out)
	}
}

// TestDaxfsSharedRegionPull: a participant pulling an image another one
// converted downloads no layer: containerd labels each extraction with the
// layer's blob and manifest (enable_remote_snapshot_annotations), the
// region knows the image was made from that blob, and the manifest, now in
// the puller's namespace, lists it.
func TestDaxfsSharedRegionPull(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	remote, built := pushImage(t, src, reg, layeredImage(t), "layered:shared")

	first, d1 := startWithDaxfs(t, testenv.ContainerdOptions{})
	first.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", remote)
	requireApplied(t, d1, built)

	second, d2 := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{Region: d1.Region})
	second.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", remote)
	m := d2.metrics(t)
	if m["daxfs_layers_converted_total"] != 0 || m["daxfs_region_hits_total"] != float64(len(built.DiffIDs)) {
		t.Fatalf("second participant: %v layers converted, %v region hits; want 0 and %d", m["daxfs_layers_converted_total"], m["daxfs_region_hits_total"], len(built.DiffIDs))
	}
	content := second.CtrOK(t, "content", "ls", "-q")
	for _, l := range built.Layers {
		if strings.Contains(content, l.Descriptor.Digest.String()) {
			t.Fatalf("layer blob %s was downloaded:\n%s", l.Descriptor.Digest, content)
		}
	}
	if d := testenv.Diff(viewTree(t, first, "daxfs", built), viewTree(t, second, "daxfs", built), testenv.FieldDirMtime); len(d) > 0 {
		t.Fatalf("the participants' roots differ:\n%s", strings.Join(d, "\n"))
	}
}
