package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// ContentFunc returns the content store layer blobs are read from, for the
// namespace in ctx. The daemon connects to containerd lazily through it.
type ContentFunc func(ctx context.Context) (content.Provider, error)

// Differ is the diff.Applier served as containerd's "daxfs-diff" proxy
// plugin. It converts a layer blob straight into the region in one pass
// for our extraction snapshots; for every other mount it answers
// ErrNotImplemented so containerd's diff service moves on to the walking
// differ.
type Differ struct {
	s       *Snapshotter
	content ContentFunc
	opts    DifferOptions
}

// DifferOptions configure a Differ.
type DifferOptions struct {
	// ContentRoot is the directory of containerd's local content store
	// (<containerd root>/io.containerd.content.v1.content) when the
	// daemon runs beside containerd: layer blobs are read from its files.
	// Empty: always through the content API.
	ContentRoot string
}

var (
	_ diff.Applier  = (*Differ)(nil)
	_ diff.Comparer = (*Differ)(nil)
)

// NewDiffer returns the Applier for s, reading blobs from content.
func NewDiffer(s *Snapshotter, content ContentFunc, opts DifferOptions) *Differ {
	return &Differ{s: s, content: content, opts: opts}
}

// Compare is not ours to do: containerd's walking differ computes diffs.
func (d *Differ) Compare(ctx context.Context, lower, upper []mount.Mount, opts ...diff.Opt) (ocispec.Descriptor, error) {
	return ocispec.Descriptor{}, fmt.Errorf("daxfs differ does not compare mounts: %w", errdefs.ErrNotImplemented)
}

// stagingID returns the snapshot ID of one of our writable mounts.
func (s *Snapshotter) stagingID(mounts []mount.Mount) (string, bool) {
	upper, ok := overlay.UpperDir(mounts)
	if !ok {
		return "", false
	}
	snaps := filepath.Join(s.root, "snapshots") + "/"
	rest, ok := strings.CutPrefix(upper, snaps)
	if !ok {
		return "", false
	}
	id, fs, ok := strings.Cut(rest, "/")
	if !ok || fs != "fs" || id == "" {
		return "", false
	}
	return id, true
}

// isStagedMount reports whether mounts are the read-only mount of an
// extraction whose layer the region already holds.
func (s *Snapshotter) isStagedMount(mounts []mount.Mount) bool {
	return len(mounts) == 1 && mounts[0].Type == "bind" && mounts[0].Source == s.emptyDir() && mounts[0].ReadOnly()
}

// Apply converts the layer desc into the region for the extraction
// snapshot behind mounts.
func (d *Differ) Apply(ctx context.Context, desc ocispec.Descriptor, mounts []mount.Mount, opts ...diff.ApplyOpt) (ocispec.Descriptor, error) {
	s := d.s
	if s.isStagedMount(mounts) {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s is already staged from the region: %w", desc.Digest, errdefs.ErrFailedPrecondition)
	}
	id, ok := s.stagingID(mounts)
	if !ok {
		return ocispec.Descriptor{}, fmt.Errorf("mounts are not a daxfs extraction snapshot: %w", errdefs.ErrNotImplemented)
	}
	st, ok, err := s.readStage(id)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if !ok {
		// A container's or a parentless test snapshot: the walking differ
		// applies into its upper and Commit converts it.
		return ocispec.Descriptor{}, fmt.Errorf("snapshot %s is not an extraction snapshot: %w", id, errdefs.ErrNotImplemented)
	}
	if st.Hit || st.Applied {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s is already in the region: %w", st.DiffID, errdefs.ErrFailedPrecondition)
	}
	if !isLayerType(desc.MediaType) {
		return ocispec.Descriptor{}, fmt.Errorf("media type %q of %s: %w", desc.MediaType, desc.Digest, errdefs.ErrNotImplemented)
	}
	var config diff.ApplyConfig
	for _, o := range opts {
		if err := o(ctx, desc, &config); err != nil {
			return ocispec.Descriptor{}, err
		}
	}
	// Processor payloads are not a reason to decline: stream processors
	// (decryption) apply to media types of their own (+encrypted), none
	// of which isLayerType accepts, and clients send payloads for every
	// layer (nerdctl's imgcrypt unpack option does).

	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	start := time.Now()
	log.G(ctx).WithField("blob", desc.Digest).Debug("apply")
	out, size, err := d.convert(ctx, desc, st)
	if err != nil || size > 0 {
		s.metrics.converted(size, time.Since(start), err)
	}
	if err == nil && size > 0 {
		s.metrics.LayersApplied.Add(1)
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s (diffID %s): %w", desc.Digest, st.DiffID, err)
	}
	st.Applied = true
	if err := s.writeStage(id, st); err != nil {
		return ocispec.Descriptor{}, err
	}
	return out, nil
}

// convert streams blob desc into a layer image in the region under the
// layer's diffID. It returns the uncompressed layer's descriptor and the
// image size, 0 when another participant had converted the layer.
func (d *Differ) convert(ctx context.Context, desc ocispec.Descriptor, st stage) (ocispec.Descriptor, int64, error) {
	s := d.s
	key, err := regionKey(st.DiffID)
	if err != nil {
		return ocispec.Descriptor{}, 0, err
	}
	done := ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: st.DiffID}
	ra, err := d.openBlob(ctx, desc)
	if err != nil {
		return ocispec.Descriptor{}, 0, fmt.Errorf("opening blob: %w", err)
	}
	defer ra.Close()
	// A layer image is larger than its blob: the blob is compressed and
	// every file's data starts on a page. Claim a generous bound (Publish
	// gives the unused tail back) and, when the image still does not fit,
	// convert again with a larger one, up to the largest free extent. A
	// pre-converted layer states its size: a compressed image of small
	// files can be dozens of times its blob, past any guess.
	bound := max(desc.Size*8, 64<<20)
	if converter.IsPreconverted(desc.MediaType) {
		n, ok, err := converter.ImageSize(io.NewSectionReader(ra, 0, ra.Size()))
		switch {
		case err != nil:
			log.G(ctx).WithError(err).WithField("blob", desc.Digest).Debug("pre-converted layer states no usable size: guessing")
		case ok:
			bound = (n + daxfs.BlockSize - 1) / daxfs.BlockSize * daxfs.BlockSize
		}
	}
	for {
		limit := s.region.Stats().LargestFree
		if s.maxSize > 0 {
			limit = min(limit, s.maxSize)
		}
		bound = min(bound, limit)
		c, _, err := s.claim(ctx, daxmem.KindLayer, key, func() (int64, daxmem.ClaimOptions, error) {
			// Deferred: the bound is backed with memory only as the
			// image grows into it (populating all of it up front cost
			// more than the conversion for a 100 MB blob).
			return bound, daxmem.ClaimOptions{Deferred: true}, nil
		})
		if err != nil {
			return ocispec.Descriptor{}, 0, err
		}
		if c == nil {
			// Converted by another participant meanwhile: same diffID,
			// same layer. Nothing to download.
			return done, 0, nil
		}
		start := time.Now()
		blob := newPrefetchReader(ctx, ra, ra.Size(), 4)
		res, err := converter.ConvertLayer(ctx, blob, layerWindow(c), converter.LayerOptions{MaxSize: s.maxSize})
		blob.Close()
		log.G(ctx).WithField("blob", desc.Digest).WithField("took", time.Since(start)).WithField("fetching", blob.waited).Debug("converted blob")
		if errors.Is(err, daxfs.ErrNoSpace) {
			_ = c.Abort(ctx)
			if bound >= limit {
				return ocispec.Descriptor{}, 0, fmt.Errorf("layer image larger than the %d bytes available (largest free extent of the region, or max_layer_size): %w", limit, errdefs.ErrResourceExhausted)
			}
			log.G(ctx).WithField("bound", bound).Debug("layer image larger than claimed: converting again with more")
			bound *= 4
			continue
		}
		if err != nil {
			_ = c.Abort(ctx)
			// A region (or tmpfs) too full to back the image is
			// ResourceExhausted, not the layer's fault.
			return ocispec.Descriptor{}, 0, regionErr(err)
		}
		if res.DiffID != st.DiffID {
			_ = c.Abort(ctx)
			return ocispec.Descriptor{}, 0, fmt.Errorf("computed diffID %s does not match %s: %w", res.DiffID, st.DiffID, errdefs.ErrFailedPrecondition)
		}
		if err := daxfs.Validate(c.Bytes()[:res.Size]); err != nil {
			_ = c.Abort(ctx)
			return ocispec.Descriptor{}, 0, fmt.Errorf("converted image is invalid: %w", err)
		}
		if _, err := c.Publish(ctx, res.Size); err != nil {
			_ = c.Abort(ctx)
			return ocispec.Descriptor{}, 0, fmt.Errorf("publishing: %w", regionErr(err))
		}
		done.Size = res.TarSize
		log.G(ctx).WithField("diffID", st.DiffID).WithField("size", res.Size).Debug("layer converted into the region")
		return done, res.Size, nil
	}
}

// layerWindow is where a layer image is written in claim c: through the
// region file where the backend has one (the cheapest way to fill new
// tmpfs pages), else through the mapping, backed as the image grows.
func layerWindow(c *daxmem.Claim) *daxfs.Window {
	if f := c.WriterAt(); f != nil {
		return daxfs.NewFileWindow(c.Bytes(), f, c.Reserve)
	}
	return daxfs.NewReservingWindow(c.Bytes(), c.Reserve)
}

func isLayerType(mt string) bool {
	switch mt {
	case ocispec.MediaTypeImageLayer, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd,
		images.MediaTypeDockerSchema2Layer, images.MediaTypeDockerSchema2LayerGzip,
		ocispec.MediaTypeImageLayerNonDistributable, ocispec.MediaTypeImageLayerNonDistributableGzip, //nolint:staticcheck // still served by registries
		ocispec.MediaTypeImageLayerNonDistributableZstd: //nolint:staticcheck
		return true
	}
	return converter.IsPreconverted(mt) // validated and copied as it is
}
