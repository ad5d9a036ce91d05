package tests

import (
	"context"
	"crypto/sha256"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// nerdctlRunGreeting runs a container of ref with nerdctl on snapshotter
// (no network: no CNI is needed) and checks what it prints.
func nerdctlRunGreeting(t *testing.T, ctrd *testenv.Containerd, snapshotter, ref string) {
	t.Helper()
	out := ctrd.NerdctlOK(t, "--snapshotter", snapshotter, "run", "--rm", "--net", "none", ref, "sh", "-c", "cat /etc/greeting; sha256sum /bin/busybox")
	if want := greeting + busyboxSum(t) + "  /bin/busybox\n"; out != want {
		t.Fatalf("nerdctl run %s: output\n%q\nwant\n%q", ref, out, want)
	}
}

// imageLayers returns the layer media types and diffIDs of image ref in
// ctrd's store, in namespace ns (default: the harness's).
func imageLayers(t *testing.T, ctrd *testenv.Containerd, ref string, ns ...string) ([]string, []digest.Digest) {
	t.Helper()
	cl := ctrd.Client(t)
	ctx := ctrd.Context(context.Background())
	if len(ns) > 0 {
		ctx = namespaces.WithNamespace(ctx, ns[0])
	}
	img, err := cl.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	mf, err := images.Manifest(ctx, cl.ContentStore(), img.Target(), platforms.Default())
	if err != nil {
		t.Fatal(err)
	}
	var mts []string
	for _, l := range mf.Layers {
		mts = append(mts, l.MediaType)
	}
	diffIDs, err := img.RootFS(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return mts, diffIDs
}

// requireUnpacked fails unless image ref is unpacked in snapshotter.
func requireUnpacked(t *testing.T, ctrd *testenv.Containerd, ref, snapshotter string) {
	t.Helper()
	ctx := ctrd.Context(context.Background())
	img, err := ctrd.Client(t).GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if ok, err := img.IsUnpacked(ctx, snapshotter); err != nil || !ok {
		t.Fatalf("%s is not unpacked in %s: %v %v", ref, snapshotter, ok, err)
	}
}

// regionImageDigest returns the sha256 of the layer image the daemon's
// region holds under diffID.
func regionImageDigest(t *testing.T, d *daxfsDaemon, diffID digest.Digest) digest.Digest {
	t.Helper()
	e, ok := regionLayer(t, d, diffID)
	if !ok {
		t.Fatalf("layer %s is not in the region", diffID)
	}
	f, err := os.Open(d.Region)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, e.Offset, e.Length)); err != nil {
		t.Fatal(err)
	}
	return digest.NewDigest(digest.SHA256, h)
}

// TestNerdctl is a user's session with nerdctl 2.2.1, which unpacks on
// the client side (containerd's Go client, not the transfer service):
// pull and run a plain image with --snapshotter daxfs, convert it to a
// pre-converted image (zstd and bare), push both with nerdctl, and pull
// and run them on another node (a containerd and daxfs daemon with a
// region of their own). A stock containerd refuses the pre-converted
// image, naming its media type, rather than unpack it as a tar.
func TestNerdctl(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	plain, built := pushImage(t, src, reg, greetingImage(t, testimage.Gzip), "greeting:nerdctl")

	// Node A: a plain image, pulled and run through nerdctl. Its
	// containerd 2.2 client does not label extraction snapshots with
	// their diffID: our differ learns it from each blob and converts the
	// layer straight into the region, as it does for containerd's own
	// unpacker (not the walking differ into an upper converted at
	// Commit).
	a, da := startWithDaxfs(t, testenv.ContainerdOptions{})
	a.NerdctlOK(t, "--snapshotter", "daxfs", "pull", "--insecure-registry", plain)
	requireUnpacked(t, a, plain, "daxfs")
	requireApplied(t, da, built)
	nerdctlRunGreeting(t, a, "daxfs", plain)

	// Pre-converted images made on node A and pushed with nerdctl.
	zstdRef, bareRef := reg+"/library/greeting:nerdctl-daxfs", reg+"/library/greeting:nerdctl-daxfs-bare"
	for _, c := range [][]string{{plain, zstdRef}, {"--uncompressed", plain, bareRef}} {
		args := append([]string{"convert", "--address", a.Address(), "--namespace", a.Namespace}, c...)
		if out, err := exec.Command(daemonBinary(t), args...).CombinedOutput(); err != nil {
			t.Fatalf("containerd-daxfs-grpc %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		a.NerdctlOK(t, "push", "--insecure-registry", c[len(c)-1])
	}
	mts, preDiffIDs := imageLayers(t, a, zstdRef)
	for _, mt := range mts {
		if mt != converter.MediaTypeLayerZstd {
			t.Fatalf("converted layers are %q, want %s", mts, converter.MediaTypeLayerZstd)
		}
	}

	// Node B: its own containerd, daemon and region.
	b, db := startWithDaxfs(t, testenv.ContainerdOptions{})
	for i, ref := range []string{zstdRef, bareRef} {
		b.NerdctlOK(t, "--snapshotter", "daxfs", "pull", "--insecure-registry", ref)
		requireUnpacked(t, b, ref, "daxfs")
		mts, diffIDs := imageLayers(t, b, ref)
		want := []string{converter.MediaTypeLayerZstd, converter.MediaTypeLayer}[i]
		for _, mt := range mts {
			if mt != want {
				t.Fatalf("%s: pulled layers are %q, want %s", ref, mts, want)
			}
		}
		for _, diffID := range diffIDs {
			if !regionHasLayer(t, db, diffID) {
				t.Fatalf("%s: layer %s is not in node B's region", ref, diffID)
			}
		}
		nerdctlRunGreeting(t, b, "daxfs", ref)
	}
	// Both forms have the same diffIDs: the second pull found its layers
	// in the region, and the differ took each pre-converted layer once.
	if m := db.metrics(t); m["daxfs_layers_applied_total"] != float64(len(built.DiffIDs)) {
		t.Fatalf("node B's differ applied %v layers, want %d", m["daxfs_layers_applied_total"], len(built.DiffIDs))
	}
	// The plain image on node B through the transfer service: our differ
	// converts its tars, and finds each image identical to the
	// pre-converted form the region holds (its digest is that layer's
	// diffID): the tar's diffID becomes an alias, one copy for both.
	b.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", plain)
	requireApplied(t, db, built)
	if m := db.metrics(t); m["daxfs_layers_shared_total"] != float64(len(built.DiffIDs)) {
		t.Errorf("node B shared %v layer images, want %d", m["daxfs_layers_shared_total"], len(built.DiffIDs))
	}
	for i, diffID := range built.DiffIDs {
		if got := regionImageDigest(t, db, diffID); got != preDiffIDs[i] {
			t.Errorf("layer %d: the region's image of tar %s has digest %s, the pre-converted layer's diffID is %s", i, diffID, got, preDiffIDs[i])
		}
		tarImage, _ := regionLayer(t, db, diffID)
		preImage, ok := regionLayer(t, db, preDiffIDs[i])
		if !ok || preImage.Key != tarImage.Key || preImage.Offset != tarImage.Offset {
			t.Errorf("layer %d: tar %s and its pre-converted form %s are not one image in the region: %v and %v", i, diffID, preDiffIDs[i], tarImage.Key, preImage.Key)
		}
	}

	// A stock containerd (overlayfs, walking differ) refuses the
	// pre-converted layers, client-side (nerdctl) and in the transfer
	// service (ctr), and unpacks nothing.
	for _, pull := range []func() (string, error){
		func() (string, error) { return src.Nerdctl(t, "pull", "--insecure-registry", zstdRef) },
		func() (string, error) { return src.Ctr(t, "image", "pull", "--plain-http", zstdRef) },
	} {
		out, err := pull()
		if err == nil {
			t.Fatalf("a stock containerd unpacked the pre-converted image %s on overlayfs:\n%s", zstdRef, out)
		}
		if msg := err.Error(); !strings.Contains(msg, converter.MediaTypeLayerZstd) || !strings.Contains(msg, "no processor for media-type") {
			t.Fatalf("stock containerd's error does not name the media type it cannot unpack: %v", err)
		}
	}
	cl := src.Client(t)
	ctx := src.Context(context.Background())
	if img, err := cl.GetImage(ctx, zstdRef); err == nil {
		if ok, err := img.IsUnpacked(ctx, "overlayfs"); err != nil || ok {
			t.Fatalf("pre-converted image unpacked into overlayfs: %v %v", ok, err)
		}
	}
}
