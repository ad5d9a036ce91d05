package tests

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// TestDaxfsRegionBackingFull imports an image whose layer does not fit
// the memory behind the region (its file lives on a 48 MiB tmpfs, as a
// region file on a full /dev/shm would): the import fails with an error
// that names the layer and says the region is full, nothing stays
// half-written in the region, and the daemon goes on serving: a small
// image imports and runs afterwards.
func TestDaxfsRegionBackingFull(t *testing.T) {
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=48m"); err != nil {
		t.Fatalf("mounting a small tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{Region: filepath.Join(dir, "region")})

	big := make([]byte, 64<<20)
	rand.NewChaCha8([32]byte{7}).Read(big)
	img := testimage.Image{Layers: []testimage.Layer{{Compression: testimage.Gzip,
		Entries: []testimage.Entry{testimage.File("big", big, 0o644)}}}}
	img.Config.Cmd = []string{"/bin/sh"}
	ref := "docker.io/library/too-big:latest"
	archive, built := testenv.WriteImageArchive(t, img, ref)
	_, err := ctrd.Ctr(t, "image", "import", "--snapshotter", "daxfs", archive)
	if err == nil {
		t.Fatal("an image larger than the region's memory imported")
	}
	msg := err.Error()
	layer := built.Layers[0].Descriptor.Digest.String()
	if !strings.Contains(msg, layer) || !strings.Contains(msg, "region full") || !strings.Contains(msg, "resource exhausted") {
		t.Fatalf("import error does not name the layer %s and a full region:\n%s", layer, msg)
	}

	r, err := daxmem.Open(context.Background(), daxmem.Options{Path: d.Region})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if st := r.Stats(); st.Writing != 0 || st.Ready != 0 || st.Dying != 0 {
		t.Fatalf("after the failed import the region holds %d ready, %d writing, %d dying images; want none", st.Ready, st.Writing, st.Dying)
	}
	if m := d.metrics(t); m["daxfs_convert_failures_total"] < 1 {
		t.Fatalf("no conversion failure counted: %v", m["daxfs_convert_failures_total"])
	}

	small := "docker.io/library/greeting:after-full"
	archive, _ = testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), small)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	runGreetingOn(t, ctrd, "daxfs", small, "after-full")
	if _, err := os.Stat(d.Socket); err != nil {
		t.Fatal(err)
	}
}
