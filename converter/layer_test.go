package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

func gz(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func zst(t testing.TB, b []byte) []byte {
	var buf bytes.Buffer
	zw, err := zstd.NewWriter(&buf)
	if err != nil {
		t.Fatal(err)
	}
	zw.Write(b)
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func TestConvertLayerFormatsAndDiffID(t *testing.T) {
	plain := makeTar(t, []tarEnt{dir("etc"), file("etc/hostname", "box\n"), symlink("l", "etc/hostname")})
	want := digest.FromBytes(plain)
	var ref []byte
	for _, tc := range []struct {
		name   string
		blob   []byte
		format Format
	}{
		{"tar", plain, FormatTar},
		{"gzip", gz(t, plain), FormatGzip},
		{"zstd", zst(t, plain), FormatZstd},
		{"gzip multistream", append(gz(t, plain[:1024]), gz(t, plain[1024:])...), FormatGzip},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out := &memOut{}
			res, err := ConvertLayer(t.Context(), bytes.NewReader(tc.blob), out, LayerOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if res.DiffID != want || res.Format != tc.format || res.TarSize != int64(len(plain)) || res.Size != int64(len(out.b)) {
				t.Errorf("got %+v, want diffID %s format %v tar size %d image size %d", res, want, tc.format, len(plain), len(out.b))
			}
			if ref == nil {
				ref = out.b
			} else if !bytes.Equal(ref, out.b) {
				t.Error("image differs from the plain tar's")
			}
			openImage(t, out.b)
		})
	}

	t.Run("truncated compressed tar", func(t *testing.T) {
		// A trailer cut short: containerd's applier refuses the layer,
		// and so do we, whatever the tar in it.
		for name, blob := range map[string][]byte{"gzip": gz(t, plain), "zstd": zst(t, plain)} {
			for _, cut := range []int{1, 4, 7} {
				_, err := ConvertLayer(t.Context(), bytes.NewReader(blob[:len(blob)-cut]), &memOut{}, LayerOptions{})
				if err == nil || !errors.Is(err, ErrInvalidLayer) {
					t.Errorf("%s layer without its last %d bytes: %v, want an invalid layer", name, cut, err)
				}
			}
		}
	})
	t.Run("daxfs image verbatim", func(t *testing.T) {
		// Bare, or compressed as pre-converted layers of
		// MediaTypeLayerZstd are: the image itself, its diffID the
		// uncompressed image's digest.
		for name, blob := range map[string][]byte{"bare": ref, "zstd": zst(t, ref), "gzip": gz(t, ref)} {
			for _, out := range []io.WriterAt{&memOut{}, daxfs.NewWindow(make([]byte, len(ref)+8192))} {
				res, err := ConvertLayer(t.Context(), bytes.NewReader(blob), out, LayerOptions{})
				if err != nil {
					t.Fatalf("%s, %T: %v", name, out, err)
				}
				var got []byte
				switch o := out.(type) {
				case *memOut:
					got = o.b
				case *daxfs.Window:
					got = o.Bytes()[:res.Size]
				}
				if !bytes.Equal(got, ref) || res.Format != FormatDAXFS || res.DiffID != digest.FromBytes(ref) || res.Size != int64(len(ref)) {
					t.Errorf("%s, %T: result %+v; bytes equal %v", name, out, res, bytes.Equal(got, ref))
				}
			}
		}
		// A damaged stream is refused however valid the image in it, in
		// memory and in a window (a region extent) alike; cutting 4 bytes
		// leaves all of the image and loses only the checksum.
		bad := gz(t, ref)
		bad[len(bad)-5] ^= 0xff // the trailer's length
		damaged := map[string][]byte{"gzip trailer": bad}
		for name, blob := range map[string][]byte{"zstd": zst(t, ref), "gzip": gz(t, ref)} {
			for _, cut := range []int{4, 6} {
				damaged[fmt.Sprintf("%s without %d bytes", name, cut)] = blob[:len(blob)-cut]
			}
		}
		for name, blob := range damaged {
			for _, out := range []io.WriterAt{&memOut{}, daxfs.NewWindow(make([]byte, len(ref)+8192)), daxfs.NewWindow(make([]byte, len(ref)))} {
				if _, err := ConvertLayer(t.Context(), bytes.NewReader(blob), out, LayerOptions{}); err == nil || !strings.Contains(err.Error(), strings.Fields(name)[0]) {
					t.Errorf("%s image into %T of %d bytes: %v, want an error naming the compression", name, out, windowLen(out), err)
				}
			}
		}
	})
	t.Run("corrupt daxfs image", func(t *testing.T) {
		bad := bytes.Clone(ref)
		// Point the root inode's data somewhere absurd.
		inodes := daxfs.BaseOffset + int(binary.LittleEndian.Uint64(bad[daxfs.BaseOffset+24:]))
		for i := range 8 {
			bad[inodes+24+i] = 0xff
		}
		_, err := ConvertLayer(t.Context(), bytes.NewReader(bad), &memOut{}, LayerOptions{})
		if err == nil || !strings.Contains(err.Error(), "daxfs layer") {
			t.Errorf("corrupt image: %v", err)
		}
		_, err = ConvertLayer(t.Context(), bytes.NewReader(ref[:len(ref)-4096]), &memOut{}, LayerOptions{})
		if err == nil {
			t.Error("truncated image accepted")
		}
	})
}

// TestConvertLayerTarSemantics checks each tar feature against the tree it
// must give (the tree of the equivalent simple tar).
func TestConvertLayerTarSemantics(t *testing.T) {
	long := strings.Repeat("n", 255)
	deep := strings.Repeat("deep/", 40) + "f"
	tests := []struct {
		name string
		tar  []tarEnt
		want []tarEnt
	}{
		{"later file replaces earlier", []tarEnt{file("a", "1"), file("a", "22")}, []tarEnt{file("a", "22")}},
		{"file replaces directory and its subtree", []tarEnt{dir("d"), file("d/x", "x"), file("d", "f")}, []tarEnt{file("d", "f")}},
		{"directory over directory merges", []tarEnt{dir("d"), file("d/x", "x"), withMode(dir("d"), 0o700, 3)}, []tarEnt{withMode(dir("d"), 0o700, 3), file("d/x", "x")}},
		{"root entry ignored", []tarEnt{withMode(dir("./"), 0o700, 9), file("./x", "x")}, []tarEnt{file("x", "x")}},
		{"dot slash and double slashes", []tarEnt{dir("./d/"), file("./d//x", "x")}, []tarEnt{dir("d"), file("d/x", "x")}},
		{"inner dotdot that stays inside", []tarEnt{dir("d"), file("d/../y", "y")}, []tarEnt{dir("d"), file("y", "y")}},
		{"255-byte and UTF-8 names", []tarEnt{file(long, "l"), file("héllo wörld ☃", "u")}, []tarEnt{file(long, "l"), file("héllo wörld ☃", "u")}},
		{"long paths", []tarEnt{file(deep, "d")}, nil},
		{"setuid setgid sticky", []tarEnt{withMode(file("s", "s"), 0o6755, 0), withMode(dir("t"), 0o1777, 0)}, []tarEnt{withMode(file("s", "s"), 0o6755, 0), withMode(dir("t"), 0o1777, 0)}},
		{"symlink permission bits are always 0777", []tarEnt{{name: "l", typ: tar.TypeSymlink, mode: 0o700, link: "x"}}, []tarEnt{symlink("l", "x")}},
		{"mtime before the epoch becomes the epoch", []tarEnt{{name: "old", typ: tar.TypeReg, mode: 0o644, mtime: time.Unix(-100, 0)}}, []tarEnt{{name: "old", typ: tar.TypeReg, mode: 0o644, mtime: time.Unix(0, 0)}}},
		{"whiteouts kept as canonical empty files", []tarEnt{{name: ".wh.gone", typ: tar.TypeReg, mode: 0o600, uid: 5, data: "junk"}, dir("d"), withMode(file("d/.wh..wh..opq", ""), 0o644, 3)},
			[]tarEnt{{name: ".wh.gone", typ: tar.TypeReg, mtime: time.Unix(0, 0)}, dir("d"), {name: "d/.wh..wh..opq", typ: tar.TypeReg, mtime: time.Unix(0, 0)}}},
		// containerd's applier never sets trusted.* xattrs from a tar, so a
		// trusted overlay marker in a tar has no effect there either.
		{"trusted xattrs from a tar are dropped", []tarEnt{withX(dir("d"), "trusted.overlay.opaque", "y"), withX(file("f", "x"), "trusted.daxfs-test", "t")}, []tarEnt{dir("d"), file("f", "x")}},
		{"0/0 character device is a whiteout", []tarEnt{{name: "x", typ: tar.TypeChar}}, []tarEnt{{name: ".wh.x", typ: tar.TypeReg, mtime: time.Unix(0, 0)}}},
		{"hard link header sets the shared inode's attributes", []tarEnt{file("a", "data"), withMode(hardlink("b", "a"), 0o600, 4)}, []tarEnt{withMode(file("a", "data"), 0o600, 4), withMode(hardlink("b", "a"), 0o600, 4)}},
		{"global PAX header ignored", []tarEnt{{name: "pax_global_header", typ: tar.TypeXGlobalHeader}, file("a", "a")}, []tarEnt{file("a", "a")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := treeOf(t, layerFromTar(t, makeTar(t, tc.tar)))
			if tc.want == nil {
				p := "/" + tc.tar[len(tc.tar)-1].name
				if _, ok := got[p]; !ok {
					t.Errorf("%s missing from %v", p, got)
				}
				return
			}
			want := treeOf(t, layerFromTar(t, makeTar(t, tc.want)))
			for _, d := range diffTrees(want, got) {
				t.Error(d)
			}
		})
	}
}

// TestConvertLayerImplicitParents: parents no entry made are created as
// 0755 root directories marked with ImplicitDirXattr; an entry for them,
// before or after, removes the mark; a marker in the input is dropped.
func TestConvertLayerImplicitParents(t *testing.T) {
	got := treeOf(t, layerFromTar(t, makeTar(t, []tarEnt{
		file("a/b/c", "c"), file("x/y/z", "z"), withMode(dir("x"), 0o700, 0),
		withX(dir("e"), ImplicitDirXattr, "1"), file("f/g", "g"), file("f", "file now"),
		// r replaced by a file and r again as a directory: the r/s the
		// Writer recreates for r/s/t is implicit.
		dir("r"), dir("r/s"), file("r", "f"), dir("r"), file("r/s/t", "t"),
		// an implicit subtree replaced by a file stays gone
		file("q/w/e", "e"), file("q", "file"),
	})))
	if _, ok := got["/q/w"]; ok || !strings.HasPrefix(got["/q"], "mode=100644") {
		t.Errorf("replaced implicit subtree: /q %s, /q/w %s", got["/q"], got["/q/w"])
	}
	mark := ImplicitDirXattr + `="1"`
	for p, implicit := range map[string]bool{"/a": true, "/a/b": true, "/x": false, "/x/y": true, "/e": false, "/r": false, "/r/s": true} {
		if strings.Contains(got[p], mark) != implicit {
			t.Errorf("%s: %s (implicit %v)", p, got[p], implicit)
		}
	}
	if !strings.HasPrefix(got["/a"], "mode=40755 uid=0 gid=0 mtime=0.") || !strings.HasPrefix(got["/x"], "mode=40700") || !strings.HasPrefix(got["/f"], "mode=100644") {
		t.Errorf("attributes: %v", got)
	}
}

func TestConvertLayerGNUFormat(t *testing.T) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	name := strings.Repeat("g", 200) + "/" + strings.Repeat("h", 200)
	for _, h := range []*tar.Header{
		{Name: strings.Repeat("g", 200) + "/", Typeflag: tar.TypeDir, Mode: 0o755, Format: tar.FormatGNU},
		{Name: name, Typeflag: tar.TypeReg, Mode: 0o644, Size: 3, Format: tar.FormatGNU},
		{Name: "ln", Typeflag: tar.TypeSymlink, Linkname: strings.Repeat("t", 300), Format: tar.FormatGNU},
	} {
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		if h.Size > 0 {
			io.WriteString(tw, "abc")
		}
	}
	tw.Close()
	im := layerFromTar(t, buf.Bytes())
	in, err := im.LookupPath(name)
	if err != nil || in.Size != 3 {
		t.Fatalf("long GNU name: %v %+v", err, in)
	}
	ln, err := im.LookupPath("ln")
	if err != nil || ln.Size != 300 {
		t.Fatalf("long GNU link name: %v %+v", err, ln)
	}
}

// TestConvertLayerHostile feeds malformed and hostile layers: each must
// fail with an error naming what is wrong.
func TestConvertLayerHostile(t *testing.T) {
	good := makeTar(t, []tarEnt{dir("d"), file("d/f", strings.Repeat("x", 3000)), file("g", "g")})
	truncGz := gz(t, good)
	truncGz = truncGz[:len(truncGz)/2]
	badCRC := gz(t, good)
	badCRC[len(badCRC)-6] ^= 0xff
	truncZst := zst(t, good)
	truncZst = truncZst[:len(truncZst)-10]
	corruptZst := zst(t, good)
	corruptZst[len(corruptZst)/2] ^= 0x55
	zeroEnd := makeTar(t, []tarEnt{file("z", strings.Repeat("\x00", 2048))})
	xs := bytes.Index(good, []byte(strings.Repeat("x", 3000)))
	between := (xs + 3000 + 511) &^ 511
	trailing := append(bytes.Clone(good), make([]byte, maxTrailing+1024)...)

	tests := []struct {
		name string
		blob []byte
		opts LayerOptions
		want string
	}{
		{"dotdot escape", makeTar(t, []tarEnt{file("../evil", "x")}), LayerOptions{}, `"../evil": path "../evil" escapes the root`},
		{"dotdot escape deep", makeTar(t, []tarEnt{file("a/../../evil", "x")}), LayerOptions{}, "escapes the root"},
		{"absolute path", makeTar(t, []tarEnt{file("/etc/passwd", "x")}), LayerOptions{}, `absolute path "/etc/passwd"`},
		{"hard link escape", makeTar(t, []tarEnt{hardlink("l", "../../etc/shadow")}), LayerOptions{}, `entry "l": hard link target: path "../../etc/shadow" escapes the root`},
		{"hard link absolute", makeTar(t, []tarEnt{hardlink("l", "/etc/shadow")}), LayerOptions{}, `entry "l": hard link target: absolute path`},
		{"hard link to missing target", makeTar(t, []tarEnt{hardlink("l", "nope")}), LayerOptions{}, `entry "l": hard link to "nope"`},
		{"hard link to a directory", makeTar(t, []tarEnt{dir("d"), hardlink("l", "d")}), LayerOptions{}, `entry "l": hard link to "d"`},
		{"hard link to itself", makeTar(t, []tarEnt{hardlink("l", "l")}), LayerOptions{}, `entry "l": hard link to "l"`},
		{"name over 255 bytes", makeTar(t, []tarEnt{file(strings.Repeat("a", 256), "x")}), LayerOptions{}, "component of 256 bytes exceeds 255"},
		{"entry under a file", makeTar(t, []tarEnt{file("f", "x"), file("f/g", "y")}), LayerOptions{}, `entry "f/g"`},
		{"entry under a symlink", makeTar(t, []tarEnt{symlink("s", "d"), file("s/g", "y")}), LayerOptions{}, `entry "s/g"`},
		{"empty whiteout name", makeTar(t, []tarEnt{file(".wh.", "")}), LayerOptions{}, `entry ".wh.": invalid whiteout name`},
		{"whiteout of dotdot", makeTar(t, []tarEnt{file("d/.wh...", "")}), LayerOptions{}, `invalid whiteout name ".wh..."`},
		{"symlink without target", makeTar(t, []tarEnt{{name: "s", typ: tar.TypeSymlink}}), LayerOptions{}, `entry "s": symlink with an empty target`},
		{"truncated tar in a header", good[:700], LayerOptions{}, "truncated"},
		{"truncated tar in file data", good[:xs+100], LayerOptions{}, `tar layer: truncated: entry "d/f"`},
		{"truncated tar between entries", good[:between], LayerOptions{}, "truncated: no end-of-archive marker"},
		{"truncated after a file ending in zeros", zeroEnd[:len(zeroEnd)-1024], LayerOptions{}, "no end-of-archive marker"},
		{"garbage", []byte(strings.Repeat("garbage!", 100)), LayerOptions{}, "tar layer: reading the first tar header"},
		{"truncated gzip", truncGz, LayerOptions{}, "gzip layer"},
		{"gzip checksum", badCRC, LayerOptions{}, "gzip layer"},
		{"bad gzip header", []byte{0x1f, 0x8b, 0, 0, 0}, LayerOptions{}, "gzip layer"},
		{"truncated zstd", truncZst, LayerOptions{}, "zstd layer"},
		{"corrupt zstd", corruptZst, LayerOptions{}, "zstd layer"},
		{"too large", good, LayerOptions{MaxSize: 4 * 4096}, "exceeds the maximum size"},
		{"trailing garbage", trailing, LayerOptions{}, "after the end-of-archive marker"},
		{"unsupported type", makeTar(t, []tarEnt{{name: "c", typ: tar.TypeCont}}), LayerOptions{}, `entry "c": unhandled tar header type 55`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res, err := ConvertLayer(t.Context(), bytes.NewReader(tc.blob), &memOut{}, tc.opts)
			if err == nil {
				t.Fatalf("accepted: %+v", res)
			}
			t.Log(err)
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q does not contain %q", err, tc.want)
			}
			if tc.opts.MaxSize > 0 {
				if !errors.Is(err, ErrTooLarge) || !errdefs.IsResourceExhausted(err) {
					t.Errorf("error %v is not ErrTooLarge", err)
				}
			} else if !errors.Is(err, ErrInvalidLayer) || !errdefs.IsInvalidArgument(err) {
				t.Errorf("error %v is not ErrInvalidLayer", err)
			}
		})
	}
}

// TestConvertLayerBomb checks that the uncompressed stream is bounded by
// MaxSize: a small zstd blob expanding to gigabytes fails early.
func TestConvertLayerBomb(t *testing.T) {
	var buf bytes.Buffer
	zw, _ := zstd.NewWriter(&buf, zstd.WithEncoderLevel(zstd.SpeedBestCompression))
	tw := tar.NewWriter(zw)
	tw.WriteHeader(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Size: 1 << 32, Mode: 0o644})
	zero := make([]byte, 1<<20)
	for range 256 { // only the first 256 MiB: the converter must stop before
		zw.Write(zero)
	}
	zw.Close()
	start := time.Now()
	_, err := ConvertLayer(t.Context(), &buf, daxfs.NewWindow(make([]byte, 8<<20)), LayerOptions{MaxSize: 8 << 20})
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("bomb: %v", err)
	}
	t.Logf("rejected after %v: %v", time.Since(start), err)
}

type failingReader struct{ r io.Reader }

func (f *failingReader) Read(p []byte) (int, error) {
	n, err := f.r.Read(p)
	if err == io.EOF {
		return n, errors.New("connection reset")
	}
	return n, err
}

// TestConvertLayerErrorClasses: failures that are not the layer's fault
// are not reported as an invalid layer.
func TestConvertLayerErrorClasses(t *testing.T) {
	good := makeTar(t, []tarEnt{file("f", strings.Repeat("x", 10000))})
	_, err := ConvertLayer(t.Context(), &failingReader{bytes.NewReader(good[:5000])}, &memOut{}, LayerOptions{})
	if err == nil || errors.Is(err, ErrInvalidLayer) || !strings.Contains(err.Error(), "connection reset") {
		t.Errorf("read failure: %v", err)
	}
	_, err = ConvertLayer(t.Context(), bytes.NewReader(good), daxfs.NewWindow(make([]byte, 8192)), LayerOptions{})
	if !errors.Is(err, ErrTooLarge) || !errors.Is(err, daxfs.ErrNoSpace) {
		t.Errorf("output too small: %v", err)
	}
	img := &memOut{}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(good), img, LayerOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err = ConvertLayer(t.Context(), bytes.NewReader(img.b), daxfs.NewWindow(make([]byte, len(img.b)-4096)), LayerOptions{})
	if !errors.Is(err, ErrTooLarge) || !errors.Is(err, daxfs.ErrNoSpace) {
		t.Errorf("image blob larger than the output: %v", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, err = ConvertLayer(ctx, bytes.NewReader(good), &memOut{}, LayerOptions{})
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrInvalidLayer) {
		t.Errorf("cancelled: %v", err)
	}
}

func TestDetectFormat(t *testing.T) {
	for _, tc := range []struct {
		head []byte
		want Format
	}{
		{[]byte{0x1f, 0x8b, 8, 0}, FormatGzip},
		{[]byte{0x28, 0xb5, 0x2f, 0xfd}, FormatZstd},
		{[]byte{0x35, 0x78, 0x61, 0x64}, FormatDAXFS},
		{[]byte("etc/"), FormatTar},
		{nil, FormatTar},
	} {
		if got := DetectFormat(tc.head); got != tc.want {
			t.Errorf("%x: %v, want %v", tc.head, got, tc.want)
		}
	}
	if fmt.Sprint(FormatZstd) != "zstd" {
		t.Error(FormatZstd)
	}
	_ = sha256.New
}

// TestConvertLayerBackingFull: when the output cannot get memory (a
// reserving Window over a full region), the error is the backing store's,
// not an invalid layer, for a tar and for a DAXFS layer copied verbatim.
func TestConvertLayerBackingFull(t *testing.T) {
	big := strings.Repeat("x", 3<<20)
	plain := makeTar(t, []tarEnt{dir("etc"), file("etc/big", big)})
	out := &memOut{}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(plain), out, LayerOptions{}); err != nil {
		t.Fatal(err)
	}
	image := out.b
	full := errors.New("region full")
	for _, tc := range []struct {
		name string
		blob []byte
	}{{"tar", plain}, {"gzip", gz(t, plain)}, {"daxfs image", image}} {
		t.Run(tc.name, func(t *testing.T) {
			win := daxfs.NewReservingWindow(make([]byte, 8<<20), func(off, n int64) error {
				if off+n > 1<<20 {
					return full
				}
				return nil
			})
			_, err := ConvertLayer(t.Context(), bytes.NewReader(tc.blob), win, LayerOptions{})
			if !errors.Is(err, full) || !errors.Is(err, daxfs.ErrBacking) || errors.Is(err, ErrInvalidLayer) || errors.Is(err, ErrTooLarge) {
				t.Fatalf("error %v: want the backing store's error, not an invalid or too large layer", err)
			}
		})
	}
}

func windowLen(out io.WriterAt) int {
	if w, ok := out.(*daxfs.Window); ok {
		return len(w.Bytes())
	}
	return -1
}
