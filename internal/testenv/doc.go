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
package testenv
