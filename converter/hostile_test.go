package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// deepTar is a layer with one file at depth components below the root.
func deepTar(t testing.TB, depth int) []byte {
	return makeTar(t, []tarEnt{file(strings.Repeat("a/", depth-1)+"f", "deep")})
}

// TestConvertLayerDeepPath: a layer whose one entry lies 100,000
// directories deep converts in time linear in its path (the builder once
// looked every ancestor up by its full path: cubic, 17 minutes of CPU at
// depth 24,000). With the limits at their defaults it is refused naming
// the limit.
func TestConvertLayerDeepPath(t *testing.T) {
	const depth = 100_000
	blob := deepTar(t, depth)
	out := &memOut{}
	limits := Limits{MaxPathLen: 2 * depth, MaxDepth: depth}
	res, err := ConvertLayer(t.Context(), bytes.NewReader(blob), out, LayerOptions{Limits: limits})
	if err != nil {
		t.Fatal(err)
	}
	im := openImage(t, out.b)
	if im.InodeCount() != depth+1 {
		t.Errorf("%d inodes, want %d", im.InodeCount(), depth+1)
	}
	in, err := im.LookupPath(strings.Repeat("a/", depth-1) + "f")
	if err != nil || in.Size != 4 {
		t.Fatalf("deep file: %v %+v", err, in)
	}
	// The parents are implicit directories: marked for the view.
	dirIn, err := im.LookupPath(strings.Repeat("a/", depth/2) + "a")
	if err != nil {
		t.Fatal(err)
	}
	xs, _ := im.Xattrs(dirIn.Ino)
	if len(xs) != 1 || xs[0].Name != ImplicitDirXattr {
		t.Errorf("implicit parent xattrs %v", xs)
	}
	t.Logf("%d entries, image %d bytes", res.Entries, res.Size)

	_, err = ConvertLayer(t.Context(), bytes.NewReader(blob), &memOut{}, LayerOptions{})
	if !errors.Is(err, ErrLimit) || !errdefs.IsInvalidArgument(err) || !strings.Contains(err.Error(), "limits.max_path_len") {
		t.Fatalf("default limits: %v", err)
	}
	if len(err.Error()) > 1000 {
		t.Errorf("error of %d bytes: the path must be shortened", len(err.Error()))
	}
}

// TestConvertLayerLimits: each limit refuses the entry that crosses it,
// naming the limit's configuration key.
func TestConvertLayerLimits(t *testing.T) {
	var many []tarEnt
	for i := range 20 {
		many = append(many, file(fmt.Sprintf("d/f%d", i), "x"))
	}
	for _, tc := range []struct {
		name   string
		blob   []byte
		limits Limits
		want   string
	}{
		{"depth", deepTar(t, 11), Limits{MaxDepth: 10}, "limits.max_depth"},
		{"path length", makeTar(t, []tarEnt{file(strings.Repeat("p", 200)+"/"+strings.Repeat("q", 200), "x")}), Limits{MaxPathLen: 400}, "limits.max_path_len"},
		{"entries", makeTar(t, many), Limits{MaxEntries: 10}, "limits.max_entries"},
		// Missing parents count: one entry cannot make a million names.
		{"entries made as parents", deepTar(t, 12), Limits{MaxEntries: 10}, "limits.max_entries"},
		{"default path length", makeTar(t, []tarEnt{file(strings.Repeat("d/", 2048)+"f", "x")}), Limits{}, "limits.max_path_len"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ConvertLayer(t.Context(), bytes.NewReader(tc.blob), &memOut{}, LayerOptions{Limits: tc.limits})
			if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrLimit naming %s", err, tc.want)
			}
		})
	}
	// Within the limits the same layers convert.
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(deepTar(t, 10)), &memOut{}, LayerOptions{Limits: Limits{MaxDepth: 10}}); err != nil {
		t.Errorf("depth at the limit: %v", err)
	}
}

// endlessFile is a tar stream with one file that never ends.
type endlessFile struct {
	hdr  []byte
	read int
}

func (e *endlessFile) Read(p []byte) (int, error) {
	if e.read < len(e.hdr) {
		n := copy(p, e.hdr[e.read:])
		e.read += n
		return n, nil
	}
	clear(p)
	return len(p), nil
}

// TestConvertLayerCancel: a conversion stops when its context ends, in the
// middle of a file's data too (a pull given up by its client must not go
// on holding its region claim).
func TestConvertLayerCancel(t *testing.T) {
	var hdr bytes.Buffer
	tw := tar.NewWriter(&hdr)
	tw.WriteHeader(&tar.Header{Name: "huge", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1 << 50})
	tw.Flush()
	ctx, cancel := context.WithCancel(t.Context())
	time.AfterFunc(100*time.Millisecond, cancel)
	_, err := ConvertLayer(ctx, &endlessFile{hdr: hdr.Bytes()}, discardAt{}, LayerOptions{})
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrInvalidLayer) {
		t.Fatalf("cancelled conversion: %v", err)
	}
}

// discardAt is an output nobody reads.
type discardAt struct{}

func (discardAt) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }

// oldGNUSparse is a tar holding one old-GNU sparse file ('S'), which Go's
// archive/tar expands and containerd's applier refuses.
func oldGNUSparse() []byte {
	h := make([]byte, 512)
	copy(h, "sparse")
	copy(h[100:], "0000644\x00")
	copy(h[108:], "0000000\x00")
	copy(h[116:], "0000000\x00")
	copy(h[124:], "00000000005\x00") // bytes stored
	copy(h[136:], "00000000000\x00")
	h[156] = 'S'
	copy(h[257:], "ustar  \x00")
	copy(h[386:], "00000000000\x00") // sparse[0].offset
	copy(h[398:], "00000000005\x00") // sparse[0].numbytes
	copy(h[483:], "00000000005\x00") // realsize
	copy(h[148:], "        ")
	sum := 0
	for _, c := range h {
		sum += int(c)
	}
	copy(h[148:], fmt.Sprintf("%06o\x00 ", sum))
	data := make([]byte, 512)
	copy(data, "hello")
	return append(append(h, data...), make([]byte, 1024)...)
}

// image builds a DAXFS layer image with a Writer, for pre-converted blobs
// a tar cannot describe.
func image(t testing.TB, hs ...daxfs.Header) []byte {
	t.Helper()
	out := &memOut{}
	w := daxfs.NewWriter(out, daxfs.WriterOptions{})
	for _, h := range hs {
		var data io.Reader
		if h.Mode&daxfs.ModeTypeMask == daxfs.ModeRegular {
			data = bytes.NewReader(make([]byte, h.Size))
		}
		if err := w.Add(&h, data); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	return out.b
}

// TestConvertLayerRefusesAsContainerd: what containerd's applier refuses,
// or what a media type does not declare, is refused with a clear error.
func TestConvertLayerRefusesAsContainerd(t *testing.T) {
	img := image(t, daxfs.Header{Path: "f", Mode: daxfs.ModeRegular | 0o644, Size: 3})
	xattr := func(name string, n int) []byte {
		return makeTar(t, []tarEnt{{name: "f", typ: tar.TypeReg, mode: 0o644, xattr: map[string]string{name: strings.Repeat("v", n)}}})
	}
	for _, tc := range []struct {
		name    string
		blob    []byte
		content Content
		want    string
	}{
		{"old GNU sparse file", oldGNUSparse(), ContentTar, `entry "sparse": unhandled tar header type 83`},
		{"DAXFS image declared a tar", img, ContentTar, "reading the first tar header"},
		{"gzip DAXFS image declared a tar", gz(t, img), ContentTar, "gzip layer: reading the first tar header"},
		{"zeros declared an image", make([]byte, 64<<10), ContentImage, "daxfs layer"},
		{"a tar declared an image", makeTar(t, []tarEnt{file("f", "x")}), ContentImage, "daxfs layer"},
		{"empty blob declared an image", nil, ContentImage, "daxfs layer"},
		{"xattr value over erofs's 65535 bytes", xattr("user.big", 65536), ContentTar, `entry "f": erofs: not representable in EROFS: xattr "user.big": value of 65536 bytes`},
		{"device number beyond dev_t", makeTar(t, []tarEnt{{name: "dev", typ: tar.TypeChar, mode: 0o600, major: 4096, minor: 1}}), ContentTar, `entry "dev"`},
		{"image with a trusted xattr", image(t, daxfs.Header{Path: "f", Mode: daxfs.ModeRegular | 0o644, Xattrs: map[string][]byte{"trusted.overlay.opaque": []byte("y")}}), ContentImage, `(/f): xattr "trusted.overlay.opaque"`},
		{"image with an unknown xattr namespace", image(t, daxfs.Header{Path: "f", Mode: daxfs.ModeRegular | 0o644, Xattrs: map[string][]byte{"foo.bar": []byte("y")}}), ContentImage, `xattr "foo.bar": Linux knows no such namespace`},
		{"image with a 65536-byte xattr", image(t, daxfs.Header{Path: "f", Mode: daxfs.ModeRegular | 0o644, Xattrs: map[string][]byte{"user.x": make([]byte, 65536)}}), ContentImage, `xattr "user.x": value of 65536 bytes`},
		{"image with a device beyond dev_t", image(t, daxfs.Header{Path: "d", Mode: daxfs.ModeChar | 0o600, Rdev: unix.Mkdev(4096, 1)}), ContentImage, "(/d): erofs: not representable"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res, err := ConvertLayer(t.Context(), bytes.NewReader(tc.blob), &memOut{}, LayerOptions{Content: tc.content})
			if err == nil {
				t.Fatalf("accepted: %+v", res)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.want) || !errors.Is(err, ErrInvalidLayer) {
				t.Errorf("error %q: want ErrInvalidLayer containing %q", err, tc.want)
			}
		})
	}
}

// TestConvertLayerAsContainerd: layers containerd's applier takes give the
// tree it gives.
func TestConvertLayerAsContainerd(t *testing.T) {
	t.Run("zero-byte layer is an empty layer", func(t *testing.T) {
		out := &memOut{}
		res, err := ConvertLayer(t.Context(), bytes.NewReader(nil), out, LayerOptions{Content: ContentTar})
		if err != nil {
			t.Fatal(err)
		}
		if want := digest.FromBytes(nil); res.DiffID != want {
			t.Errorf("diffID %s, want %s", res.DiffID, want)
		}
		if got := treeOf(t, openImage(t, out.b)); len(got) != 1 {
			t.Errorf("tree %v, want the root alone", got)
		}
	})
	t.Run("tar whose first name looks like a DAXFS magic", func(t *testing.T) {
		blob := makeTar(t, []tarEnt{file("5xad-not-an-image", "x")})
		out := &memOut{}
		if _, err := ConvertLayer(t.Context(), bytes.NewReader(blob), out, LayerOptions{Content: ContentTar}); err != nil {
			t.Fatal(err)
		}
		if _, err := openImage(t, out.b).LookupPath("5xad-not-an-image"); err != nil {
			t.Error(err)
		}
	})
	t.Run("uid and gid 4294967295 are chown's -1: root", func(t *testing.T) {
		e := file("f", "x")
		e.uid = 1<<32 - 1
		got := treeOf(t, layerFromTar(t, makeTar(t, []tarEnt{e})))
		want := treeOf(t, layerFromTar(t, makeTar(t, []tarEnt{file("f", "x")})))
		for _, d := range diffTrees(want, got) {
			t.Error(d)
		}
	})
	t.Run("xattrs outside Linux's namespaces are dropped and counted", func(t *testing.T) {
		e := file("f", "x")
		e.xattr = map[string]string{"foo.bar": "1", "system.nfs4_acl": "2", "user.kept": "3"}
		out := &memOut{}
		res, err := ConvertLayer(t.Context(), bytes.NewReader(makeTar(t, []tarEnt{withX(dir("d"), "trusted.x", "t"), e})), out, LayerOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if res.DroppedXattrs != 3 || res.FirstDropped == "" {
			t.Errorf("dropped %d (first %s), want 3", res.DroppedXattrs, res.FirstDropped)
		}
		got := treeOf(t, openImage(t, out.b))
		if !strings.Contains(got["/f"], `user.kept="3"`) || strings.Contains(got["/f"], "foo.bar") || strings.Contains(got["/f"], "nfs4") {
			t.Errorf("/f: %s", got["/f"])
		}
	})
	t.Run("hard link to a symlink keeps the symlink's 0777", func(t *testing.T) {
		im := layerFromTar(t, makeTar(t, []tarEnt{symlink("l", "t"), withMode(hardlink("l2", "l"), 0o644, 7)}))
		for _, p := range []string{"l", "l2"} {
			in, err := im.LookupPath(p)
			if err != nil {
				t.Fatal(err)
			}
			if in.Mode != daxfs.ModeSymlink|0o777 || in.Nlink != 2 || in.UID != 7 {
				t.Errorf("%s: mode %o nlink %d uid %d, want a symlink 0777 with 2 links owned by 7", p, in.Mode, in.Nlink, in.UID)
			}
		}
	})
	_ = sha256.New
}

// TestViewDeepChain: the view of a layer 50,000 directories deep is
// planned in time linear in its entries (the view once resolved every
// entry by its full path: 17 s at depth 10,000, growing with its square).
func TestViewDeepChain(t *testing.T) {
	const depth = 50_000
	out := &memOut{}
	limits := Limits{MaxDepth: depth, MaxPathLen: 2 * depth}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(deepTar(t, depth)), out, LayerOptions{Limits: limits}); err != nil {
		t.Fatal(err)
	}
	layer := openImage(t, out.b)
	view := buildView(t, []*daxfs.Image{layer})
	in, err := view.LookupPath(strings.Repeat("a/", depth-1) + "f")
	if err != nil || in.Size != 4 {
		t.Fatalf("deep file in the view: %v %+v", err, in)
	}
}

// TestPreconvertedLimits: a pre-converted layer, which no tar parse
// bounded, is held to the same limits.
func TestPreconvertedLimits(t *testing.T) {
	deep := &memOut{}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(deepTar(t, 3000)), deep, LayerOptions{Limits: Limits{MaxDepth: 3000, MaxPathLen: 6000}}); err != nil {
		t.Fatal(err)
	}
	wide := &memOut{}
	var many []tarEnt
	for i := range 30 {
		many = append(many, file(fmt.Sprintf("d/f%d", i), ""))
	}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(makeTar(t, many)), wide, LayerOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		image  []byte
		limits Limits
		want   string
	}{
		{"deeper than max_depth", deep.b, Limits{}, "limits.max_depth"},
		{"longer than max_path_len", deep.b, Limits{MaxDepth: 3000}, "limits.max_path_len"},
		{"more names than max_entries", wide.b, Limits{MaxEntries: 20}, "limits.max_entries"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ConvertLayer(t.Context(), bytes.NewReader(tc.image), &memOut{}, LayerOptions{Content: ContentImage, Limits: tc.limits})
			if !errors.Is(err, ErrLimit) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrLimit naming %s", err, tc.want)
			}
		})
	}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(deep.b), &memOut{}, LayerOptions{Content: ContentImage, Limits: Limits{MaxDepth: 3000, MaxPathLen: 6000}}); err != nil {
		t.Fatalf("within the limits: %v", err)
	}
}
