package converter

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// FuzzConvertLayer feeds arbitrary bytes (seeded with tars, compressed tars
// and an image) to ConvertLayer: it must return an image that validates or
// an error, never panic or hang. The output is a bounded Window, so the
// size limits are exercised too.
func FuzzConvertLayer(f *testing.F) {
	// Small seeds: the fuzzer minimizes interesting inputs, and that takes
	// minutes on inputs of hundreds of kilobytes.
	seed := makeTar(f, []tarEnt{
		dir("d"), withX(file("d/f", "data"), "user.x", "1"), symlink("l", "d/f"),
		{name: "c", typ: '3', mode: 0o600, major: 1, minor: 3}, {name: "p", typ: '6', mode: 0o600},
	})
	f.Add(seed)
	f.Add(gz(f, seed))
	f.Add(zst(f, seed))
	f.Add(makeTar(f, []tarEnt{file("a", "x"), hardlink("b", "a"), {name: ".wh.c", typ: '0'}, dir("d"), file("d/.wh..wh..opq", "")}))
	f.Add(makeTar(f, []tarEnt{file("../x", "x")}))
	// No bare DAXFS image seed: the smallest is three pages, and the
	// image reader has its own fuzz targets in package daxfs. Compressed
	// (as pre-converted layers of MediaTypeLayerZstd are) it is small.
	img := &memOut{}
	if _, err := ConvertLayer(context.Background(), bytes.NewReader(seed), img, LayerOptions{}); err != nil {
		f.Fatal(err)
	}
	f.Add(zst(f, img.b))
	f.Add([]byte{})
	f.Add([]byte(strings.Repeat("\x00", 1024)))

	const max = 1 << 20
	buf := make([]byte, max)
	used := max
	f.Fuzz(func(t *testing.T, blob []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		clear(buf[:used])
		used = max
		res, err := ConvertLayer(ctx, bytes.NewReader(blob), daxfs.NewWindow(buf), LayerOptions{MaxSize: max})
		if err != nil {
			return
		}
		used = int(res.Size)
		if res.Size <= 0 || res.Size > max {
			t.Fatalf("size %d", res.Size)
		}
		if err := daxfs.Validate(buf[:res.Size]); err != nil {
			t.Fatalf("converted image does not validate: %v", err)
		}
	})
}

// FuzzPlanView builds the view of two layers converted from arbitrary tars:
// whenever both layers convert, the view must plan, write and validate,
// and hold no whiteout.
func FuzzPlanView(f *testing.F) {
	// USTAR seeds (512-byte headers, no PAX records): the fuzzer
	// minimizes every interesting input, which is slow for big ones.
	f.Add(ustar(f, []tarEnt{dir("d"), file("d/a", "a"), file("d/b", "b"), hardlink("d/c", "d/a")}),
		ustar(f, []tarEnt{dir("d"), {name: "d/.wh.a", typ: '0'}, file("d/.wh..wh..opq", ""), file("d/e", "e")}))
	f.Add(ustar(f, []tarEnt{file("x", "file")}), ustar(f, []tarEnt{dir("x"), file("x/y", "y")}))
	f.Fuzz(func(t *testing.T, a, b []byte) {
		var layers []*daxfs.Image
		for _, blob := range [][]byte{a, b} {
			out := &memOut{}
			if _, err := ConvertLayer(context.Background(), bytes.NewReader(blob), out, LayerOptions{MaxSize: 1 << 20}); err != nil {
				return
			}
			im, err := daxfs.Open(out.b)
			if err != nil {
				t.Fatalf("converted layer does not open: %v", err)
			}
			layers = append(layers, im)
		}
		v, err := composeView(layers)
		if err != nil {
			t.Fatalf("view of valid layers: %v", err)
		}
		if err := daxfs.Validate(v); err != nil {
			t.Fatalf("view does not validate: %v", err)
		}
		im, err := daxfs.Open(v)
		if err != nil {
			t.Fatal(err)
		}
		for p := range treeOf(t, im) {
			if strings.Contains(p, "/.wh.") {
				t.Fatalf("whiteout %s left in the view", p)
			}
		}
	})
}

// ustar is a tar of ents in the USTAR format, without the 0-byte end
// padding to a full record.
func ustar(tb testing.TB, ents []tarEnt) []byte {
	var buf bytes.Buffer
	for _, e := range ents {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link, ModTime: time.Unix(1700000000, 0), Format: tar.FormatUSTAR}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		tw := tar.NewWriter(&buf)
		if err := tw.WriteHeader(h); err != nil {
			tb.Fatal(err)
		}
		io.WriteString(tw, e.data)
		tw.Flush()
	}
	buf.Write(make([]byte, 1024))
	return buf.Bytes()
}

// FuzzTarSize: any blob gives a size estimate or none, never a panic, and
// an estimate is never negative; ContentDigest of the blob ends.
func FuzzTarSize(f *testing.F) {
	seed := makeTar(f, []tarEnt{file("a", "x")})
	f.Add(seed)
	f.Add(gz(f, seed))
	f.Add(zst(f, seed))
	f.Add([]byte{0x1f, 0x8b})
	f.Add([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x20, 0x05})
	f.Fuzz(func(t *testing.T, blob []byte) {
		if n, ok := TarSize(bytes.NewReader(blob), int64(len(blob))); ok && n < 0 {
			t.Fatalf("negative size %d", n)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, _ = ContentDigest(ctx, bytes.NewReader(blob))
	})
}
