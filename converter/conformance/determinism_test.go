package conformance

import (
	"archive/tar"
	"bytes"
	"math/rand"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/archive"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// walkOrder sorts entries the way a tar writer walking a tree lists them:
// depth first, each directory's entries in byte order (a path sorts by its
// components, so a directory comes right before its contents).
func walkOrder(ents []tarEnt) {
	slices.SortStableFunc(ents, func(a, b tarEnt) int {
		return slices.Compare(strings.Split(strings.TrimSuffix(a.name, "/"), "/"), strings.Split(strings.TrimSuffix(b.name, "/"), "/"))
	})
}

// determinismEntries is a layer in OCI form using every feature a layer can
// hold: whiteouts, opaque directories (including the root's), hard links,
// xattrs, devices, FIFOs, symlinks, setuid bits, long and UTF-8 names,
// nanosecond mtimes.
func determinismEntries() []tarEnt {
	mt := func(e tarEnt, ns int64) tarEnt { e.mtime = time.Unix(1600000000+ns, ns*7919%1e9); return e }
	xf := withX(file("bin/ping", "ping"), "security.capability", "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
	xf.xattr["user.note"] = "hello"
	ents := []tarEnt{
		{name: ".wh..wh..opq", typ: tar.TypeReg},
		mt(dir("bin"), 1),
		mt(xf, 2),
		mt(withMode(file("bin/su", "su"), 0o4755, 0), 3),
		mt(withMode(hardlink("bin/su2", "bin/su"), 0o4755, 0), 3),
		mt(withMode(hardlink("bin/zz-su3", "bin/su"), 0o4755, 0), 3),
		mt(symlink("bin/sh", "busybox"), 4),
		mt(file("bin/busybox", strings.Repeat("\x7fELF", 3000)), 5),
		mt(withMode(dir("tmp"), 0o1777, 0), 6),
		mt(dir("etc"), 7),
		{name: "etc/.wh.passwd-", typ: tar.TypeReg},
		mt(withX(dir("etc/opaque"), "user.dir", "d"), 8),
		{name: "etc/opaque/.wh..wh..opq", typ: tar.TypeReg},
		mt(file("etc/opaque/-first", "sorts before the marker"), 9),
		mt(file("etc/opaque/zlast", "z"), 10),
		mt(file("etc/"+strings.Repeat("n", 255), "long"), 11),
		mt(file("etc/héllo ☃", "utf8"), 12),
		mt(withMode(file("etc/shadow", "secret"), 0o640, 42), 13),
		mt(dir("dev"), 14),
		mt(tarEnt{name: "dev/null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3}, 15),
		mt(tarEnt{name: "dev/sda", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 0}, 16),
		mt(tarEnt{name: "dev/initctl", typ: tar.TypeFifo, mode: 0o600}, 17),
		{name: "dev/.wh.gone", typ: tar.TypeReg},
		mt(dir("empty"), 18),
		mt(file("zero", ""), 19),
		mt(dir("a"), 20), mt(dir("a/b"), 21), mt(dir("a/b/c"), 22), mt(file("a/b/c/d", "deep"), 23),
		mt(file("a.txt", "sorts after a/ as a path, before it as a string"), 24),
	}
	walkOrder(ents)
	return ents
}

// TestConvertDirMatchesTar extracts a layer tar with containerd's own
// applier and overlay whiteout conversion (what the walking differ does to
// an overlay upper: 0/0 devices, trusted.overlay.opaque) and checks that
// converting that directory gives the same bytes as converting the tar.
func TestConvertDirMatchesTar(t *testing.T) {
	testenv.RequireRoot(t)
	ents := determinismEntries()
	tarball := makeTar(t, ents)

	upper := t.TempDir()
	if _, err := archive.Apply(t.Context(), upper, bytes.NewReader(tarball), archive.WithConvertWhiteout(archive.OverlayConvertWhiteout)); err != nil {
		t.Fatalf("containerd archive.Apply: %v", err)
	}
	// The extraction really is in overlay form.
	var st unix.Stat_t
	if err := unix.Lstat(filepath.Join(upper, "etc/passwd-"), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR || st.Rdev != 0 {
		t.Fatalf("whiteout not extracted as a 0/0 device: %v %+v", err, st)
	}
	if ok, err := isOpaqueDir(filepath.Join(upper, "etc/opaque")); err != nil || !ok {
		t.Fatalf("opaque directory not marked: %v", err)
	}

	fromTar := &memOut{}
	if _, err := converter.ConvertLayer(t.Context(), bytes.NewReader(tarball), fromTar, converter.LayerOptions{}); err != nil {
		t.Fatal(err)
	}
	fromDir := &memOut{}
	if _, err := converter.ConvertDir(t.Context(), upper, fromDir, converter.DirOptions{}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(fromTar.b, fromDir.b) {
		t.Errorf("images differ (%d bytes from the tar, %d from the directory)", len(fromTar.b), len(fromDir.b))
		for _, d := range diffTrees(treeOf(t, openImage(t, fromTar.b)), treeOf(t, openImage(t, fromDir.b))) {
			t.Error(d)
		}
	}
	tree := treeOf(t, openImage(t, fromDir.b))
	for _, p := range []string{"/.wh..wh..opq", "/etc/.wh.passwd-", "/etc/opaque/.wh..wh..opq", "/dev/.wh.gone", "/dev/null", "/bin/zz-su3"} {
		if _, ok := tree[p]; !ok {
			t.Errorf("%s missing", p)
		}
	}
	if strings.Contains(tree["/etc/opaque"], "overlay") {
		t.Errorf("overlay xattr copied: %s", tree["/etc/opaque"])
	}
}

// TestConvertLayerShuffledTar: a tar listing the same tree in another order
// gives the same tree (only the placement of file data follows the order,
// so the bytes may differ).
func TestConvertLayerShuffledTar(t *testing.T) {
	ents := determinismEntries()
	want := treeOf(t, layerFromTar(t, makeTar(t, ents)))
	r := rand.New(rand.NewSource(1))
	for range 5 {
		shuffled := slices.Clone(ents)
		r.Shuffle(len(shuffled), func(i, j int) { shuffled[i], shuffled[j] = shuffled[j], shuffled[i] })
		// Directories before their contents (their attributes would
		// otherwise be the implicit parents'), link targets first.
		slices.SortStableFunc(shuffled, func(a, b tarEnt) int {
			ra, rb := rank(a), rank(b)
			return ra - rb
		})
		got := treeOf(t, layerFromTar(t, makeTar(t, shuffled)))
		for _, d := range diffTrees(want, got) {
			t.Error(d)
		}
	}
}

func rank(e tarEnt) int {
	switch e.typ {
	case tar.TypeDir:
		return strings.Count(strings.TrimSuffix(e.name, "/"), "/")
	case tar.TypeLink:
		return 101
	}
	return 100
}

func TestConvertDirErrors(t *testing.T) {
	if _, err := converter.ConvertDir(t.Context(), "/nonexistent/dir", &memOut{}, converter.DirOptions{}); err == nil || !strings.Contains(err.Error(), "/nonexistent/dir") {
		t.Errorf("missing dir: %v", err)
	}
	d := t.TempDir()
	os.WriteFile(filepath.Join(d, "f"), make([]byte, 1<<20), 0o644)
	_, err := converter.ConvertDir(t.Context(), d, &memOut{}, converter.DirOptions{MaxSize: 64 << 10})
	if err == nil || !strings.Contains(err.Error(), `"f"`) {
		t.Errorf("oversized dir: %v", err)
	}
}
