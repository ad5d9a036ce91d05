package testimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"runtime"
	"time"

	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Compression of a layer blob.
type Compression int

const (
	Gzip         Compression = iota // application/vnd.oci.image.layer.v1.tar+gzip (default)
	Zstd                            // application/vnd.oci.image.layer.v1.tar+zstd
	Uncompressed                    // application/vnd.oci.image.layer.v1.tar
)

func (c Compression) String() string {
	switch c {
	case Gzip:
		return "gzip"
	case Zstd:
		return "zstd"
	case Uncompressed:
		return "uncompressed"
	}
	return fmt.Sprintf("Compression(%d)", int(c))
}

// MediaType is the OCI layer media type for the compression.
func (c Compression) MediaType() string {
	switch c {
	case Zstd:
		return ocispec.MediaTypeImageLayerZstd
	case Uncompressed:
		return ocispec.MediaTypeImageLayer
	}
	return ocispec.MediaTypeImageLayerGzip
}

// Layer is one image layer. Its uncompressed tar is Raw when set, else the
// Entries written in order (verbatim: parents are not added implicitly, so
// tests can build unusual tars). Blob, when set, bypasses all of that: it is
// the layer blob as stored, with DiffID and MediaType given by the caller
// (e.g. a pre-converted DAXFS layer).
type Layer struct {
	Entries     []Entry
	Raw         []byte
	Compression Compression

	Blob      []byte
	DiffID    digest.Digest // for Blob; default: the blob's digest
	MediaType string        // overrides the media type derived from Compression

	Annotations map[string]string // on the layer descriptor
}

// Tar returns the layer's uncompressed tar. For a Blob layer it returns the
// blob.
func (l Layer) Tar() ([]byte, error) {
	if l.Blob != nil {
		return l.Blob, nil
	}
	if l.Raw != nil {
		return l.Raw, nil
	}
	return TarEntries(l.Entries)
}

// TarEntries writes the entries as one tar stream.
func TarEntries(entries []Entry) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.Header
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.Data))
		}
		if err := tw.WriteHeader(&h); err != nil {
			return nil, fmt.Errorf("tar entry %q: %w", h.Name, err)
		}
		if len(e.Data) > 0 {
			if _, err := tw.Write(e.Data); err != nil {
				return nil, fmt.Errorf("tar entry %q: %w", h.Name, err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Compress compresses an uncompressed layer tar, deterministically.
func Compress(tarData []byte, c Compression) ([]byte, error) {
	var buf bytes.Buffer
	switch c {
	case Uncompressed:
		return tarData, nil
	case Gzip:
		zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
		if err != nil {
			return nil, err
		}
		if _, err := zw.Write(tarData); err != nil {
			return nil, err
		}
		if err := zw.Close(); err != nil {
			return nil, err
		}
	case Zstd:
		zw, err := zstd.NewWriter(&buf, zstd.WithEncoderConcurrency(1))
		if err != nil {
			return nil, err
		}
		if _, err := zw.Write(tarData); err != nil {
			return nil, err
		}
		if err := zw.Close(); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown compression %v", c)
	}
	return buf.Bytes(), nil
}

// Image describes an image to build.
type Image struct {
	Layers []Layer
	// Config is the runtime config (Cmd, Env, Entrypoint, WorkingDir, ...).
	// Zero Env gets a default PATH; zero Cmd and Entrypoint get ["/bin/sh"].
	Config ocispec.ImageConfig
	// Platform defaults to linux/GOARCH.
	Platform ocispec.Platform
	// Created defaults to DefaultMtime().
	Created time.Time
	// ManifestAnnotations are put on the manifest.
	ManifestAnnotations map[string]string
}

// Blob is a content-addressed blob and its descriptor.
type Blob struct {
	Descriptor ocispec.Descriptor
	Data       []byte
}

func newBlob(mediaType string, data []byte) Blob {
	return Blob{
		Descriptor: ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(data), Size: int64(len(data))},
		Data:       data,
	}
}

// Built is a built image: its blobs and the facts tests assert on.
type Built struct {
	Manifest Blob
	Config   Blob
	Layers   []Blob
	// DiffIDs are the digests of the uncompressed layer tars, in order
	// (the config's rootfs.diff_ids).
	DiffIDs []digest.Digest
	// Platform of the manifest.
	Platform ocispec.Platform
}

// ChainIDs returns the chain IDs of the layers (the committed snapshot
// keys containerd uses when it unpacks the image).
func (b *Built) ChainIDs() []digest.Digest {
	return identity.ChainIDs(append([]digest.Digest(nil), b.DiffIDs...))
}

// Build compresses the layers and writes config and manifest.
func (img Image) Build() (*Built, error) {
	b := &Built{Platform: img.Platform}
	if b.Platform.OS == "" {
		b.Platform.OS = "linux"
	}
	if b.Platform.Architecture == "" {
		b.Platform.Architecture = runtime.GOARCH
	}
	for i, l := range img.Layers {
		var blob Blob
		var diffID digest.Digest
		if l.Blob != nil {
			mt := l.MediaType
			if mt == "" {
				return nil, fmt.Errorf("layer %d: a Blob layer needs a MediaType", i)
			}
			blob = newBlob(mt, l.Blob)
			diffID = l.DiffID
			if diffID == "" {
				diffID = blob.Descriptor.Digest
			}
		} else {
			tarData, err := l.Tar()
			if err != nil {
				return nil, fmt.Errorf("layer %d: %w", i, err)
			}
			data, err := Compress(tarData, l.Compression)
			if err != nil {
				return nil, fmt.Errorf("layer %d: %w", i, err)
			}
			mt := l.MediaType
			if mt == "" {
				mt = l.Compression.MediaType()
			}
			blob = newBlob(mt, data)
			diffID = digest.FromBytes(tarData)
		}
		blob.Descriptor.Annotations = l.Annotations
		b.Layers = append(b.Layers, blob)
		b.DiffIDs = append(b.DiffIDs, diffID)
	}

	created := img.Created
	if created.IsZero() {
		created = DefaultMtime()
	}
	cfg := img.Config
	if cfg.Env == nil {
		cfg.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	if cfg.Cmd == nil && cfg.Entrypoint == nil {
		cfg.Cmd = []string{"/bin/sh"}
	}
	config := ocispec.Image{
		Created:  &created,
		Platform: b.Platform,
		Config:   cfg,
		RootFS:   ocispec.RootFS{Type: "layers", DiffIDs: b.DiffIDs},
	}
	if config.RootFS.DiffIDs == nil {
		config.RootFS.DiffIDs = []digest.Digest{}
	}
	configData, err := json.Marshal(config)
	if err != nil {
		return nil, err
	}
	b.Config = newBlob(ocispec.MediaTypeImageConfig, configData)

	manifest := ocispec.Manifest{
		Versioned:   specs.Versioned{SchemaVersion: 2},
		MediaType:   ocispec.MediaTypeImageManifest,
		Config:      b.Config.Descriptor,
		Layers:      []ocispec.Descriptor{},
		Annotations: img.ManifestAnnotations,
	}
	for _, l := range b.Layers {
		manifest.Layers = append(manifest.Layers, l.Descriptor)
	}
	manifestData, err := json.Marshal(manifest)
	if err != nil {
		return nil, err
	}
	b.Manifest = newBlob(ocispec.MediaTypeImageManifest, manifestData)
	p := b.Platform
	b.Manifest.Descriptor.Platform = &p
	return b, nil
}

// Blobs returns every blob of the image: manifest, config, layers.
func (b *Built) Blobs() []Blob {
	return append([]Blob{b.Manifest, b.Config}, b.Layers...)
}

// WriteArchive writes the image as an OCI image archive: a tar holding
// oci-layout, index.json and blobs/sha256/<hex>, importable with
// `ctr image import`. A non-empty name (a full reference such as
// "docker.io/library/busybox:latest") is recorded in index.json as
// io.containerd.image.name and, its tag, as org.opencontainers.image.ref.name,
// so ctr imports the image under that name.
func (b *Built) WriteArchive(w io.Writer, name string) error {
	desc := b.Manifest.Descriptor
	if name != "" {
		desc.Annotations = map[string]string{
			"io.containerd.image.name": name,
			ocispec.AnnotationRefName:  refTag(name),
		}
	}
	index := ocispec.Index{
		Versioned: specs.Versioned{SchemaVersion: 2},
		MediaType: ocispec.MediaTypeImageIndex,
		Manifests: []ocispec.Descriptor{desc},
	}
	indexData, err := json.Marshal(index)
	if err != nil {
		return err
	}
	layoutData, err := json.Marshal(ocispec.ImageLayout{Version: ocispec.ImageLayoutVersion})
	if err != nil {
		return err
	}

	tw := tar.NewWriter(w)
	file := func(name string, data []byte) error {
		h := &tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: 0o644, Size: int64(len(data)), ModTime: DefaultMtime()}
		if err := tw.WriteHeader(h); err != nil {
			return err
		}
		_, err := tw.Write(data)
		return err
	}
	dir := func(name string) error {
		return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755, ModTime: DefaultMtime()})
	}
	if err := file(ocispec.ImageLayoutFile, layoutData); err != nil {
		return err
	}
	if err := dir("blobs/"); err != nil {
		return err
	}
	if err := dir("blobs/sha256/"); err != nil {
		return err
	}
	seen := map[digest.Digest]bool{}
	for _, bl := range b.Blobs() {
		d := bl.Descriptor.Digest
		if seen[d] {
			continue // two identical layers share one blob
		}
		seen[d] = true
		if err := file("blobs/"+d.Algorithm().String()+"/"+d.Encoded(), bl.Data); err != nil {
			return err
		}
	}
	if err := file("index.json", indexData); err != nil {
		return err
	}
	return tw.Close()
}

// refTag returns the tag of a reference ("latest" when it has none).
func refTag(ref string) string {
	for i := len(ref) - 1; i >= 0; i-- {
		switch ref[i] {
		case ':':
			return ref[i+1:]
		case '/', '@':
			return "latest"
		}
	}
	return "latest"
}
