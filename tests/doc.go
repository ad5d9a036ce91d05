// Package tests holds the project's end-to-end tests: real containerd,
// runc, overlayfs, FUSE and a real registry, started by internal/testenv.
// Run them as root: go test ./tests/
package tests
