package tests

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/v2/core/diff"
	diffproxy "github.com/containerd/containerd/v2/core/diff/proxy"
	"github.com/containerd/containerd/v2/core/snapshots"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"

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

// wideImage is busybox plus a layer of n empty files in one directory: a
// small blob that takes the converter seconds.
func wideImage(tb testing.TB, n int) testimage.Image {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "wide/", Typeflag: tar.TypeDir, Mode: 0o755, ModTime: testimage.DefaultMtime()})
	for i := range n {
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("wide/f%07d", i), Typeflag: tar.TypeReg, Mode: 0o644, ModTime: testimage.DefaultMtime()}); err != nil {
			tb.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		tb.Fatal(err)
	}
	return testenv.BusyboxImage(tb, testimage.Layer{Raw: buf.Bytes()})
}

// regionStats reads the daemon's region as another participant would.
func regionStats(t testing.TB, d *daxfsDaemon) daxmem.Stats {
	t.Helper()
	r, err := daxmem.Open(context.Background(), daxmem.Options{Path: d.Region, NoCreate: true})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	return r.Stats()
}

// waitWriting waits until the region holds a claim being written.
func waitWriting(t testing.TB, d *daxfsDaemon) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for regionStats(t, d).Writing == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no layer claim was ever being written")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestDaxfsCancelledApply: an unpack whose caller gives up (a pull
// cancelled by its client) stops converting and gives its region claim
// back, instead of holding it and a core until the layer is done; the
// daemon then converts the same layer as asked.
func TestDaxfsCancelledApply(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	archive, built := testenv.WriteImageArchive(t, wideImage(t, 400_000), "docker.io/library/wide:cancel")
	ctrd.CtrOK(t, "image", "import", "--no-unpack", archive)
	top := len(built.DiffIDs) - 1
	cl := ctrd.Client(t)
	// A lease keeps containerd's GC off the extraction snapshots.
	ctx, release, err := cl.WithLease(ctrd.Context(context.Background()))
	if err != nil {
		t.Fatal(err)
	}
	defer release(context.Background())
	sn := cl.SnapshotService("daxfs")
	labels := snapshots.WithLabels(map[string]string{
		snapshots.LabelSnapshotRef:    built.ChainIDs()[top].String(),
		snapshots.LabelSnapshotDiffID: built.DiffIDs[top].String(),
	})
	mounts, err := sn.Prepare(ctx, "extract-cancelled", "", labels)
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Remove(ctx, "extract-cancelled")
	conn, err := grpc.NewClient("unix://"+d.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	applier := diffproxy.NewDiffApplier(diffapi.NewDiffClient(conn)).(diff.Applier)

	actx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() {
		_, err := applier.Apply(actx, built.Layers[top].Descriptor, mounts)
		done <- err
	}()
	waitWriting(t, d)
	cancel()
	start := time.Now()
	for regionStats(t, d).Writing != 0 {
		if time.Since(start) > 30*time.Second {
			t.Fatal("the cancelled apply still holds its region claim after 30 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Logf("claim given back %v after the cancel", time.Since(start))
	if err := <-done; err == nil {
		t.Fatal("the cancelled apply succeeded")
	}
	if m := d.metrics(t); m["daxfs_layers_converted_total"] != 0 {
		t.Fatalf("%v layers converted by a cancelled apply", m["daxfs_layers_converted_total"])
	}

	mounts, err = sn.Prepare(ctx, "extract-again", "", labels)
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Remove(ctx, "extract-again")
	if _, err := applier.Apply(ctx, built.Layers[top].Descriptor, mounts); err != nil {
		t.Fatalf("applying the layer after the cancelled apply: %v", err)
	}
}

// TestDaxfsRestartWhileWriting: a daemon killed while it converts a layer
// leaves its claim WRITING; restarted, it frees that claim before it
// serves (its first re-import once failed for want of the dead claim's
// room), and the re-import works at once.
func TestDaxfsRestartWhileWriting(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/wide:restart"
	archive, _ := testenv.WriteImageArchive(t, wideImage(t, 400_000), ref)
	imported := make(chan error, 1)
	go func() {
		_, err := ctrd.Ctr(t, "image", "import", "--snapshotter", "daxfs", archive)
		imported <- err
	}()
	waitWriting(t, d)
	d.kill(t)
	<-imported
	d.start(t)
	if st := regionStats(t, d); st.Writing != 0 || st.LargestFree != st.DataSize-st.ViewArea {
		t.Fatalf("after the restart: %d claims WRITING, largest free %d of %d above the view area", st.Writing, st.LargestFree, st.DataSize-st.ViewArea)
	}
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	if out, err := ctrd.Ctr(t, "run", "--rm", "--snapshotter", "daxfs", ref, "w", "ls", "/wide/f0000000", "/wide/f0399999"); err != nil || out != "/wide/f0000000\n/wide/f0399999\n" {
		t.Fatalf("the re-imported layer: %q %v", out, err)
	}
}
