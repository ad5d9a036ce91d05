package testenv_test

import (
	"os"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
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
	b.ReportMetric(float64(st.Size())/(1<<20), "tarMiB")
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
}
