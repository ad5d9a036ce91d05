package daxfs

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// fixtureDir holds the upstream tool's image of tree.tar and its tree: the
// project's shared material lies beside the repository (../shared), in a
// developer's tree and in CI's clone alike; tests run in the package
// directory.
var fixtureDir = filepath.Join("..", "..", "shared", "fixtures", "upstream-v5")

func readFixture(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fixtureDir, name))
	if err != nil {
		t.Fatalf("fixture: %v", err)
	}
	return b
}

func TestFixtureTreeMatchesExpected(t *testing.T) {
	img := readFixture(t, "static.daxfs")
	want := bytes.TrimRight(readFixture(t, "expected.json"), "\n")
	if err := Validate(img); err != nil {
		t.Fatalf("Validate(upstream image): %v", err)
	}
	im, err := Open(img)
	if err != nil {
		t.Fatal(err)
	}
	tree, err := im.Tree()
	if err != nil {
		t.Fatal(err)
	}
	got, err := TreeJSON(tree)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("tree JSON differs from expected.json:\n%s", firstDiff(got, want))
	}
}

func firstDiff(a, b []byte) string {
	la, lb := bytes.Split(a, []byte("\n")), bytes.Split(b, []byte("\n"))
	for i := 0; i < len(la) && i < len(lb); i++ {
		if !bytes.Equal(la[i], lb[i]) {
			lo, hi := max(0, i-8), min(i+3, len(la), len(lb))
			return "line " + strconv.Itoa(i+1) + ":\n got:\n" + string(bytes.Join(la[lo:hi], []byte("\n"))) + "\n want:\n" + string(bytes.Join(lb[lo:hi], []byte("\n")))
		}
	}
	return "lengths differ: " + strconv.Itoa(len(la)) + " vs " + strconv.Itoa(len(lb)) + " lines"
}
