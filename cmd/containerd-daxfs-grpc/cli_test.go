package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/mounter"
)

// fixtures is the project's shared material beside the repository.
var fixtures = filepath.Join("..", "..", "..", "shared", "fixtures", "upstream-v5")

// buildCLI builds this command into a temporary directory.
func buildCLI(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "containerd-daxfs-grpc")
	out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

func run(t *testing.T, bin string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", filepath.Base(bin), args, err, stderr.String())
	}
	return out
}

// withoutExtension drops the keys the extension block adds (mtime, xattrs,
// rdev) from an inspect --json tree, leaving expected.json's schema.
func withoutExtension(t *testing.T, b []byte) []map[string]any {
	t.Helper()
	var tree []map[string]any
	if err := json.Unmarshal(b, &tree); err != nil {
		t.Fatalf("inspect --json output: %v", err)
	}
	for _, e := range tree {
		delete(e, "mtime")
		delete(e, "xattrs")
		delete(e, "rdev")
	}
	return tree
}

// TestInspectUpstreamFixture: inspect --json of the upstream tool's image
// is expected.json, byte for byte.
func TestInspectUpstreamFixture(t *testing.T) {
	bin := buildCLI(t)
	want, err := os.ReadFile(filepath.Join(fixtures, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	got := run(t, bin, "inspect", "--json", filepath.Join(fixtures, "static.daxfs"))
	if !bytes.Equal(bytes.TrimRight(got, "\n"), bytes.TrimRight(want, "\n")) {
		t.Fatalf("inspect --json static.daxfs differs from expected.json:\n%s", got)
	}
	// The human listing validates too, and names every path.
	human := run(t, bin, "inspect", filepath.Join(fixtures, "static.daxfs"))
	for _, p := range []string{"/big/onemeg", "/usr/bin/hl1", "/usr/bin/abs-link"} {
		if !bytes.Contains(human, []byte(p)) {
			t.Errorf("inspect listing lacks %s", p)
		}
	}
}

// TestMkfsMatchesFixture: mkfs of tree.tar, and of the directory it
// unpacks to, give images whose tree is expected.json.
func TestMkfsMatchesFixture(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("unpacking tree.tar with its owners needs root")
	}
	bin := buildCLI(t)
	wantJSON, err := os.ReadFile(filepath.Join(fixtures, "expected.json"))
	if err != nil {
		t.Fatal(err)
	}
	want := withoutExtension(t, wantJSON)
	dir := t.TempDir()

	fromTar := filepath.Join(dir, "tar.daxfs")
	run(t, bin, "mkfs", filepath.Join(fixtures, "tree.tar"), fromTar)
	if got := withoutExtension(t, run(t, bin, "inspect", "--json", fromTar)); !reflect.DeepEqual(got, want) {
		t.Fatalf("mkfs tree.tar: tree differs from expected.json:\n%v", got)
	}

	tree := filepath.Join(dir, "tree")
	if err := os.Mkdir(tree, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("tar", "-xpf", filepath.Join(fixtures, "tree.tar"), "--same-owner", "-C", tree).CombinedOutput(); err != nil {
		t.Fatalf("tar -x: %v\n%s", err, out)
	}
	fromDir := filepath.Join(dir, "dir.daxfs")
	run(t, bin, "mkfs", tree, fromDir)
	if got := withoutExtension(t, run(t, bin, "inspect", "--json", fromDir)); !reflect.DeepEqual(got, want) {
		t.Fatalf("mkfs DIR: tree differs from expected.json:\n%v", got)
	}
}

// TestMountUmount: `mount IMAGE DIR` puts an image on a directory with
// each mounter that works here, and `umount DIR` takes it off (a second
// umount says it is not mounted).
func TestMountUmount(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("mounting needs root")
	}
	bin := buildCLI(t)
	dir := t.TempDir()
	tree := filepath.Join(dir, "tree")
	if err := os.MkdirAll(filepath.Join(tree, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tree, "etc", "greeting"), []byte("hello from the image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "image.daxfs")
	run(t, bin, "mkfs", tree, img)
	state := filepath.Join(dir, "state")
	t.Cleanup(func() { _ = mounter.StopFUSE(context.Background(), state) })
	for _, tc := range []struct{ mode, fstype string }{{"auto", "erofs"}, {"erofs", "erofs"}, {"fuse", "fuse.daxfs"}} {
		t.Run(tc.mode, func(t *testing.T) {
			mnt := filepath.Join(dir, "mnt-"+tc.mode)
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			run(t, bin, "mount", "--mode", tc.mode, "--state", state, img, mnt)
			t.Cleanup(func() { _ = unix.Unmount(mnt, unix.MNT_DETACH) })
			if b, err := os.ReadFile(filepath.Join(mnt, "etc", "greeting")); err != nil || string(b) != "hello from the image\n" {
				t.Fatalf("read through the mount: %q %v", b, err)
			}
			ms, err := mountinfo.GetMounts(nil)
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, m := range ms {
				if m.Mountpoint == mnt {
					found = m.FSType == tc.fstype
				}
			}
			if !found {
				t.Fatalf("%s is not a %s mount", mnt, tc.fstype)
			}
			run(t, bin, "umount", "--state", state, mnt)
			if _, err := os.Stat(filepath.Join(mnt, "etc")); !os.IsNotExist(err) {
				t.Fatalf("after umount %s/etc: %v, want it gone", mnt, err)
			}
			out, err := exec.Command(bin, "umount", "--state", state, mnt).CombinedOutput()
			if err == nil || !bytes.Contains(out, []byte("not mounted")) {
				t.Fatalf("second umount: %v %s, want a not-mounted error", err, out)
			}
			// The last umount stopped the FUSE serving process (and its
			// holder): nothing answers on its socket, nobody holds its
			// locks.
			if conn, err := net.Dial("unix", filepath.Join(state, "serve.sock")); err == nil {
				conn.Close()
				t.Fatal("the FUSE serving process still runs after the last umount")
			}
			for _, lock := range []string{"serve.lock", "holder.lock"} {
				if held(t, filepath.Join(state, lock)) {
					t.Fatalf("%s still held after the last umount", lock)
				}
			}
		})
	}
}

// held reports whether a process holds the flock on path (waiting a
// little for one that is exiting).
func held(t *testing.T, path string) bool {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if os.IsNotExist(err) {
		return false
	}
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for deadline := time.Now().Add(5 * time.Second); ; {
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err == nil {
			unix.Flock(int(f.Fd()), unix.LOCK_UN)
			return false
		}
		if time.Now().After(deadline) {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestConvertErrors: convert says what is wrong with its arguments (exit
// 2) and names the containerd it cannot reach or the image it cannot
// find (exit 1).
func TestConvertErrors(t *testing.T) {
	bin := buildCLI(t)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"convert", "only-src"}, 2, "want SRC and DST"},
		{[]string{"convert", "--platform", "linux/amd64", "--all-platforms", "a", "b"}, 2, "--platform and --all-platforms"},
		{[]string{"convert", "--platform", "no/such/platform/at/all", "a", "b"}, 2, "--platform"},
		{[]string{"convert", "--address", filepath.Join(t.TempDir(), "none.sock"), "docker.io/library/src:1", "docker.io/library/dst:1"}, 1, "docker.io/library/src:1"},
	} {
		cmd := exec.Command(bin, tc.args...)
		out, err := cmd.CombinedOutput()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		if code != tc.code || !bytes.Contains(out, []byte(tc.want)) {
			t.Errorf("%v: exit %d, output %q; want exit %d mentioning %q", tc.args, code, out, tc.code, tc.want)
		}
	}
}
