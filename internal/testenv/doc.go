// Package testenv is the harness for the project's end-to-end tests and
// benchmarks: it finds the binaries scripts/deps.sh installs, starts real
// containerd daemons and distribution registries with private temporary
// state, builds a cached Debian rootfs, and snapshots directory trees so two
// snapshotters' views of an image can be compared path for path.
//
// Everything a helper starts is stopped, unmounted and removed by
// tb.Cleanup. Helpers fail the test (tb.Fatal) when something they need is
// missing; they never skip, because a skipped end-to-end test must not count
// as a pass.
//
// OCI image building (layers, whiteouts, OCI archives) lives in the
// sub-package testimage, which does not depend on package testing so that
// cmd/mkimage can use it too.
//
// A typical end-to-end test:
//
//	testenv.RequireRoot(t)
//	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{ExtraConfig: daxfsToml})
//	img := testenv.BusyboxImage(t, testimage.Layer{Entries: []testimage.Entry{
//		testimage.File("etc/greeting", []byte("hi\n"), 0o644),
//		testimage.Whiteout("bin/vi"),
//	}})
//	archive, built := testenv.WriteImageArchive(t, img, "docker.io/library/t:latest")
//	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
//	out := ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", "docker.io/library/t:latest", "c1", "cat", "/etc/greeting")
//
//	// Compare the merged tree with the overlayfs reference:
//	chain := built.ChainIDs()
//	daxfs, _ := testenv.Snapshot(ctrd.MountView(t, "daxfs", chain[len(chain)-1].String()))
//	ref, _ := testenv.Snapshot(ctrd.MountView(t, "overlayfs", chain[len(chain)-1].String()))
//	if d := testenv.Diff(ref, daxfs, testenv.FieldDirMtime); len(d) > 0 { t.Error(d) }
//
// Facts about the overlayfs reference that equivalence tests must mirror
// (see tests/baseline_test.go): containerd's applier drops trusted.* xattrs
// from layer tars, applies a hard link entry's mode and owner to the shared
// inode, requires hard link targets in the same layer, and gives the root
// and implicitly created directories the time of the unpack as mtime.
package testenv
