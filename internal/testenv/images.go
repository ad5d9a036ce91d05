package testenv

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// WriteImageArchive builds img and writes it as an OCI image archive named
// name (a full reference such as "docker.io/library/t:latest"; see
// testimage.Built.WriteArchive) in a temporary directory. It returns the
// archive path, for `ctr image import`, and the built image.
func WriteImageArchive(tb testing.TB, img testimage.Image, name string) (string, *testimage.Built) {
	tb.Helper()
	built, err := img.Build()
	if err != nil {
		tb.Fatalf("testenv: building image %s: %v", name, err)
	}
	base := strings.NewReplacer("/", "_", ":", "_", "@", "_").Replace(name)
	if base == "" {
		base = "image"
	}
	path := filepath.Join(tb.TempDir(), base+".oci.tar")
	f, err := os.Create(path)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	if err := built.WriteArchive(f, name); err != nil {
		f.Close()
		tb.Fatalf("testenv: writing image archive %s: %v", path, err)
	}
	if err := f.Close(); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return path, built
}

// BusyboxImage returns testimage.BusyboxImage(extra...), failing the test
// when busybox-static is missing.
func BusyboxImage(tb testing.TB, extra ...testimage.Layer) testimage.Image {
	tb.Helper()
	img, err := testimage.BusyboxImage(extra...)
	if err != nil {
		tb.Fatalf("testenv: %v: run scripts/deps.sh", err)
	}
	return img
}
