// Package conformance holds the converter's end-to-end tests: conversions
// checked against containerd's own applier and against a real containerd
// with the overlayfs snapshotter. They live apart from package converter so
// that its unit tests and fuzz target do not link containerd (a fuzz
// binary's speed falls with the code it instruments).
package conformance
