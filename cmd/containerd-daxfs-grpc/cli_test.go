package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"testing"
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
