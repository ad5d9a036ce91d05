// Package imageconv converts whole OCI images into pre-converted DAXFS
// images with containerd's image converter framework: every layer blob
// (tar, gzip or zstd) is replaced by its DAXFS layer image, zstd
// compressed (converter.MediaTypeLayerZstd) unless WithCompression(None)
// asks for the bare image (converter.MediaTypeLayer), and the config's
// rootfs.diff_ids are updated to the digests of the uncompressed images.
// The result can be pushed to a registry like any image; the daxfs differ
// validates such layers and copies them into the region as they are.
//
//	newImg, err := ctrconverter.Convert(ctx, client, dstRef, srcRef,
//		ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc()),
//		ctrconverter.WithDockerToOCI(true))
//
// Every containerd client counts such layers as layers (their media types
// carry the OCI layer prefix), so nerdctl, client.Pull, the transfer
// service and CRI all pull and unpack them with the daxfs snapshotter
// (each layer carries its diffID in the annotation
// containerd.io/snapshot/diff-id for clients that do not tell the
// snapshotter which layer they unpack);
// other snapshotters refuse them (containerd's differs know no processor
// for the media type) rather than unpack them as tars.
package imageconv

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/klauspost/compress/zstd"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
)

// Compression is how a converted layer image is stored in the blob.
type Compression int

const (
	// Zstd compresses the image (MediaTypeLayerZstd): the default.
	Zstd Compression = iota
	// None stores the bare image (MediaTypeLayer).
	None
)

// Option configures LayerConvertFunc.
type Option func(*options)

type options struct{ compression Compression }

// WithCompression sets how converted layer images are stored.
func WithCompression(c Compression) Option { return func(o *options) { o.compression = c } }

// LayerConvertFunc returns a ConvertFunc that converts OCI and Docker layer
// blobs to DAXFS layer images. Other descriptors, non-distributable layers
// and layers that already are DAXFS images (of either media type) are left
// alone (nil, nil).
func LayerConvertFunc(opts ...Option) ctrconverter.ConvertFunc {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	return func(ctx context.Context, cs content.Store, desc ocispec.Descriptor) (*ocispec.Descriptor, error) {
		if converter.IsPreconverted(desc.MediaType) || !images.IsLayerType(desc.MediaType) || images.IsNonDistributable(desc.MediaType) {
			return nil, nil
		}
		ra, err := cs.ReaderAt(ctx, desc)
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", desc.Digest, err)
		}
		defer ra.Close()

		tmp, err := os.CreateTemp("", "daxfs-layer-*")
		if err != nil {
			return nil, err
		}
		defer func() {
			tmp.Close()
			os.Remove(tmp.Name())
		}()
		res, err := converter.ConvertLayer(ctx, io.NewSectionReader(ra, 0, ra.Size()), tmp, converter.LayerOptions{})
		if err != nil {
			return nil, fmt.Errorf("converting layer %s: %w", desc.Digest, err)
		}
		if want, ok := desc.Annotations[labels.LabelUncompressed]; ok && want != res.DiffID.String() {
			return nil, fmt.Errorf("layer %s: diffID %s does not match its annotation %s: %w", desc.Digest, res.DiffID, want, errdefs.ErrFailedPrecondition)
		}

		// The new layer's diffID is the digest of the image itself
		// (res.DiffID is the source tar's).
		diffID, err := digestOf(tmp, res.Size)
		if err != nil {
			return nil, err
		}
		blob, mediaType := io.Reader(io.NewSectionReader(tmp, 0, res.Size)), converter.MediaTypeLayer
		if o.compression == Zstd {
			zr := compressed(blob)
			defer zr.Close() // stops the compressor if storing fails
			blob, mediaType = zr, converter.MediaTypeLayerZstd
		}
		ref := "convert-daxfs-from-" + desc.Digest.String()
		w, err := content.OpenWriter(ctx, cs, content.WithRef(ref))
		if err != nil {
			return nil, fmt.Errorf("layer %s: opening content writer: %w", desc.Digest, err)
		}
		defer w.Close()
		if err := w.Truncate(0); err != nil {
			return nil, err
		}
		n, err := io.Copy(w, blob)
		if err != nil {
			return nil, fmt.Errorf("layer %s: storing image: %w", desc.Digest, err)
		}
		dgst := w.Digest()
		// GetDiffID reads this label for media types it does not know:
		// the config's diff_ids become the uncompressed images' digests.
		lbl := map[string]string{labels.LabelUncompressed: diffID.String()}
		if err := w.Commit(ctx, n, dgst, content.WithLabels(lbl)); err != nil && !errdefs.IsAlreadyExists(err) {
			return nil, fmt.Errorf("layer %s: committing image: %w", desc.Digest, err)
		}
		log.G(ctx).WithField("layer", desc.Digest).WithField("image", dgst).WithField("mediaType", mediaType).Debug("converted layer to a DAXFS layer image")

		out := desc
		out.MediaType = mediaType
		out.Digest = dgst
		out.Size = n
		out.Annotations = make(map[string]string, len(desc.Annotations)+1)
		for k, v := range desc.Annotations {
			if k != labels.LabelUncompressed {
				out.Annotations[k] = v
			}
		}
		// The unpacker passes a layer's containerd.io/snapshot/
		// annotations to the snapshotter as labels of its extraction
		// snapshot. containerd 2.4 labels it with the layer's diffID
		// itself; older clients (containerd 2.2 in nerdctl 2.2) do not,
		// and without it the daxfs snapshotter cannot tell which layer
		// it is unpacking (the walking differ, which cannot unpack a
		// DAXFS image, would get the layer). Our differ checks the
		// digest it computes against it.
		out.Annotations[snapshots.LabelSnapshotDiffID] = diffID.String()
		return &out, nil
	}
}

// compressed returns a zstd compression of r, made as it is read; Close
// stops it.
func compressed(r io.Reader) io.ReadCloser {
	pr, pw := io.Pipe()
	go func() {
		// One encoder goroutine: containerd's converter converts all of
		// an image's layers at once, and an encoder per CPU for each
		// would multiply the memory by the layer count.
		zw, err := zstd.NewWriter(pw, zstd.WithEncoderLevel(zstd.SpeedDefault), zstd.WithEncoderConcurrency(1))
		if err != nil {
			pw.CloseWithError(err)
			return
		}
		if _, err := io.Copy(zw, r); err != nil {
			zw.Close()
			pw.CloseWithError(fmt.Errorf("compressing: %w", err))
			return
		}
		pw.CloseWithError(zw.Close())
	}()
	return pr
}

func digestOf(f *os.File, size int64) (digest.Digest, error) {
	d := digest.Canonical.Digester()
	if _, err := io.Copy(d.Hash(), io.NewSectionReader(f, 0, size)); err != nil {
		return "", err
	}
	return d.Digest(), nil
}
