package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

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
		if e, ok := s.region.Lookup(kind, key); ok {
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
