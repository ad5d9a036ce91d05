package converter

import (
	"archive/tar"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

func withMode(e tarEnt, mode int64, uid int) tarEnt { e.mode, e.uid = mode, uid; return e }
func withX(e tarEnt, k, v string) tarEnt {
	e.xattr = map[string]string{k: v}
	return e
}

// TestViewWhiteoutSemantics merges layer chains and compares the view's tree
// with the tree of one layer holding the expected merged content.
func TestViewWhiteoutSemantics(t *testing.T) {
	whiteout := func(name string) tarEnt { return tarEnt{name: name, typ: tar.TypeReg} }
	tests := []struct {
		name   string
		layers [][]tarEnt
		want   []tarEnt
	}{
		{
			name: "single file whiteout",
			layers: [][]tarEnt{
				{file("a", "A"), file("b", "B")},
				{whiteout(".wh.a")},
			},
			want: []tarEnt{file("b", "B")},
		},
		{
			name: "whole directory whiteout",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X"), dir("d/y"), file("d/y/z", "Z"), file("keep", "K")},
				{whiteout(".wh.d")},
			},
			want: []tarEnt{file("keep", "K")},
		},
		{
			name: "nested whiteout keeps siblings",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X"), file("d/y", "Y")},
				{dir("d"), whiteout("d/.wh.x")},
			},
			want: []tarEnt{dir("d"), file("d/y", "Y")},
		},
		{
			name: "opaque directory hides lower children only",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X"), dir("d/sub"), file("d/sub/s", "S")},
				{dir("d"), whiteout("d/.wh..wh..opq"), file("d/n", "N")},
			},
			want: []tarEnt{dir("d"), file("d/n", "N")},
		},
		{
			name: "opaque root",
			layers: [][]tarEnt{
				{file("a", "A"), dir("d")},
				{whiteout(".wh..wh..opq"), file("b", "B")},
			},
			want: []tarEnt{file("b", "B")},
		},
		{
			name: "file replaces directory",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X")},
				{file("d", "now a file")},
			},
			want: []tarEnt{file("d", "now a file")},
		},
		{
			name: "directory replaces file and back",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X")},
				{whiteout(".wh.d"), file("d", "file")},
				{dir("d"), file("d/y", "Y")},
			},
			want: []tarEnt{dir("d"), file("d/y", "Y")},
		},
		{
			name: "directory deleted then recreated in a later layer",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X")},
				{whiteout(".wh.d")},
				{dir("d"), file("d/z", "Z")},
			},
			want: []tarEnt{dir("d"), file("d/z", "Z")},
		},
		{
			name: "directory deleted and recreated in the same layer",
			layers: [][]tarEnt{
				{dir("d"), file("d/x", "X")},
				{whiteout(".wh.d"), dir("d"), file("d/new", "N")},
			},
			want: []tarEnt{dir("d"), file("d/new", "N")},
		},
		{
			name: "whiteout of a missing path is harmless",
			layers: [][]tarEnt{
				{file("a", "A")},
				{whiteout(".wh.nothing"), dir("e"), whiteout("e/.wh.nothing")},
			},
			want: []tarEnt{file("a", "A"), dir("e")},
		},
		{
			name: "whiteout does not hide the same layer's entry",
			layers: [][]tarEnt{
				{file("x", "old")},
				{whiteout(".wh.x"), file("x", "new")},
			},
			want: []tarEnt{file("x", "new")},
		},
		{
			name: "upper directory attributes win and contents merge",
			layers: [][]tarEnt{
				{withX(withMode(dir("d"), 0o700, 5), "user.a", "1"), file("d/x", "X")},
				{withMode(dir("d"), 0o2775, 7), file("d/y", "Y")},
			},
			want: []tarEnt{withMode(dir("d"), 0o2775, 7), file("d/x", "X"), file("d/y", "Y")},
		},
		{
			name: "a parent the upper layer did not list keeps the lower attributes",
			layers: [][]tarEnt{
				{withX(withMode(dir("tmp"), 0o1777, 0), "user.t", "lower"), file("tmp/a", "a")},
				{file("tmp/sub/b", "b")},
			},
			want: []tarEnt{
				withX(withMode(dir("tmp"), 0o1777, 0), "user.t", "lower"), file("tmp/a", "a"),
				{name: "tmp/sub", typ: tar.TypeDir, mode: 0o755, mtime: time.Unix(0, 0)}, file("tmp/sub/b", "b"),
			},
		},
		{
			name: "hard links within a layer stay links",
			layers: [][]tarEnt{
				{file("a", "shared"), hardlink("b", "a"), dir("d"), hardlink("d/c", "a")},
				{file("other", "o")},
			},
			want: []tarEnt{file("a", "shared"), hardlink("b", "a"), dir("d"), hardlink("d/c", "a"), file("other", "o")},
		},
		{
			name: "whiting out one name of a link group keeps the others",
			layers: [][]tarEnt{
				{file("a", "shared"), hardlink("b", "a"), hardlink("c", "a")},
				{whiteout(".wh.a")},
			},
			want: []tarEnt{file("b", "shared"), hardlink("c", "b")},
		},
		{
			name: "links of different layers are different files",
			layers: [][]tarEnt{
				{file("a", "one"), hardlink("b", "a")},
				{file("b", "two"), hardlink("c", "b")},
			},
			want: []tarEnt{file("a", "one"), file("b", "two"), hardlink("c", "b")},
		},
		{
			name: "special files and attributes carry over",
			layers: [][]tarEnt{
				{
					withX(file("cap", "bin"), "security.capability", "\x01\x00\x00\x02"),
					withMode(file("suid", "s"), 0o4755, 0),
					symlink("l", "cap"),
					{name: "null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
					{name: "sda", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 0},
					{name: "fifo", typ: tar.TypeFifo, mode: 0o600},
					{name: "old", typ: tar.TypeReg, mode: 0o644, data: "o", mtime: testTime.Add(-1e9 * 3600)},
				},
				{withMode(dir("tmp"), 0o1777, 0), file("empty", "")},
			},
			want: []tarEnt{
				withX(file("cap", "bin"), "security.capability", "\x01\x00\x00\x02"),
				withMode(file("suid", "s"), 0o4755, 0),
				symlink("l", "cap"),
				{name: "null", typ: tar.TypeChar, mode: 0o666, major: 1, minor: 3},
				{name: "sda", typ: tar.TypeBlock, mode: 0o660, major: 8, minor: 0},
				{name: "fifo", typ: tar.TypeFifo, mode: 0o600},
				{name: "old", typ: tar.TypeReg, mode: 0o644, data: "o", mtime: testTime.Add(-1e9 * 3600)},
				withMode(dir("tmp"), 0o1777, 0),
				file("empty", ""),
			},
		},
		{
			name: "large files point into their layer",
			layers: [][]tarEnt{
				{file("big", strings.Repeat("0123456789abcdef", 10000)), file("small", "s")},
				{file("big2", strings.Repeat("x", 5000))},
			},
			want: []tarEnt{file("big", strings.Repeat("0123456789abcdef", 10000)), file("small", "s"), file("big2", strings.Repeat("x", 5000))},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var layers []*daxfs.Image
			for _, l := range tc.layers {
				layers = append(layers, layerFromTar(t, makeTar(t, l)))
			}
			view := buildView(t, layers)
			want := treeOf(t, layerFromTar(t, makeTar(t, tc.want)))
			got := treeOf(t, view)
			for _, d := range diffTrees(want, got) {
				t.Error(d)
			}
			for p := range got {
				if strings.Contains(p, "/.wh.") {
					t.Errorf("whiteout %s left in the view", p)
				}
			}
		})
	}
}

// TestViewPointsIntoLayers checks that the view holds no file data of its
// own: its size does not grow with file sizes.
func TestViewPointsIntoLayers(t *testing.T) {
	small := layerFromTar(t, makeTar(t, []tarEnt{file("f", "x")}))
	big := layerFromTar(t, makeTar(t, []tarEnt{file("f", strings.Repeat("x", 1<<20))}))
	ps, err := PlanView([]*daxfs.Image{small})
	if err != nil {
		t.Fatal(err)
	}
	pb, err := PlanView([]*daxfs.Image{big})
	if err != nil {
		t.Fatal(err)
	}
	if ps.Size() != pb.Size() {
		t.Errorf("view of a 1-byte file is %d bytes, of a 1 MiB file %d: file data was copied", ps.Size(), pb.Size())
	}
	if len(big.Bytes()) < 1<<20 {
		t.Fatalf("layer is only %d bytes", len(big.Bytes()))
	}
}

func TestViewWriteChecksBases(t *testing.T) {
	l := layerFromTar(t, makeTar(t, []tarEnt{file("f", "x")}))
	p, err := PlanView([]*daxfs.Image{l})
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	if err := p.Write(daxfs.NewWindow(buf), []uint64{1}, 1<<20); err == nil {
		t.Error("Write accepted an unaligned layer base inside the view")
	}
	if _, err := PlanView(nil); err == nil {
		t.Error("PlanView accepted no layers")
	}
}
