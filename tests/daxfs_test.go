package tests

import (
	"context"
	"strings"
	"testing"

	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// regionHasLayer reports whether the daemon's region holds a READY layer
// image keyed by diffID, looking at the shared region as another
// participant would.
func regionHasLayer(t *testing.T, d *daxfsDaemon, diffID digest.Digest) bool {
	t.Helper()
	r, err := daxmem.Open(context.Background(), daxmem.Options{Path: d.Region})
	if err != nil {
		t.Fatalf("opening the daemon's region: %v", err)
	}
	defer r.Close()
	k, err := daxmem.KeyFromDigest(diffID.String())
	if err != nil {
		t.Fatal(err)
	}
	_, ok := r.Lookup(daxmem.KindLayer, k)
	return ok
}

// TestDaxfsImportRun imports an image through the transfer service with
// --snapshotter daxfs (our differ converts each layer into the region) and
// runs containers that read, exec, write, delete and list.
func TestDaxfsImportRun(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/greeting-daxfs:latest"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)

	for _, diffID := range built.DiffIDs {
		if !regionHasLayer(t, d, diffID) {
			t.Fatalf("layer %s is not in the region after import", diffID)
		}
	}

	out := ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", ref, "read",
		"sh", "-c", "cat /etc/greeting; sha256sum /bin/busybox")
	if want := greeting + busyboxSum(t) + "  /bin/busybox\n"; out != want {
		t.Fatalf("container output %q, want %q", out, want)
	}
	// Copy-up on write, delete of a lower file, rename, and a listing of
	// the merged directory, all in one container.
	script := strings.Join([]string{
		"echo changed >> /etc/greeting",
		"rm /bin/ls",
		"mv /etc/greeting /etc/moved",
		"cat /etc/moved",
		"test ! -e /bin/ls && echo ls-gone",
		"ls /etc",
	}, " && ")
	out = ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", ref, "write", "sh", "-c", script)
	want := greeting + "changed\nls-gone\nmoved\n"
	if out != want {
		t.Fatalf("write container output %q, want %q", out, want)
	}
	// The lower is untouched: a new container sees the image as it was.
	out = ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", ref, "again", "sh", "-c", "cat /etc/greeting; ls /bin/ls")
	if out != greeting+"/bin/ls\n" {
		t.Fatalf("second container output %q", out)
	}
}
