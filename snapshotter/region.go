package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/v2/core/content"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// regionKey turns a digest into a region key.
func regionKey(d digest.Digest) (daxmem.Key, error) {
	k, err := daxmem.KeyFromDigest(d.String())
	if err != nil {
		return k, fmt.Errorf("region key for %q: %w", d, errdefs.ErrInvalidArgument)
	}
	return k, nil
}

// regionErr gives region errors the errdefs class containerd maps to gRPC
// codes, keeping the region's message (which names the key).
func regionErr(err error) error {
	var class error
	switch {
	case err == nil:
		return nil
	case errors.Is(err, daxmem.ErrFull), errors.Is(err, daxmem.ErrNoSlot):
		class = errdefs.ErrResourceExhausted
	case errors.Is(err, daxmem.ErrNotFound):
		class = errdefs.ErrNotFound
	case errors.Is(err, daxmem.ErrExists):
		class = errdefs.ErrAlreadyExists
	case errors.Is(err, daxmem.ErrCorrupt), errors.Is(err, daxmem.ErrBadHeader):
		class = errdefs.ErrDataLoss
	case errors.Is(err, daxmem.ErrBusy), errors.Is(err, daxmem.ErrNotJoined), errors.Is(err, daxmem.ErrEvicted):
		class = errdefs.ErrUnavailable
	default:
		return err
	}
	return fmt.Errorf("%w: %w", class, err)
}

// lookupLayer returns the READY region entry of a layer image.
func (s *Snapshotter) lookupLayer(layer digest.Digest) (daxmem.Entry, bool, error) {
	k, err := regionKey(layer)
	if err != nil {
		return daxmem.Entry{}, false, err
	}
	e, ok := s.region.Lookup(daxmem.KindLayer, k)
	return e, ok, nil
}

// provenHit returns the region's image of layer diffID when an extraction
// may take it without containerd fetching anything. A diffID alone proves
// nothing: an image config can list any diffID over any blob. The layer's
// blob digest proves it, when the region's image was made from (or
// checked against) that blob, and it is the blob the caller's image names:
// containerd's image handler for remote snapshotters labels the extraction
// with the manifest's digest and the layer's (CRI pulls, and pulls through
// the transfer service with enable_remote_snapshot_annotations in the
// snapshotter's exports), and that manifest, in the caller's namespace,
// must list that blob at the place its config lists diffID. Anything less
// is no hit: containerd then provides the blob and our differ proves it by
// its content or converts it.
func (s *Snapshotter) provenHit(ctx context.Context, diffID digest.Digest, labels map[string]string) (daxmem.Entry, bool) {
	blob, err := digest.Parse(labels[labelLayerDigest])
	if err != nil || s.content == nil {
		return daxmem.Entry{}, false
	}
	manifest, err := digest.Parse(labels[labelManifestDigest])
	if err != nil {
		return daxmem.Entry{}, false
	}
	lk, err := regionKey(diffID)
	if err != nil {
		return daxmem.Entry{}, false
	}
	bk, err := regionKey(blob)
	if err != nil {
		return daxmem.Entry{}, false
	}
	e, ok := s.region.Resolve(lk)
	if !ok {
		return daxmem.Entry{}, false
	}
	logger := log.G(ctx).WithField("diffID", diffID).WithField("blob", blob)
	if be, ok := s.region.Resolve(bk); !ok || be.Key != e.Key {
		logger.Debug("the region holds the layer, not made from this blob: no hit")
		return daxmem.Entry{}, false
	}
	if err := s.imageNames(ctx, manifest, blob, diffID); err != nil {
		logger.WithError(err).Info("the labels of a layer extraction do not match its image: no hit")
		return daxmem.Entry{}, false
	}
	return e, true
}

// maxManifestSize bounds the manifest and config read to check a hit.
const maxManifestSize = 4 << 20

// imageNames checks that manifest (in the caller's namespace) lists blob
// as a layer, at the index where its config lists diffID.
func (s *Snapshotter) imageNames(ctx context.Context, manifest, blob, diffID digest.Digest) error {
	provider, err := s.content(ctx)
	if err != nil {
		return err
	}
	var m ocispec.Manifest
	if err := readJSON(ctx, provider, manifest, &m); err != nil {
		return fmt.Errorf("manifest %s: %w", manifest, err)
	}
	var cfg ocispec.Image
	if err := readJSON(ctx, provider, m.Config.Digest, &cfg); err != nil {
		return fmt.Errorf("config %s: %w", m.Config.Digest, err)
	}
	for i, l := range m.Layers {
		if l.Digest == blob && i < len(cfg.RootFS.DiffIDs) && cfg.RootFS.DiffIDs[i] == diffID {
			return nil
		}
	}
	return fmt.Errorf("manifest %s lists no layer %s with diffID %s", manifest, blob, diffID)
}

// readJSON decodes blob d of the caller's namespace, at most
// maxManifestSize bytes.
func readJSON(ctx context.Context, provider content.Provider, d digest.Digest, v any) error {
	ip, ok := provider.(content.InfoProvider)
	if !ok {
		return errors.New("content store cannot tell blob sizes")
	}
	info, err := ip.Info(ctx, d)
	if err != nil {
		return err
	}
	if info.Size > maxManifestSize {
		return fmt.Errorf("%d bytes, more than %d", info.Size, maxManifestSize)
	}
	b, err := content.ReadBlob(ctx, provider, ocispec.Descriptor{Digest: d, Size: info.Size})
	if err != nil {
		return err
	}
	if digest.FromBytes(b) != d {
		return errors.New("content does not match its digest")
	}
	return json.Unmarshal(b, v)
}

// lookup finds a READY image: a layer by its key or an alias of it.
func (s *Snapshotter) lookup(kind daxmem.Kind, key daxmem.Key) (daxmem.Entry, bool) {
	if kind == daxmem.KindLayer {
		return s.region.Resolve(key)
	}
	return s.region.Lookup(kind, key)
}

// image opens the image of a READY entry.
func (s *Snapshotter) image(e daxmem.Entry) (*daxfs.Image, error) {
	b, err := s.region.Slice(e.Offset, e.Length)
	if err != nil {
		return nil, err
	}
	return daxfs.Open(b)
}

// claim returns a claim on (kind, key) for the caller to write, or, when
// the region holds the image READY already (or another participant
// finishes it while we wait), no claim and that entry. size is asked for
// the extent to claim each time a claim is attempted.
func (s *Snapshotter) claim(ctx context.Context, kind daxmem.Kind, key daxmem.Key, size func() (int64, daxmem.ClaimOptions, error)) (*daxmem.Claim, daxmem.Entry, error) {
	for {
		if e, ok := s.lookup(kind, key); ok {
			return nil, e, nil
		}
		n, opts, err := size()
		if err != nil {
			return nil, daxmem.Entry{}, err
		}
		c, err := s.region.Claim(ctx, kind, key, n, opts)
		switch {
		case err == nil:
			return c, daxmem.Entry{}, nil
		case errors.Is(err, daxmem.ErrExists):
			continue
		case errors.Is(err, daxmem.ErrBusy):
			// Another participant is writing it. Wait ends when it is
			// READY, or with ErrAbandoned when its writer died or gave
			// up: then we claim it ourselves.
			if _, err := s.region.Wait(ctx, kind, key); err != nil && !errors.Is(err, daxmem.ErrAbandoned) {
				return nil, daxmem.Entry{}, fmt.Errorf("waiting for another participant writing %s: %w", key, regionErr(err))
			}
			continue
		default:
			return nil, daxmem.Entry{}, fmt.Errorf("claiming %d bytes of the region for %s: %w", n, key, regionErr(err))
		}
	}
}

// publishImageFile copies a finished image file into the region under
// (kind, key) and publishes it. If the key is READY already (another
// participant or an earlier attempt made it), that entry is used: keys are
// content addresses, so it is the same image.
func (s *Snapshotter) publishImageFile(ctx context.Context, kind daxmem.Kind, key digest.Digest, path string) (daxmem.Entry, error) {
	k, err := regionKey(key)
	if err != nil {
		return daxmem.Entry{}, err
	}
	f, err := os.Open(path)
	if err != nil {
		return daxmem.Entry{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return daxmem.Entry{}, err
	}
	c, e, err := s.claim(ctx, kind, k, func() (int64, daxmem.ClaimOptions, error) { return fi.Size(), daxmem.ClaimOptions{}, nil })
	if err != nil || c == nil {
		return e, err
	}
	dst := c.Bytes()[:fi.Size()]
	if _, err := io.ReadFull(f, dst); err != nil {
		_ = c.Abort(ctx)
		return daxmem.Entry{}, fmt.Errorf("copying image %s into the region: %w", key, err)
	}
	if err := daxfs.Validate(dst); err != nil {
		_ = c.Abort(ctx)
		return daxmem.Entry{}, fmt.Errorf("image %s is invalid: %w", key, err)
	}
	e, err = c.Publish(ctx, fi.Size())
	if err != nil {
		_ = c.Abort(ctx)
		return daxmem.Entry{}, fmt.Errorf("publishing image %s: %w", key, regionErr(err))
	}
	log.G(ctx).WithField("key", key).WithField("size", fi.Size()).Debug("published image")
	return e, nil
}
