package converter

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// upstreamFixture reads a file of the upstream daxfs tool's fixture (an
// image it made and the tar it made it from), kept next to the work tree.
func upstreamFixture(t *testing.T, name string) []byte {
	t.Helper()
	_, self, _, _ := runtime.Caller(0)
	p := filepath.Join(filepath.Dir(self), "..", "..", "shared", "fixtures", "upstream-v5", name)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("upstream fixture: %v", err)
	}
	return b
}

// kernelTree describes what the kernel module sees of an image: type and
// permission bits, owner, size, content or link target, nlink of
// non-directories (no mtimes or xattrs: the upstream tool has none).
func kernelTree(t *testing.T, im *daxfs.Image) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(ino uint32, p string)
	walk = func(ino uint32, p string) {
		in, err := im.Inode(ino)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		s := fmt.Sprintf("%o %d:%d", in.Mode, in.UID, in.GID)
		switch {
		case in.IsRegular():
			d, err := im.Data(ino)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			s += fmt.Sprintf(" %d %x nlink=%d", in.Size, sha256.Sum256(d), in.Nlink)
		case in.IsSymlink():
			l, err := im.Readlink(ino)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			s += " -> " + string(l)
		}
		out[p] = s
		if in.IsDir() {
			ents, err := im.ReadDir(ino)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			for _, e := range ents {
				walk(e.Ino, p+"/"+e.Name)
			}
		}
	}
	walk(daxfs.RootIno, "")
	return out
}

// TestUpstreamFixture: our conversion of the fixture's tar shows the kernel
// the same tree as the upstream tool's image of it, and a view over the
// upstream image (which has no extension block and leaves unused inode
// slots for hard links) shows the same tree again.
func TestUpstreamFixture(t *testing.T) {
	upstream := openImage(t, upstreamFixture(t, "static.daxfs"))
	want := kernelTree(t, upstream)
	if len(want) < 100 {
		t.Fatalf("fixture tree has only %d paths", len(want))
	}
	out := &memOut{}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(upstreamFixture(t, "tree.tar")), out, LayerOptions{}); err != nil {
		t.Fatal(err)
	}
	ours := kernelTree(t, openImage(t, out.b))
	// The upstream tool takes the root's attributes from the tar's "./";
	// containerd (and we) ignore that entry.
	delete(want, "")
	delete(ours, "")
	for _, d := range diffTrees(want, ours) {
		t.Errorf("ConvertLayer: %s", d)
	}
	view := kernelTree(t, buildView(t, []*daxfs.Image{upstream}))
	delete(view, "")
	for _, d := range diffTrees(want, view) {
		t.Errorf("view: %s", d)
	}
}
