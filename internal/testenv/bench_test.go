package testenv_test

import (
	"os"
	"strings"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// BenchmarkSnapshotDebianRootfs measures testenv.Snapshot (a full read of
// every file) over the cached Debian minbase rootfs, which equivalence
// tests of other packages compare, and makes sure DebianRootfsTar builds.
// The first run on a machine builds the rootfs with debootstrap (minutes).
func BenchmarkSnapshotDebianRootfs(b *testing.B) {
	root := testenv.DebianRootfs(b)
	tarPath := testenv.DebianRootfsTar(b)
	st, err := os.Stat(tarPath)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	var n int
	for b.Loop() {
		tree, err := testenv.Snapshot(root)
		if err != nil {
			b.Fatal(err)
		}
		n = len(tree)
	}
	b.ReportMetric(float64(n), "paths")
	b.ReportMetric(float64(st.Size())/(1<<20), "tarMiB")
}

// BenchmarkOverlayfsImportDebian measures `ctr image import` of the Debian
// rootfs as a one-layer zstd image into a fresh containerd with the stock
// overlayfs snapshotter: the reference figure for the daxfs snapshotter's
// import. It also checks that the unpacked tree equals the debootstrap tree
// path for path (every attribute, mtimes included), which validates
// DebianRootfsTar, testimage and Snapshot on a real distribution.
func BenchmarkOverlayfsImportDebian(b *testing.B) {
	testenv.RequireRoot(b)
	root := testenv.DebianRootfs(b)
	data, err := os.ReadFile(testenv.DebianRootfsTar(b))
	if err != nil {
		b.Fatal(err)
	}
	ref, err := testenv.Snapshot(root)
	if err != nil {
		b.Fatal(err)
	}
	delete(ref, "/") // the root is not in the tar
	img := testimage.Image{Layers: []testimage.Layer{{Raw: data, Compression: testimage.Zstd}}}
	archive, built := testenv.WriteImageArchive(b, img, "docker.io/library/debian-minbase:bench")
	b.SetBytes(int64(len(data)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		ctrd := testenv.StartContainerd(b, testenv.ContainerdOptions{LogLevel: "info"})
		b.StartTimer()
		ctrd.CtrOK(b, "image", "import", archive)
		b.StopTimer()
		if i == 0 {
			got, err := testenv.Snapshot(ctrd.MountView(b, "overlayfs", built.ChainIDs()[0].String()))
			if err != nil {
				b.Fatal(err)
			}
			delete(got, "/")
			if d := testenv.Diff(ref, got); len(d) > 0 {
				b.Fatalf("unpacked Debian tree differs from debootstrap's (%d differences):\n%s", len(d), strings.Join(d[:min(len(d), 40)], "\n"))
			}
		}
		b.StartTimer()
	}
}
