// Package tig stands in for nerdctl's test framework tigron, whose module
// nerdctl's go.mod replaces with a directory of its own repository, so
// that `go install github.com/containerd/nerdctl/v2/cmd/nerdctl@v2.2.1`
// is refused. The only part of it that nerdctl's non-test code imports is
// this interface (in pkg/testutil, linked into the binary).
package tig

// T is the subset of testing.TB that nerdctl's helpers take.
type T interface {
	Helper()
	FailNow()
	Log(args ...any)
	TempDir() string
}
