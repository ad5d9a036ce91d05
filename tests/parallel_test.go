package tests

import (
	"math/rand/v2"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// TestDaxfsParallelUnpack pulls a multi-layer image with whiteouts and
// opaque directories through a containerd whose transfer service unpacks
// in parallel (max_concurrent_unpacks > 1 and our rebase capability):
// every layer is prepared without a parent, applied by our differ
// concurrently, and committed in order over its parent. The root must be
// what overlayfs gives for the same pull, and only the top layer's view is
// warmed. The top layer is large, so the layer below it is committed well
// before it: a warming that only waited for a following commit would
// warm that lower layer too.
func TestDaxfsParallelUnpack(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	img := layeredImage(t)
	big := make([]byte, 128<<20)
	rand.NewChaCha8([32]byte{1}).Read(big)
	img.Layers = append(img.Layers, testimage.Layer{Compression: testimage.Uncompressed,
		Entries: []testimage.Entry{testimage.File("big", big, 0o644)}})
	remote, built := pushImage(t, src, reg, img, "layered:parallel")
	if len(built.DiffIDs) < 3 {
		t.Fatalf("the test image has %d layers, want several", len(built.DiffIDs))
	}

	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{MaxConcurrentUnpacks: 3})
	ctrd.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", remote)
	log, err := os.ReadFile(ctrd.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(log), "parallel=true") {
		t.Fatal(`containerd did not unpack in parallel (no "image unpacked ... parallel=true" in its log)`)
	}
	requireApplied(t, d, built)

	deadline := time.Now().Add(10 * time.Second)
	for d.metrics(t)["daxfs_views_warmed_total"] < 1 {
		if time.Now().After(deadline) {
			t.Fatal("no view was warmed after the pull")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // past any warming of a lower layer
	if m := d.metrics(t); m["daxfs_views_warmed_total"] != 1 || m["daxfs_views_built_total"] != 1 {
		t.Fatalf("after a parallel unpack of %d layers: %v views warmed, %v built; want 1 and 1 (the top layer's)",
			len(built.DiffIDs), m["daxfs_views_warmed_total"], m["daxfs_views_built_total"])
	}

	ctrd.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", remote)
	want := viewTree(t, ctrd, "overlayfs", built)
	got := viewTree(t, ctrd, "daxfs", built)
	if diff := testenv.Diff(want, got, testenv.FieldDirMtime|testenv.FieldDirNlink); len(diff) > 0 {
		t.Fatalf("daxfs root after a parallel unpack differs from overlayfs's:\n%s", strings.Join(diff, "\n"))
	}
}
