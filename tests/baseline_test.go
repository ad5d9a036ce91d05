package tests

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// These baseline tests prove the harness with containerd's stock overlayfs
// snapshotter. They are the reference side of the daxfs equivalence tests:
// whatever they observe through overlayfs, the daxfs snapshotter must show
// identically.

const greeting = "hello from a hermetic image\n"

// greetingImage is busybox plus a layer with /etc/greeting.
func greetingImage(tb testing.TB, c testimage.Compression) testimage.Image {
	img := testenv.BusyboxImage(tb, testimage.Layer{Compression: c, Entries: []testimage.Entry{
		testimage.File("etc/greeting", []byte(greeting), 0o644),
	}})
	for i := range img.Layers {
		img.Layers[i].Compression = c
	}
	return img
}

// busyboxSum is the sha256 of the host's busybox, which the image carries.
func busyboxSum(tb testing.TB) string {
	data, err := os.ReadFile(testimage.BusyboxPath)
	if err != nil {
		tb.Fatal(err)
	}
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// runGreeting runs a container of ref that prints /etc/greeting and the
// digest of /bin/busybox, and checks both.
func runGreeting(t *testing.T, ctrd *testenv.Containerd, ref, id string) {
	t.Helper()
	out := ctrd.CtrOK(t, "run", "--rm", ref, id, "sh", "-c", "cat /etc/greeting; sha256sum /bin/busybox")
	want := greeting + busyboxSum(t) + "  /bin/busybox\n"
	if out != want {
		t.Fatalf("container output:\n%q\nwant:\n%q", out, want)
	}
}

// TestBaselineImportRun imports a busybox OCI archive with ctr and runs a
// container of it on overlayfs, for every layer compression.
func TestBaselineImportRun(t *testing.T) {
	testenv.RequireRoot(t)
	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	for _, c := range []testimage.Compression{testimage.Gzip, testimage.Zstd, testimage.Uncompressed} {
		t.Run(c.String(), func(t *testing.T) {
			ref := "docker.io/library/greeting-" + c.String() + ":latest"
			archive, built := testenv.WriteImageArchive(t, greetingImage(t, c), ref)
			out := ctrd.CtrOK(t, "image", "import", archive)
			t.Logf("import: %s", strings.TrimSpace(out))
			// The image is listed under the archive's name and manifest digest.
			list := ctrd.CtrOK(t, "image", "ls")
			if !strings.Contains(list, ref) || !strings.Contains(list, built.Manifest.Descriptor.Digest.String()) {
				t.Fatalf("image ls does not show %s at %s:\n%s", ref, built.Manifest.Descriptor.Digest, list)
			}
			runGreeting(t, ctrd, ref, "run-"+c.String())
			// ctr run --rm removed the container: nothing left running.
			if ls := ctrd.CtrOK(t, "containers", "ls", "-q"); strings.TrimSpace(ls) != "" {
				t.Fatalf("containers left after run --rm: %q", ls)
			}
		})
	}
}

// TestBaselineRegistryPushPull pushes an imported image to a local
// distribution registry and pulls it into a second, empty containerd,
// then runs it there.
func TestBaselineRegistryPushPull(t *testing.T) {
	testenv.RequireRoot(t)
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	dst := testenv.StartContainerd(t, testenv.ContainerdOptions{})

	local := "docker.io/library/greeting:push"
	remote := reg + "/testenv/greeting:v1"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), local)
	src.CtrOK(t, "image", "import", archive)
	src.CtrOK(t, "image", "tag", local, remote)
	src.CtrOK(t, "image", "push", "--plain-http", remote)

	dst.CtrOK(t, "image", "pull", "--plain-http", remote)
	// The second daemon holds exactly the blobs we built.
	content := dst.CtrOK(t, "content", "ls", "-q")
	for _, b := range built.Blobs() {
		if !strings.Contains(content, b.Descriptor.Digest.String()) {
			t.Errorf("pulled content lacks %s %s:\n%s", b.Descriptor.MediaType, b.Descriptor.Digest, content)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	runGreeting(t, dst, remote, "pulled")
}

// layeredImage is a three-layer image exercising the OCI layer features:
// whiteouts of a file and of a directory, an opaque directory, hard links,
// symlinks, a FIFO, a device node, xattrs in two namespaces, nanosecond
// mtimes, a long UTF-8 name and ownership.
func layeredImage(tb testing.TB) testimage.Image {
	long := strings.Repeat("ü", 100) + ".txt" // 204 bytes of UTF-8
	base, upper := testimage.WhiteoutLayers()
	upper.Entries = append(upper.Entries,
		testimage.CharDevice("links/null", 0o666, 1, 3),
		testimage.File("links/xattrs", []byte("x\n"), 0o644).
			WithXattr("user.note", "hello").
			WithXattr("trusted.daxfs-test", "t\x00bin"),
		testimage.File("links/"+long, []byte("long name\n"), 0o644),
	)
	return testenv.BusyboxImage(tb, base, upper)
}

// TestBaselineWhiteouts imports the layered image with the overlayfs
// snapshotter, mounts a read-only view of its top snapshot and checks with
// testenv.Snapshot that the merged tree follows the OCI whiteout rules and
// keeps every file attribute.
func TestBaselineWhiteouts(t *testing.T) {
	testenv.RequireRoot(t)
	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/layered:latest"
	archive, built := testenv.WriteImageArchive(t, layeredImage(t), ref)
	ctrd.CtrOK(t, "image", "import", archive)

	tree := viewTree(t, ctrd, "overlayfs", built)

	for _, p := range []string{"/data/gone", "/opaque/old1", "/opaque/sub", "/opaque/sub/old2", "/deleted-dir", "/deleted-dir/f"} {
		if fi, ok := tree[p]; ok {
			t.Errorf("%s should be deleted by a whiteout or opaque marker, found %s", p, fi)
		}
	}
	for p := range tree {
		if strings.Contains(p, ".wh.") {
			t.Errorf("whiteout entry %s is visible in the merged tree", p)
		}
	}
	want := map[string]testenv.FileInfo{
		"/data/keep":     file(0o644, "keep\n"),
		"/data/replaced": file(0o644, "new\n"),
		"/data/added":    file(0o644, "added\n"),
		"/opaque/new":    file(0o644, "new in opaque\n"),
	}
	for p, w := range want {
		got, ok := tree[p]
		if !ok {
			t.Errorf("%s missing", p)
			continue
		}
		if got.Type != w.Type || got.Mode != w.Mode || got.SHA256 != w.SHA256 || got.Size != w.Size {
			t.Errorf("%s = %s, want %s", p, got, w)
		}
	}
	if got := children(tree, "/opaque"); strings.Join(got, ",") != "new" {
		t.Errorf("opaque dir lists %v, want only [new]", got)
	}
	if fi := tree["/opaque"]; fi.Mode != 0o750 {
		t.Errorf("/opaque mode %04o, want 0750 from the upper layer", fi.Mode)
	}
	if got := tree["/data/added"].Mtime; got != time.Date(2023, 5, 6, 7, 8, 9, 123456789, time.UTC).UnixNano() {
		t.Errorf("/data/added mtime %d lost its nanoseconds", got)
	}

	target, hard := tree["/links/target"], tree["/links/hard"]
	if target.Nlink != 2 || hard.Nlink != 2 || target.SHA256 != hard.SHA256 || hard.UID != 1000 || hard.GID != 1001 || hard.Mode != 0o640 {
		t.Errorf("hard link: target %s nlink %d, hard %s nlink %d", target, target.Nlink, hard, hard.Nlink)
	}
	if fi := tree["/links/soft"]; fi.Type != "symlink" || fi.Link != "target" {
		t.Errorf("/links/soft = %s", fi)
	}
	if fi := tree["/links/dangling"]; fi.Type != "symlink" || fi.Link != "/nonexistent/path" {
		t.Errorf("/links/dangling = %s", fi)
	}
	if fi := tree["/links/fifo"]; fi.Type != "fifo" || fi.Mode != 0o600 {
		t.Errorf("/links/fifo = %s", fi)
	}
	if fi := tree["/links/null"]; fi.Type != "char" || fi.Rdev != unix.Mkdev(1, 3) {
		t.Errorf("/links/null = %s", fi)
	}
	if fi := tree["/links/setuid"]; fi.Mode != 0o4755 {
		t.Errorf("/links/setuid mode %04o, want 4755", fi.Mode)
	}
	// containerd's applier keeps user.* xattrs and drops trusted.* ones
	// from archives ("admin attributes from archive not supported"): the
	// daxfs snapshotter must show the same.
	xa := tree["/links/xattrs"].Xattrs
	if len(xa) != 1 || xa["user.note"] != "hello" {
		t.Errorf("/links/xattrs xattrs = %q, want only user.note=hello", xa)
	}
	long := "/links/" + strings.Repeat("ü", 100) + ".txt"
	if fi, ok := tree[long]; !ok || fi.SHA256 != sha("long name\n") {
		t.Errorf("long UTF-8 name: %v %s", ok, fi)
	}

	// The same image unpacked again gives the same tree: Snapshot and Diff
	// see no difference between two unpacks, so equivalence tests can rely
	// on them. Directory mtimes are the exception: the root and directories
	// a layer changes without listing them get the time of the unpack.
	again := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	again.CtrOK(t, "image", "import", archive)
	if d := testenv.Diff(tree, viewTree(t, again, "overlayfs", built), testenv.FieldDirMtime); len(d) > 0 {
		t.Errorf("two unpacks of one image differ:\n%s", strings.Join(d, "\n"))
	}
}

// viewTree mounts a read-only view of the image's top layer snapshot from
// snapshotter and returns testenv.Snapshot of it.
func viewTree(t *testing.T, ctrd *testenv.Containerd, snapshotter string, built *testimage.Built) map[string]testenv.FileInfo {
	t.Helper()
	chain := built.ChainIDs()
	dir := ctrd.MountView(t, snapshotter, chain[len(chain)-1].String())
	tree, err := testenv.Snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	return tree
}

func sha(s string) string {
	sum := sha256.Sum256([]byte(s))
	return hex.EncodeToString(sum[:])
}

func file(mode uint32, content string) testenv.FileInfo {
	return testenv.FileInfo{Type: "file", Mode: mode, Size: int64(len(content)), SHA256: sha(content)}
}

// children lists the names directly under dir in a snapshot.
func children(tree map[string]testenv.FileInfo, dir string) []string {
	var out []string
	for p := range tree {
		if rest, ok := strings.CutPrefix(p, dir+"/"); ok && !strings.Contains(rest, "/") {
			out = append(out, rest)
		}
	}
	slices.Sort(out)
	return out
}
