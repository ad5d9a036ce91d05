package testenv

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
)

func TestParseAptSources(t *testing.T) {
	tests := []struct {
		name, data, uri, suite string
		deb822                 bool
	}{
		{name: "deb822 with security stanza", deb822: true, data: `Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
`, uri: "http://deb.debian.org/debian", suite: "bookworm"},
		{name: "deb822 security first, src only, disabled", deb822: true, data: `Types: deb
URIs: http://deb.debian.org/debian-security
Suites: trixie-security

Types: deb-src
URIs: http://mirror.example/debian
Suites: trixie

Types: deb
Enabled: no
URIs: http://disabled.example/debian
Suites: trixie

Types: deb deb-src
URIs: http://mirror.example/debian
Suites: trixie trixie-updates
`, uri: "http://mirror.example/debian", suite: "trixie"},
		{name: "deb822 third party only", deb822: true, data: "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"},
		{name: "one-line with options", data: "# comment\ndeb-src http://x/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian bookworm main contrib\n",
			uri: "http://ftp.de.debian.org/debian", suite: "bookworm"},
		{name: "one-line security only", data: "deb http://security.debian.org/debian-security bookworm-security main\n"},
		{name: "empty"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var uri, suite string
			if tc.deb822 {
				uri, suite = parseDeb822(tc.data)
			} else {
				uri, suite = parseOneLine(tc.data)
			}
			if uri != tc.uri || suite != tc.suite {
				t.Fatalf("got %q %q, want %q %q", uri, suite, tc.uri, tc.suite)
			}
		})
	}
}

func FuzzParseAptSources(f *testing.F) {
	f.Add("Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\n")
	f.Add("deb [arch=amd64 http://x/debian bookworm main")
	f.Add("deb [")
	f.Fuzz(func(t *testing.T, data string) {
		for _, parse := range []func(string) (string, string){parseDeb822, parseOneLine} {
			uri, suite := parse(data)
			if (uri == "") != (suite == "") {
				t.Fatalf("half a result: %q %q", uri, suite)
			}
			if uri != "" && !usableMirror(uri, suite) {
				t.Fatalf("returned an unusable mirror %q %q", uri, suite)
			}
		}
	})
}

// TestUnmountUnder mounts stacked and nested tmpfs instances and checks
// that unmountUnder removes all of them, deepest first, and nothing else.
func TestUnmountUnder(t *testing.T) {
	RequireRoot(t)
	base := t.TempDir()
	dir := filepath.Join(base, "with space")
	outside := filepath.Join(base, "with spaceX") // shares a prefix, not under dir
	for _, d := range []string{dir, outside} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mountTmpfs := func(p string) {
		t.Helper()
		if err := os.MkdirAll(p, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("tmpfs", p, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatal(err)
		}
	}
	mountTmpfs(dir)
	mountTmpfs(dir) // stacked
	mountTmpfs(filepath.Join(dir, "nested"))
	mountTmpfs(outside)
	t.Cleanup(func() { _ = unix.Unmount(outside, unix.MNT_DETACH) })

	points, err := MountsUnder(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(points) != 3 || points[0] != filepath.Join(dir, "nested") {
		t.Fatalf("MountsUnder = %q, want nested first then dir twice", points)
	}
	if err := unmountUnder(dir); err != nil {
		t.Fatal(err)
	}
	if points, _ := MountsUnder(dir); len(points) != 0 {
		t.Fatalf("left mounted: %q", points)
	}
	if points, _ := MountsUnder(outside); len(points) != 1 {
		t.Fatalf("unmountUnder touched a sibling: %q", points)
	}
}

func TestModuleRootAndBin(t *testing.T) {
	root := ModuleRoot()
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatal(err)
	}
	if p := Bin(t, "sh"); !filepath.IsAbs(p) {
		t.Fatalf("Bin(sh) = %q, not absolute", p)
	}
	if _, err := lookBin("no-such-binary-testenv"); err == nil {
		t.Fatal("lookBin found a binary that does not exist")
	}
}

// TestDeleteTaskToleratesAGoneTask: the harness's cleanup deletes a task
// that someone else (the CRI plugin) deleted after the harness listed it.
// It once failed the test with "cannot delete a deleted process: not
// found".
func TestDeleteTaskToleratesAGoneTask(t *testing.T) {
	ctrd, ctx, c, stale := runningTask(t, "gone")
	// Someone else deletes it first.
	ctrd.CtrOK(t, "task", "kill", "-s", "SIGKILL", "gone")
	ctrd.CtrOK(t, "task", "rm", "-f", "gone")
	if err := deleteTask(ctx, c, stale); err != nil {
		t.Fatalf("deleting a task deleted meanwhile: %v", err)
	}
}

// TestDeleteTaskToleratesADeadShim: a task whose shim went away (as when
// the CRI plugin deletes it while we do: "ttrpc: closed") is deleted, or
// found gone, without an error.
func TestDeleteTaskToleratesADeadShim(t *testing.T) {
	ctrd, ctx, c, task := runningTask(t, "deadshim")
	// Shims are started with -address <containerd's socket>.
	if n := killProcessesMentioning(ctrd.Address()); n == 0 {
		t.Fatal("no shim found to kill")
	}
	if err := deleteTask(ctx, c, task); err != nil {
		t.Fatalf("deleting a task whose shim died: %v", err)
	}
	if _, err := c.Task(ctx, nil); !errdefs.IsNotFound(err) {
		t.Fatalf("the task is still there after deleteTask: %v", err)
	}
}

// runningTask starts containerd and a busybox container id sleeping, and
// returns them with a context in containerd's namespace.
func runningTask(t *testing.T, id string) (*Containerd, context.Context, client.Container, client.Task) {
	t.Helper()
	RequireRoot(t)
	ctrd := StartContainerd(t, ContainerdOptions{})
	ref := "docker.io/library/bb:" + id
	archive, _ := WriteImageArchive(t, BusyboxImage(t), ref)
	ctrd.CtrOK(t, "image", "import", archive)
	ctrd.CtrOK(t, "run", "-d", ref, id, "sleep", "600")
	ctx := ctrd.Context(context.Background())
	c, err := ctrd.Client(t).LoadContainer(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	task, err := c.Task(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	return ctrd, ctx, c, task
}
