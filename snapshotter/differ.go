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
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
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
	var (
		info snapshots.Info
		st   stage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		info, st, ok, err = extraction(ctx, id)
		return err
	})
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	if !ok {
		// A container's or a parentless test snapshot: the walking differ
		// applies into its upper and Commit converts it.
		return ocispec.Descriptor{}, fmt.Errorf("snapshot %s is not an extraction snapshot: %w", id, errdefs.ErrNotImplemented)
	}
	if st.staged() {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s is already in the region: %w", st.DiffID, errdefs.ErrFailedPrecondition)
	}
	content, ok := converter.ContentOf(desc.MediaType)
	if !ok {
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
	// of which converter.ContentOf accepts, and clients send payloads for every
	// layer (nerdctl's imgcrypt unpack option does).

	ns, err := namespaces.NamespaceRequired(ctx)
	if err != nil {
		return ocispec.Descriptor{}, err
	}
	ctx = namespaces.WithNamespace(ctx, ns)
	start := time.Now()
	log.G(ctx).WithField("blob", desc.Digest).Debug("apply")
	diffID, proven := st.DiffID, false
	if diffID == "" {
		// The unpacker did not name the layer (containerd 2.2's client
		// unpack): its diffID is the digest of the blob's content,
		// which proves the blob to be that layer.
		if diffID, err = d.contentDigest(ctx, desc); err != nil {
			return ocispec.Descriptor{}, fmt.Errorf("layer %s: %w", desc.Digest, err)
		}
		proven = true
	}
	res, err := d.apply(ctx, desc, content, diffID, proven)
	if err != nil || res.size > 0 {
		s.metrics.converted(res.size, time.Since(start), err)
	}
	if err == nil && (res.size > 0 || res.shared) {
		s.metrics.LayersApplied.Add(1)
	}
	if err == nil && res.shared {
		s.metrics.LayersShared.Add(1)
	}
	if err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s (diffID %s): %w", desc.Digest, diffID, err)
	}
	if err := s.recordApplied(ctx, id, info.Name, st.DiffID, diffID, res.layer); err != nil {
		return ocispec.Descriptor{}, fmt.Errorf("layer %s (diffID %s): %w", desc.Digest, diffID, err)
	}
	return ocispec.Descriptor{MediaType: ocispec.MediaTypeImageLayer, Digest: diffID, Size: res.tarSize}, nil
}

// recordApplied records in the stage of extraction snapshot name (ID id)
// that our differ applied its layer diffID as region image layer, which
// apply referenced. The reference is taken again under refMu, since a Remove
// may have dropped it meanwhile (no snapshot recorded it yet); if the
// snapshot was removed or applied meanwhile, it is given back unless
// another snapshot uses the image.
func (s *Snapshotter) recordApplied(ctx context.Context, id, name string, was, diffID, layer digest.Digest) error {
	s.refMu.Lock()
	defer s.refMu.Unlock()
	if err := s.refLayer(layer); err != nil {
		return err
	}
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		sid, info, _, err := storage.GetInfo(ctx, name)
		if err != nil {
			return err
		}
		if sid != id {
			return fmt.Errorf("snapshot %s was removed while its layer was applied: %w", name, errdefs.ErrNotFound)
		}
		st, ok, err := stageOf(info)
		if err != nil {
			return err
		}
		if !ok || st.DiffID != was || st.staged() {
			return fmt.Errorf("snapshot %s changed while its layer was applied: %w", name, errdefs.ErrFailedPrecondition)
		}
		st.DiffID, st.Applied, st.Layer = diffID, true, layer
		return setStage(ctx, info, st)
	})
	if err != nil {
		s.unrefUnlessUsed(ctx, layer)
		return fmt.Errorf("recording the applied layer: %w", err)
	}
	return nil
}

// applied is what apply did: the layer image the extraction snapshot now
// references (its region key), the image bytes it wrote (0: the region
// had the image) and the uncompressed length it read (0 when it read
// nothing).
type applied struct {
	layer   digest.Digest
	size    int64
	tarSize int64
	// shared: the blob was streamed and its image found identical to one
	// the region held under another key.
	shared bool
}

// apply puts the layer blob desc declares into the region, referenced by
// us, under the layer's diffID st.DiffID. A region image of that layer is
// used only once it is proven to be desc's content: made from (or checked
// against) this very blob, which the caller's namespace holds, or checked
// now by hashing the blob's content to the diffID. Otherwise the blob is
// converted, its diffID checked, and the image published (or, identical
// to one in the region, shared); the blob's digest is recorded as an
// alias either way, so the next participant or namespace with this blob
// converts nothing.
func (d *Differ) apply(ctx context.Context, desc ocispec.Descriptor, content converter.Content, diffID digest.Digest, proven bool) (applied, error) {
	key, err := regionKey(diffID)
	if err != nil {
		return applied{}, err
	}
	for {
		if e, ok := d.s.region.Resolve(key); ok {
			if proven {
				d.recordBlob(ctx, desc, digest.Digest(e.Key.String()))
				return d.reference(ctx, e, 0)
			}
			return d.prove(ctx, desc, e, diffID)
		}
		res, err := d.convert(ctx, desc, content, key, diffID)
		if errors.Is(err, errPublishedMeanwhile) {
			continue // the region has it now: prove ours against it
		}
		if err == nil {
			d.recordBlob(ctx, desc, res.layer)
		}
		return res, err
	}
}

// errPublishedMeanwhile: another participant published the layer while we
// were about to convert it.
var errPublishedMeanwhile = errors.New("layer published by another participant meanwhile")

// prove references region image e of layer diffID for blob desc once the
// blob is proven to be that layer: the region knows the image was made
// from (or checked against) this blob, which the caller's namespace holds;
// or the blob's content hashes to diffID. Otherwise it fails as
// containerd's applier fails on a blob that is not its diffID.
func (d *Differ) prove(ctx context.Context, desc ocispec.Descriptor, e daxmem.Entry, diffID digest.Digest) (applied, error) {
	if bk, err := regionKey(desc.Digest); err == nil {
		if be, ok := d.s.region.Resolve(bk); ok && be.Key == e.Key && d.owns(ctx, desc) {
			return d.reference(ctx, e, 0)
		}
	}
	got, err := d.contentDigest(ctx, desc)
	if err != nil {
		return applied{}, err
	}
	if got != diffID {
		return applied{}, fmt.Errorf("wrong diff id %s calculated from the blob, the image says %s: %w", got, diffID, errdefs.ErrFailedPrecondition)
	}
	d.recordBlob(ctx, desc, digest.Digest(e.Key.String()))
	return d.reference(ctx, e, 0)
}

// contentDigest reads blob desc (of the caller's namespace) and returns
// the digest of its decompressed content.
func (d *Differ) contentDigest(ctx context.Context, desc ocispec.Descriptor) (digest.Digest, error) {
	ra, err := d.openBlob(ctx, desc)
	if err != nil {
		return "", fmt.Errorf("opening blob: %w", err)
	}
	defer ra.Close()
	blob := newPrefetchReader(ctx, ra, ra.Size(), 4)
	defer blob.Close()
	return converter.ContentDigest(ctx, blob)
}

// recordBlob records blob desc as an alias of region layer image layer, so
// that the next participant or namespace with this blob converts and
// hashes nothing (blobs of other digest algorithms are not recorded).
func (d *Differ) recordBlob(ctx context.Context, desc ocispec.Descriptor, layer digest.Digest) {
	bk, err := regionKey(desc.Digest)
	if err != nil {
		return
	}
	lk, err := regionKey(layer)
	if err != nil {
		return
	}
	if err := d.s.region.Alias(ctx, bk, lk); err != nil {
		log.G(ctx).WithError(err).WithField("blob", desc.Digest).Warn("recording the blob of a layer in the region")
	}
}

// owns reports whether the caller's namespace has blob desc in containerd's
// content store: a region image found through the blob's digest is given
// only to a namespace that has the blob (containerd's diff service applies
// whatever descriptor a client names).
func (d *Differ) owns(ctx context.Context, desc ocispec.Descriptor) bool {
	provider, err := d.content(ctx)
	if err != nil {
		return false
	}
	return d.owned(ctx, provider, desc)
}

// reference takes our reference on region layer e for an extraction.
func (d *Differ) reference(ctx context.Context, e daxmem.Entry, read int64) (applied, error) {
	if err := d.s.region.Ref(daxmem.KindLayer, e.Key); err != nil {
		return applied{}, fmt.Errorf("referencing layer %s: %w", e.Key, regionErr(err))
	}
	d.s.metrics.RegionHits.Add(1)
	return applied{layer: digest.Digest(e.Key.String()), tarSize: read}, nil
}

// convert streams blob desc into a layer image in the region under key
// (the layer's diffID), checks the diffID and publishes the image, or
// shares an identical one. It returns the image's region key and size (0
// when another participant converted the layer meanwhile).
func (d *Differ) convert(ctx context.Context, desc ocispec.Descriptor, content converter.Content, key daxmem.Key, diffID digest.Digest) (applied, error) {
	s := d.s
	ra, err := d.openBlob(ctx, desc)
	if err != nil {
		return applied{}, fmt.Errorf("opening blob: %w", err)
	}
	defer ra.Close()
	expect, bound := d.extentFor(ctx, desc, content, ra)
	for {
		limit := s.region.Stats().LargestFree
		if s.maxSize > 0 {
			limit = min(limit, s.maxSize)
		}
		c, _, err := s.claim(ctx, daxmem.KindLayer, key, func() (int64, daxmem.ClaimOptions, error) {
			// Deferred: the extent is backed with memory only as the
			// image grows into it. Expect: the claim takes the tightest
			// free extent for the image's expected size, so a generous
			// bound does not split the region's largest one.
			return max(min(bound, limit), daxfs.BlockSize), daxmem.ClaimOptions{Deferred: true, Expect: min(expect, limit)}, nil
		})
		if err != nil {
			return applied{}, err
		}
		if c == nil {
			// Published by another participant meanwhile, maybe from
			// another blob: the caller proves ours against it.
			return applied{}, errPublishedMeanwhile
		}
		start := time.Now()
		blob := newPrefetchReader(ctx, ra, ra.Size(), 4)
		res, err := converter.ConvertLayer(ctx, blob, layerWindow(c), converter.LayerOptions{MaxSize: s.maxSize, Content: content, Limits: s.limits})
		blob.Close()
		log.G(ctx).WithField("blob", desc.Digest).WithField("took", time.Since(start)).WithField("fetching", blob.waited).Debug("converted blob")
		if errors.Is(err, daxfs.ErrNoSpace) {
			_ = c.Abort(ctx)
			if c.Size() >= limit {
				return applied{}, fmt.Errorf("layer image larger than the %d bytes available (largest free extent of the region above its view area, or max_layer_size): %w", limit, errdefs.ErrResourceExhausted)
			}
			log.G(ctx).WithField("extent", c.Size()).Debug("layer image larger than its extent: converting again with more")
			expect = 4 * c.Size()
			bound = 2 * expect
			continue
		}
		if err != nil {
			_ = c.Abort(ctx)
			// A region (or tmpfs) too full to back the image is
			// ResourceExhausted, not the layer's fault.
			return applied{}, regionErr(err)
		}
		if res.DroppedXattrs > 0 {
			log.G(ctx).WithField("blob", desc.Digest).WithField("xattrs", res.DroppedXattrs).WithField("first", res.FirstDropped).
				Warn("ignored xattrs of the layer outside the namespaces Linux knows, or trusted.*, as containerd's applier does")
		}
		if res.DiffID != diffID {
			_ = c.Abort(ctx)
			return applied{}, fmt.Errorf("wrong diff id %s calculated on extraction, the image says %s: %w", res.DiffID, diffID, errdefs.ErrFailedPrecondition)
		}
		if err := daxfs.Validate(c.Bytes()[:res.Size]); err != nil {
			_ = c.Abort(ctx)
			return applied{}, fmt.Errorf("converted image is invalid: %w", err)
		}
		pub, shared, err := c.PublishShared(ctx, res.Size)
		if err != nil {
			_ = c.Abort(ctx)
			return applied{}, fmt.Errorf("publishing: %w", regionErr(err))
		}
		if shared {
			log.G(ctx).WithField("diffID", diffID).WithField("image", pub.Key).Info("layer image identical to one in the region: stored once")
			return applied{layer: digest.Digest(pub.Key.String()), tarSize: res.TarSize, shared: true}, nil
		}
		log.G(ctx).WithField("diffID", diffID).WithField("size", res.Size).Debug("layer converted into the region")
		return applied{layer: diffID, size: res.Size, tarSize: res.TarSize}, nil
	}
}

// extentFor sizes the region extent of a layer image: about how large it
// will be (the claim's Expect) and a bound on it. A pre-converted layer
// states its size; a tar's image is about its uncompressed length (every
// file's data on its own page adds some, its tar headers go), which most
// compressed blobs state; otherwise a guess from the blob's size. An image
// that outgrows its extent is converted again with more.
func (d *Differ) extentFor(ctx context.Context, desc ocispec.Descriptor, content converter.Content, ra content.ReaderAt) (expect, bound int64) {
	if content == converter.ContentImage {
		n, ok, err := converter.ImageSize(io.NewSectionReader(ra, 0, ra.Size()))
		switch {
		case err != nil:
			log.G(ctx).WithError(err).WithField("blob", desc.Digest).Debug("pre-converted layer states no usable size: guessing")
		case ok:
			n = (n + daxfs.BlockSize - 1) / daxfs.BlockSize * daxfs.BlockSize
			return n, n
		}
	}
	if u, ok := converter.TarSize(ra, ra.Size()); ok {
		expect = u + u/4 + 1<<20
	} else {
		expect = 4*ra.Size() + 1<<20
	}
	return expect, 2 * expect
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
