package converter

import (
	"bytes"
	"testing"
)

// TestImageSize: the size of a DAXFS layer image, bare or compressed, is
// read from its head; a tar or a short or foreign blob has none.
func TestImageSize(t *testing.T) {
	tarball := makeTar(t, []tarEnt{dir("d"), file("d/f", "data")})
	img := &memOut{}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(tarball), img, LayerOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		blob []byte
		size int64
		ok   bool
	}{
		{"bare image", img.b, int64(len(img.b)), true},
		{"gzip image", gz(t, img.b), int64(len(img.b)), true},
		{"zstd image", zst(t, img.b), int64(len(img.b)), true},
		{"tar", tarball, 0, false},
		{"gzip tar", gz(t, tarball), 0, false},
		{"zstd tar", zst(t, tarball), 0, false},
		{"empty", nil, 0, false},
		{"short image", img.b[:10], 0, false},
	} {
		size, ok, err := ImageSize(bytes.NewReader(tc.blob))
		if err != nil || size != tc.size || ok != tc.ok {
			t.Errorf("%s: %d, %v, %v; want %d, %v", tc.name, size, ok, err, tc.size, tc.ok)
		}
	}
	bad := bytes.Clone(img.b)
	clear(bad[16:24])
	if _, _, err := ImageSize(bytes.NewReader(bad)); err == nil {
		t.Error("an image stating a total size of 0 was sized")
	}
}

// FuzzImageSize: any blob gives a size, none, or an error; never a panic.
func FuzzImageSize(f *testing.F) {
	f.Add(zst(f, makeTar(f, []tarEnt{file("f", "x")})))
	f.Add([]byte{0x35, 0x78, 0x61, 0x64})
	f.Fuzz(func(t *testing.T, blob []byte) {
		if size, ok, err := ImageSize(bytes.NewReader(blob)); ok && (err != nil || size <= 0) {
			t.Fatalf("size %d, ok, error %v", size, err)
		}
	})
}
