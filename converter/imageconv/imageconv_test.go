package imageconv

import (
	"bytes"
	"encoding/json"
	"io"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/platforms"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

type memOut struct{ b []byte }

func (m *memOut) WriteAt(p []byte, off int64) (int, error) {
	if end := int(off) + len(p); end > len(m.b) {
		m.b = append(m.b, make([]byte, end-len(m.b))...)
	}
	return copy(m.b[off:], p), nil
}

// TestConvertImage converts an imported three-layer image (gzip, zstd,
// uncompressed) in a real containerd and checks the result, zstd
// compressed (the default) and bare: every layer is a DAXFS layer image of
// our media type holding what the original layer converts to, and the
// config's diff_ids are the uncompressed images' digests.
func TestConvertImage(t *testing.T) {
	testenv.RequireRoot(t)
	F := func(name, data string) testimage.Entry { return testimage.File(name, []byte(data), 0o644) }
	img := testimage.Image{Layers: []testimage.Layer{
		{Compression: testimage.Gzip, Entries: []testimage.Entry{testimage.Dir("etc", 0o755), F("etc/a", "a"), F("etc/b", "b")}},
		{Compression: testimage.Zstd, Entries: []testimage.Entry{testimage.Dir("etc", 0o755), testimage.Whiteout("etc/a"), F("etc/c", "c")}},
		{Compression: testimage.Uncompressed, Entries: []testimage.Entry{testimage.Dir("etc", 0o755), testimage.Opaque("etc"), F("etc/d", "d")}},
	}}
	src := "docker.io/library/daxfs-convert:src"
	archive, built := testenv.WriteImageArchive(t, img, src)
	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	ctrd.CtrOK(t, "image", "import", "--no-unpack", archive)
	cl := ctrd.Client(t)
	ctx := ctrd.Context(t.Context())
	cs := cl.ContentStore()

	for _, tc := range []struct {
		name      string
		opts      []Option
		mediaType string
	}{
		{"zstd", nil, converter.MediaTypeLayerZstd},
		{"bare", []Option{WithCompression(None)}, converter.MediaTypeLayer},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dst := "docker.io/library/daxfs-convert:" + tc.name
			out, err := ctrconverter.Convert(ctx, cl, dst, src, ctrconverter.WithLayerConvertFunc(LayerConvertFunc(tc.opts...)), ctrconverter.WithDockerToOCI(true))
			if err != nil {
				t.Fatalf("converting: %v", err)
			}
			mf, err := images.Manifest(ctx, cs, out.Target, platforms.All)
			if err != nil {
				t.Fatal(err)
			}
			cfgBlob, err := content.ReadBlob(ctx, cs, mf.Config)
			if err != nil {
				t.Fatal(err)
			}
			var cfg ocispec.Image
			if err := json.Unmarshal(cfgBlob, &cfg); err != nil {
				t.Fatal(err)
			}
			if len(mf.Layers) != 3 || len(cfg.RootFS.DiffIDs) != 3 {
				t.Fatalf("%d layers, %d diff_ids", len(mf.Layers), len(cfg.RootFS.DiffIDs))
			}
			for i, l := range mf.Layers {
				if l.MediaType != tc.mediaType {
					t.Errorf("layer %d: media type %s, want %s", i, l.MediaType, tc.mediaType)
				}
				if got := l.Annotations[snapshots.LabelSnapshotDiffID]; got != cfg.RootFS.DiffIDs[i].String() {
					t.Errorf("layer %d: annotation %s=%q, want its diff_id %s", i, snapshots.LabelSnapshotDiffID, got, cfg.RootFS.DiffIDs[i])
				}
				blob, err := content.ReadBlob(ctx, cs, l)
				if err != nil {
					t.Fatal(err)
				}
				if digest.FromBytes(blob) != l.Digest {
					t.Errorf("layer %d: content does not match its digest", i)
				}
				image := blob
				if tc.mediaType == converter.MediaTypeLayerZstd {
					zr, err := zstd.NewReader(bytes.NewReader(blob))
					if err != nil {
						t.Fatal(err)
					}
					image, err = io.ReadAll(zr)
					zr.Close()
					if err != nil {
						t.Fatalf("layer %d: decompressing: %v", i, err)
					}
					if len(blob) >= len(image) {
						t.Errorf("layer %d: compressed blob of %d bytes for an image of %d", i, len(blob), len(image))
					}
				}
				if cfg.RootFS.DiffIDs[i] != digest.FromBytes(image) {
					t.Errorf("layer %d: diff_id %s, not the digest of the image", i, cfg.RootFS.DiffIDs[i])
				}
				want := &memOut{}
				if _, err := converter.ConvertLayer(t.Context(), bytes.NewReader(built.Layers[i].Data), want, converter.LayerOptions{}); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(image, want.b) {
					t.Errorf("layer %d: converted image differs from ConvertLayer of the original", i)
				}
				if err := daxfs.Validate(image); err != nil {
					t.Errorf("layer %d: %v", i, err)
				}
				// What the daxfs differ sees.
				res, err := converter.ConvertLayer(t.Context(), bytes.NewReader(blob), &memOut{}, converter.LayerOptions{})
				if err != nil || res.Format != converter.FormatDAXFS || res.DiffID != cfg.RootFS.DiffIDs[i] {
					t.Errorf("layer %d: pre-converted blob read back as %+v, %v", i, res, err)
				}
			}
			// Converting the converted image changes nothing.
			again, err := ctrconverter.Convert(ctx, cl, dst+"-again", dst, ctrconverter.WithLayerConvertFunc(LayerConvertFunc(tc.opts...)))
			if err != nil {
				t.Fatal(err)
			}
			if again.Target.Digest != out.Target.Digest {
				t.Errorf("second conversion changed the image: %s != %s", again.Target.Digest, out.Target.Digest)
			}
		})
	}
}
