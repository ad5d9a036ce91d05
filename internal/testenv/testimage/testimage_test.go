package testimage_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	ti "github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

func decompress(t *testing.T, mediaType string, data []byte) []byte {
	t.Helper()
	var r io.Reader
	switch mediaType {
	case ocispec.MediaTypeImageLayerGzip:
		zr, err := gzip.NewReader(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		r = zr
	case ocispec.MediaTypeImageLayerZstd:
		zr, err := zstd.NewReader(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		defer zr.Close()
		r = zr
	case ocispec.MediaTypeImageLayer:
		return data
	default:
		t.Fatalf("unexpected media type %s", mediaType)
	}
	out, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestBuildConsistent checks the invariants containerd verifies on import:
// blob digests and sizes, diffIDs of the uncompressed tars, and config and
// manifest agreeing with each other; and that builds are reproducible.
func TestBuildConsistent(t *testing.T) {
	img := ti.Image{Layers: []ti.Layer{
		{Compression: ti.Gzip, Entries: []ti.Entry{ti.Dir("a", 0o755), ti.File("a/f", []byte("gz"), 0o644)}},
		{Compression: ti.Zstd, Entries: []ti.Entry{ti.File("a/z", []byte("zstd"), 0o600)}},
		{Compression: ti.Uncompressed, Entries: []ti.Entry{ti.Whiteout("a/f")}},
		{Blob: []byte("opaque blob"), MediaType: "application/vnd.example.layer"},
	}, Config: ocispec.ImageConfig{Cmd: []string{"/bin/true"}}}
	built, err := img.Build()
	if err != nil {
		t.Fatal(err)
	}
	var config ocispec.Image
	if err := json.Unmarshal(built.Config.Data, &config); err != nil {
		t.Fatal(err)
	}
	var manifest ocispec.Manifest
	if err := json.Unmarshal(built.Manifest.Data, &manifest); err != nil {
		t.Fatal(err)
	}
	if manifest.Config.Digest != digest.FromBytes(built.Config.Data) || manifest.Config.MediaType != ocispec.MediaTypeImageConfig {
		t.Errorf("manifest config descriptor %+v does not match the config blob", manifest.Config)
	}
	if len(manifest.Layers) != 4 || len(config.RootFS.DiffIDs) != 4 {
		t.Fatalf("manifest has %d layers, config %d diffIDs, want 4", len(manifest.Layers), len(config.RootFS.DiffIDs))
	}
	for i, l := range built.Layers {
		d := manifest.Layers[i]
		if d.Digest != digest.FromBytes(l.Data) || d.Size != int64(len(l.Data)) || d.MediaType != l.Descriptor.MediaType {
			t.Errorf("layer %d descriptor %+v does not match its blob", i, d)
		}
		if i == 3 {
			if config.RootFS.DiffIDs[i] != digest.FromBytes([]byte("opaque blob")) {
				t.Errorf("blob layer diffID %s", config.RootFS.DiffIDs[i])
			}
			continue
		}
		tarData := decompress(t, d.MediaType, l.Data)
		if got := digest.FromBytes(tarData); got != config.RootFS.DiffIDs[i] || got != built.DiffIDs[i] {
			t.Errorf("layer %d: diffID %s, config says %s", i, got, config.RootFS.DiffIDs[i])
		}
	}
	for i, want := range []string{ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd, ocispec.MediaTypeImageLayer} {
		if manifest.Layers[i].MediaType != want {
			t.Errorf("layer %d media type %s, want %s", i, manifest.Layers[i].MediaType, want)
		}
	}
	if strings.Join(config.Config.Cmd, " ") != "/bin/true" || len(config.Config.Env) == 0 || config.OS != "linux" {
		t.Errorf("config %+v", config)
	}
	if len(built.ChainIDs()) != 4 || built.ChainIDs()[0] != built.DiffIDs[0] {
		t.Errorf("chain IDs %v", built.ChainIDs())
	}
	again, err := img.Build()
	if err != nil {
		t.Fatal(err)
	}
	if again.Manifest.Descriptor.Digest != built.Manifest.Descriptor.Digest {
		t.Errorf("two builds of one image differ: %s != %s", again.Manifest.Descriptor.Digest, built.Manifest.Descriptor.Digest)
	}
	if _, err := (ti.Image{Layers: []ti.Layer{{Blob: []byte("x")}}}).Build(); err == nil {
		t.Error("a Blob layer without MediaType was accepted")
	}
}

// TestEntriesTar reads the entries back with archive/tar.
func TestEntriesTar(t *testing.T) {
	mt := time.Date(2021, 2, 3, 4, 5, 6, 789, time.UTC)
	long := strings.Repeat("名", 80) // 240 bytes: needs PAX
	data, err := ti.TarEntries([]ti.Entry{
		ti.Dir("d", 0o755),
		ti.File("d/f", []byte("abc"), 0o644).WithMtime(mt).WithXattr("user.a", "1").WithXattr("security.b", "2").WithOwner(5, 6),
		ti.Hardlink("d/h", "d/f"),
		ti.Symlink("d/s", "f"),
		ti.Whiteout("d/gone"),
		ti.Whiteout("top"),
		ti.Opaque("d"),
		ti.Opaque(""),
		ti.FIFO("d/p", 0o600),
		ti.CharDevice("d/c", 0o666, 1, 5),
		ti.BlockDevice("d/b", 0o660, 7, 0),
		ti.File("d/"+long, nil, 0o644),
	})
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(bytes.NewReader(data))
	var got []string
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, h.Name)
		switch h.Name {
		case "d/f":
			body, _ := io.ReadAll(tr)
			if string(body) != "abc" || !h.ModTime.Equal(mt) || h.Uid != 5 || h.Gid != 6 ||
				h.PAXRecords["SCHILY.xattr.user.a"] != "1" || h.PAXRecords["SCHILY.xattr.security.b"] != "2" {
				t.Errorf("d/f: %+v body %q", h, body)
			}
		case "d/h":
			if h.Typeflag != tar.TypeLink || h.Linkname != "d/f" {
				t.Errorf("d/h: %+v", h)
			}
		case "d/c":
			if h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 5 {
				t.Errorf("d/c: %+v", h)
			}
		case "d/b":
			if h.Typeflag != tar.TypeBlock || h.Devmajor != 7 {
				t.Errorf("d/b: %+v", h)
			}
		case "d/p":
			if h.Typeflag != tar.TypeFifo {
				t.Errorf("d/p: %+v", h)
			}
		}
	}
	want := []string{"d/", "d/f", "d/h", "d/s", "d/.wh.gone", ".wh.top", "d/.wh..wh..opq", ".wh..wh..opq", "d/p", "d/c", "d/b", "d/" + long}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Errorf("names\n%q\nwant\n%q", got, want)
	}
}

// TestWriteArchive checks the OCI archive layout and that every blob is
// stored under its digest.
func TestWriteArchive(t *testing.T) {
	img, err := ti.BusyboxImage(ti.Layer{Entries: []ti.Entry{ti.File("etc/x", []byte("x"), 0o644)}})
	if err != nil {
		t.Fatal(err)
	}
	built, err := img.Build()
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := built.WriteArchive(&buf, "example.com/ns/img:v2"); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	tr := tar.NewReader(&buf)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(tr)
		files[h.Name] = body
	}
	if string(files["oci-layout"]) != `{"imageLayoutVersion":"1.0.0"}` {
		t.Errorf("oci-layout = %s", files["oci-layout"])
	}
	var index ocispec.Index
	if err := json.Unmarshal(files["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	if len(index.Manifests) != 1 {
		t.Fatalf("index %+v", index)
	}
	m := index.Manifests[0]
	if m.Digest != built.Manifest.Descriptor.Digest || m.Annotations["io.containerd.image.name"] != "example.com/ns/img:v2" ||
		m.Annotations[ocispec.AnnotationRefName] != "v2" || m.Platform == nil || m.Platform.OS != "linux" {
		t.Errorf("index manifest descriptor %+v", m)
	}
	for _, b := range built.Blobs() {
		data, ok := files["blobs/sha256/"+b.Descriptor.Digest.Encoded()]
		if !ok || digest.FromBytes(data) != b.Descriptor.Digest {
			t.Errorf("blob %s missing or corrupt", b.Descriptor.Digest)
		}
	}
}

// TestTarDirRoundTrip tars a tree with TarDir, extracts it with GNU tar and
// compares both trees with testenv.Snapshot: TarDir keeps every attribute.
func TestTarDirRoundTrip(t *testing.T) {
	testenv.RequireRoot(t)
	src := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(src, "a/b"), 0o750))
	must(os.WriteFile(filepath.Join(src, "a/f"), []byte("data"), 0o644))
	must(os.Link(filepath.Join(src, "a/f"), filepath.Join(src, "a/b/hard")))
	must(os.Symlink("../f", filepath.Join(src, "a/b/sym")))
	must(unix.Mkfifo(filepath.Join(src, "fifo"), 0o640))
	must(unix.Mknod(filepath.Join(src, "a/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
	must(unix.Lsetxattr(filepath.Join(src, "a/f"), "user.k", []byte("v"), 0))
	must(unix.Lsetxattr(filepath.Join(src, "a/b"), "trusted.t", []byte("x"), 0))
	must(os.Lchown(filepath.Join(src, "a/b/sym"), 7, 8))
	mt := time.Date(2022, 2, 2, 2, 2, 2, 222222222, time.UTC)
	for _, p := range []string{"a/f", "fifo", "a/b", "a"} {
		must(os.Chtimes(filepath.Join(src, p), mt, mt))
	}

	var buf bytes.Buffer
	must(ti.TarDir(&buf, src))
	dst := t.TempDir()
	cmd := exec.Command("tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-", "-C", dst)
	cmd.Stdin = &buf
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("tar -x: %v\n%s", err, out)
	}
	a, err := testenv.Snapshot(src)
	must(err)
	b, err := testenv.Snapshot(dst)
	must(err)
	// The root is not in the tar; symlink mtimes are not restored by GNU tar.
	delete(a, "/")
	delete(b, "/")
	for p, fi := range a {
		if fi.Type == "symlink" {
			fi.Mtime = 0
			a[p] = fi
			fb := b[p]
			fb.Mtime = 0
			b[p] = fb
		}
	}
	if d := testenv.Diff(a, b); len(d) > 0 {
		t.Errorf("tree changed through TarDir and tar -x:\n%s", strings.Join(d, "\n"))
	}
}
