package tests

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// TestDaxfsWarmView: after an unpack the daemon mounts the view of the
// image's top layer (not of the layers below it) ahead of any container;
// the first container uses that mount; removing the image takes it off.
func TestDaxfsWarmView(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/greeting:warm"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	if len(built.DiffIDs) < 2 {
		t.Fatalf("the test image has %d layers, want several", len(built.DiffIDs))
	}
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)

	deadline := time.Now().Add(10 * time.Second)
	for d.metrics(t)["daxfs_views_warmed_total"] < 1 {
		if time.Now().After(deadline) {
			t.Fatal("no view was warmed after the import")
		}
		time.Sleep(50 * time.Millisecond)
	}
	m := d.metrics(t)
	if m["daxfs_views_warmed_total"] != 1 || m["daxfs_views_built_total"] != 1 || m["daxfs_views_mounted_total"] != 1 {
		t.Fatalf("after an import of %d layers: %v views warmed, %v built, %v mounted; want 1 each (the top layer's)",
			len(built.DiffIDs), m["daxfs_views_warmed_total"], m["daxfs_views_built_total"], m["daxfs_views_mounted_total"])
	}
	requireViewFSType(t, d, "erofs")

	runGreetingOn(t, ctrd, "daxfs", ref, "warm")
	if got := d.metrics(t)["daxfs_views_mounted_total"]; got != 1 {
		t.Fatalf("the first container made %v view mounts in all; the warm view should have served it", got)
	}
	// Idle but warm, the view outlives the container's Cleanup...
	requireViewFSType(t, d, "erofs")
	// ...not the image.
	ctrd.CtrOK(t, "image", "rm", "--sync", ref)
	if got := d.metrics(t)["daxfs_views_unmounted_total"]; got != 1 {
		t.Fatalf("Cleanup after removing the image unmounted %v views, want the warm one", got)
	}
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, mi := range ms {
		if filepath.Dir(mi.Mountpoint) == filepath.Join(d.Root, "mnt") {
			t.Fatalf("%s is still mounted after the image went", mi.Mountpoint)
		}
	}
}
