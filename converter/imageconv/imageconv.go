// Package imageconv converts whole OCI images into pre-converted DAXFS
// images with containerd's image converter framework: every layer blob
// (tar, gzip or zstd) is replaced by its DAXFS layer image, of media type
// converter.MediaTypeLayer, and the config's rootfs.diff_ids are updated
// to the new blobs' digests (a layer image is not compressed, so its
// diffID is its digest). The result can be pushed to a registry like any
// image; the daxfs differ copies such layers into the region verbatim.
//
//	newImg, err := ctrconverter.Convert(ctx, client, dstRef, srcRef,
//		ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc()),
//		ctrconverter.WithDockerToOCI(true))
//
// Snapshotters other than daxfs cannot unpack such images, and containerd
// only unpacks them when the transfer service's unpack_config lists the
// media type in layer_types.
package imageconv

import (
	"context"
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/images"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/pkg/labels"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
)

// LayerConvertFunc returns a ConvertFunc that converts OCI and Docker layer
// blobs to DAXFS layer images. Other descriptors, non-distributable layers
// and layers that already are DAXFS images are left alone (nil, nil).
func LayerConvertFunc() ctrconverter.ConvertFunc {
	return func(ctx context.Context, cs content.Store, desc ocispec.Descriptor) (*ocispec.Descriptor, error) {
		if desc.MediaType == converter.MediaTypeLayer || !images.IsLayerType(desc.MediaType) || images.IsNonDistributable(desc.MediaType) {
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

		dgst, err := digestOf(tmp, res.Size)
		if err != nil {
			return nil, err
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
		if _, err := io.Copy(w, io.NewSectionReader(tmp, 0, res.Size)); err != nil {
			return nil, fmt.Errorf("layer %s: storing image: %w", desc.Digest, err)
		}
		// The blob is its own uncompressed form: GetDiffID reads this
		// label for media types it does not know.
		lbl := map[string]string{labels.LabelUncompressed: dgst.String()}
		if err := w.Commit(ctx, res.Size, dgst, content.WithLabels(lbl)); err != nil && !errdefs.IsAlreadyExists(err) {
			return nil, fmt.Errorf("layer %s: committing image: %w", desc.Digest, err)
		}
		log.G(ctx).WithField("layer", desc.Digest).WithField("image", dgst).Debug("converted layer to a DAXFS layer image")

		out := desc
		out.MediaType = converter.MediaTypeLayer
		out.Digest = dgst
		out.Size = res.Size
		if len(desc.Annotations) > 0 {
			out.Annotations = make(map[string]string, len(desc.Annotations))
			for k, v := range desc.Annotations {
				if k != labels.LabelUncompressed {
					out.Annotations[k] = v
				}
			}
		}
		return &out, nil
	}
}

func digestOf(f *os.File, size int64) (digest.Digest, error) {
	d := digest.Canonical.Digester()
	if _, err := io.Copy(d.Hash(), io.NewSectionReader(f, 0, size)); err != nil {
		return "", err
	}
	return d.Digest(), nil
}
