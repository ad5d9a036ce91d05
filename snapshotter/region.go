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
		return k, fmt.Errorf("region key for %s: %w", d, errdefs.ErrInvalidArgument)
	}
	return k, nil
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

// layerImage opens the layer image of a READY entry.
func (s *Snapshotter) image(e daxmem.Entry) (*daxfs.Image, error) {
	b, err := s.region.Slice(e.Offset, e.Length)
	if err != nil {
		return nil, err
	}
	return daxfs.Open(b)
}

// publishImageFile copies a finished image file into the region under
// (kind, key) and publishes it. If the key is already READY (another
// participant or an earlier attempt made it), the existing entry is used:
// images are content addressed, so the bytes are the same layer.
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
	for {
		if e, ok := s.region.Lookup(kind, k); ok {
			return e, nil
		}
		c, err := s.region.Claim(ctx, kind, k, fi.Size(), daxmem.ClaimOptions{})
		switch {
		case errors.Is(err, daxmem.ErrExists):
			continue
		case errors.Is(err, daxmem.ErrBusy):
			// Wait ends when the entry is READY, or with ErrAbandoned when
			// its writer died or gave up: then we claim it ourselves.
			if _, err := s.region.Wait(ctx, kind, k); err != nil && !errors.Is(err, daxmem.ErrAbandoned) {
				return daxmem.Entry{}, fmt.Errorf("waiting for %s being written by another participant: %w", key, err)
			}
			continue
		case err != nil:
			return daxmem.Entry{}, fmt.Errorf("claiming region space for %s (%d bytes): %w", key, fi.Size(), err)
		}
		dst := c.Bytes()
		if _, err := io.ReadFull(f, dst[:fi.Size()]); err != nil {
			_ = c.Abort(ctx)
			return daxmem.Entry{}, fmt.Errorf("copying %s into the region: %w", key, err)
		}
		if err := daxfs.Validate(dst[:fi.Size()]); err != nil {
			_ = c.Abort(ctx)
			return daxmem.Entry{}, fmt.Errorf("image for %s is invalid: %w", key, err)
		}
		e, err := c.Publish(ctx, fi.Size())
		if err != nil {
			_ = c.Abort(ctx)
			return daxmem.Entry{}, fmt.Errorf("publishing %s: %w", key, err)
		}
		log.G(ctx).WithField("key", key).WithField("size", fi.Size()).Debug("published image")
		return e, nil
	}
}
