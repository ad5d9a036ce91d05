// Package benchmarks measures the converter against the tools a user would
// compare it with, on the same input in the same run: mkfs.erofs (Debian's
// erofs-utils) for building an image, tar -xzf for unpacking a gzip layer.
// Each benchmark reports its own time and the other tool's as custom
// metrics, so `go test -run '^$' -bench . ./converter/benchmarks` prints the
// comparison table. The inputs are a debootstrap'ed Debian rootfs (cached
// by internal/testenv) and 50,000 small files generated in the setup.
package benchmarks
