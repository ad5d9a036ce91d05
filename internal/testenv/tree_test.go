package testenv_test

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// makeTree creates a tree with one of every kind of path Snapshot records.
func makeTree(t *testing.T) string {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(root, "d/sub"), 0o755))
	must(os.WriteFile(filepath.Join(root, "d/file"), []byte("content\n"), 0o644))
	must(unix.Chmod(filepath.Join(root, "d/file"), 0o4751))
	must(os.Link(filepath.Join(root, "d/file"), filepath.Join(root, "d/hard")))
	must(os.Symlink("../d/file", filepath.Join(root, "d/sub/link")))
	must(unix.Mkfifo(filepath.Join(root, "fifo"), 0o600))
	must(unix.Mknod(filepath.Join(root, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(os.Lchown(filepath.Join(root, "d/sub/link"), 12, 34))
	must(unix.Lsetxattr(filepath.Join(root, "d/file"), "user.note", []byte("v1"), 0))
	must(unix.Lsetxattr(filepath.Join(root, "d/file"), "trusted.secret", []byte("t\x00"), 0))
	mt := time.Date(2020, 1, 2, 3, 4, 5, 987654321, time.UTC)
	must(os.Chtimes(filepath.Join(root, "fifo"), mt, mt))
	return root
}

func TestSnapshotRecordsEveryField(t *testing.T) {
	testenv.RequireRoot(t) // mknod, chown and trusted.* xattrs
	root := makeTree(t)
	tree, err := testenv.Snapshot(root)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for p := range tree {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	want := []string{"/", "/d", "/d/file", "/d/hard", "/d/sub", "/d/sub/link", "/fifo", "/null"}
	if !slices.Equal(paths, want) {
		t.Fatalf("paths %v, want %v", paths, want)
	}
	f := tree["/d/file"]
	sum := sha256.Sum256([]byte("content\n"))
	if f.Type != "file" || f.Mode != 0o4751 || f.Size != 8 || f.Nlink != 2 || f.SHA256 != hex.EncodeToString(sum[:]) {
		t.Errorf("/d/file = %+v", f)
	}
	if f.Xattrs["user.note"] != "v1" || f.Xattrs["trusted.secret"] != "t\x00" {
		t.Errorf("/d/file xattrs = %q, want user.note and trusted.secret", f.Xattrs)
	}
	if h := tree["/d/hard"]; h.SHA256 != f.SHA256 || h.Nlink != 2 {
		t.Errorf("/d/hard = %+v", h)
	}
	if l := tree["/d/sub/link"]; l.Type != "symlink" || l.Link != "../d/file" || l.Size != int64(len("../d/file")) || l.UID != 12 || l.GID != 34 {
		t.Errorf("/d/sub/link = %+v", l)
	}
	if p := tree["/fifo"]; p.Type != "fifo" || p.Mode != 0o600 || p.Mtime != time.Date(2020, 1, 2, 3, 4, 5, 987654321, time.UTC).UnixNano() {
		t.Errorf("/fifo = %+v", p)
	}
	if n := tree["/null"]; n.Type != "char" || n.Rdev != unix.Mkdev(1, 3) {
		t.Errorf("/null = %+v", n)
	}
	if d := tree["/d"]; d.Type != "dir" || d.Size != 0 || d.Nlink != 3 {
		t.Errorf("/d = %+v", d)
	}
}

func TestDiffReportsEachChange(t *testing.T) {
	testenv.RequireRoot(t)
	root := makeTree(t)
	before, err := testenv.Snapshot(root)
	if err != nil {
		t.Fatal(err)
	}
	if d := testenv.Diff(before, before); len(d) != 0 {
		t.Fatalf("Diff of a snapshot with itself: %v", d)
	}
	// Change one field of several paths, add and remove one path.
	if err := os.Chmod(filepath.Join(root, "d/file"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "d/new"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(root, "fifo")); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lsetxattr(filepath.Join(root, "d/file"), "user.note", []byte("v2"), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(root, "d/sub/link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("elsewhere", filepath.Join(root, "d/sub/link")); err != nil {
		t.Fatal(err)
	}
	after, err := testenv.Snapshot(root)
	if err != nil {
		t.Fatal(err)
	}
	diff := testenv.Diff(before, after, testenv.FieldMtime)
	joined := strings.Join(diff, "\n")
	for _, want := range []string{
		"/d/file: mode 4751 != 0640",
		"/d/hard: mode 4751 != 0640", // same inode
		`/d/file: xattr user.note "v1" != "v2"`,
		`/d/sub/link: link "../d/file" != "elsewhere"`,
		"/fifo: only in a (fifo 0600 0:0)",
		"/d/new: only in b (file 0644 0:0",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("Diff lacks %q:\n%s", want, joined)
		}
	}
	// Ignored fields are not reported; others still are.
	for _, line := range testenv.Diff(before, after, testenv.FieldMode, testenv.FieldXattrs, testenv.FieldMtime) {
		if strings.Contains(line, "mode") || strings.Contains(line, "xattr") || strings.Contains(line, "mtime") {
			t.Errorf("ignored field reported: %s", line)
		}
	}
	if d := testenv.Diff(before, after, testenv.FieldMode, testenv.FieldXattrs, testenv.FieldMtime); len(d) == 0 {
		t.Error("Diff ignoring some fields reported nothing")
	}
	// Directory mtimes change when entries are added; FieldDirMtime hides
	// exactly those.
	for _, line := range testenv.Diff(before, after, testenv.FieldDirMtime) {
		if strings.HasPrefix(line, "/d: mtime") || strings.HasPrefix(line, "/: mtime") {
			t.Errorf("FieldDirMtime did not hide %s", line)
		}
	}
}

func TestSnapshotErrorNamesPath(t *testing.T) {
	_, err := testenv.Snapshot(filepath.Join(t.TempDir(), "missing"))
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Fatalf("Snapshot of a missing root: %v", err)
	}
}

// TestSnapshotOneFS: paths on other file systems are left out, and a name
// overlayfs lists but hides (a lower's 0:0 character device, which it
// takes for a whiteout, in a directory it does not merge) is recorded as
// vanished.
func TestSnapshotOneFS(t *testing.T) {
	testenv.RequireRoot(t)
	root := t.TempDir()
	l1, l2, merged := filepath.Join(root, "l1"), filepath.Join(root, "l2"), filepath.Join(root, "merged")
	for _, d := range []string{filepath.Join(l1, "d"), l2, merged} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(l1, "d", "f"), []byte("f\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mknod(filepath.Join(l1, "d", "w"), unix.S_IFCHR|0o600, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(l2, "mnt"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_RDONLY, "lowerdir="+l1+":"+l2); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(merged, unix.MNT_DETACH)
	if err := unix.Mount("tmpfs", filepath.Join(merged, "mnt"), "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	defer unix.Unmount(filepath.Join(merged, "mnt"), unix.MNT_DETACH)
	if err := os.WriteFile(filepath.Join(merged, "mnt", "other"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	tree, err := testenv.SnapshotOneFS(merged)
	if err != nil {
		t.Fatal(err)
	}
	var paths []string
	for p, fi := range tree {
		paths = append(paths, p+":"+fi.Type)
	}
	slices.Sort(paths)
	if want := []string{"/:dir", "/d/f:file", "/d/w:vanished", "/d:dir"}; !slices.Equal(paths, want) {
		t.Fatalf("SnapshotOneFS recorded %v, want %v", paths, want)
	}
	if _, err := testenv.Snapshot(merged); err == nil {
		t.Fatal("Snapshot walked a directory listing a name lstat cannot find without an error")
	}
}
