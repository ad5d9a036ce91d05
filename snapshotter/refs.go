package snapshotter

import (
	"context"
	"errors"
	"fmt"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// Our region reference on a layer image (one bit per participant, the
// truth every participant's GC goes by) is set while any snapshot of ours
// has the image in its labelLayer: committed snapshots and extraction
// snapshots whose layer was a hit or applied. Every change of that holds
// s.refMu across the reference and the metadata transaction that records
// or removes the label, so a Remove dropping the reference of the last
// snapshot it knows cannot interleave with a snapshot taking it.

// layersInUse returns the layers our snapshots reference. Call it inside
// a metadata transaction.
func layersInUse(ctx context.Context) (map[string]bool, error) {
	inUse := map[string]bool{}
	err := storage.WalkInfo(ctx, func(ctx context.Context, i snapshots.Info) error {
		if l := i.Labels[labelLayer]; l != "" {
			inUse[l] = true
		}
		return nil
	})
	return inUse, err
}

// refLayers sets our reference on the layer image of every snapshot that
// references one. A restarted daemon whose participant slot was reclaimed
// while it was down (its references cleared by another participant's GC)
// takes its references back before anything can free the images; a layer
// that is gone is reported, and only snapshots built on it fail.
func (s *Snapshotter) refLayers(ctx context.Context) error {
	s.refMu.Lock()
	defer s.refMu.Unlock()
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			l := info.Labels[labelLayer]
			if l == "" {
				return nil
			}
			k, err := regionKey(digest.Digest(l))
			if err != nil {
				return fmt.Errorf("layer of snapshot %s: %w", info.Name, err)
			}
			if err := s.region.Ref(daxmem.KindLayer, k); err != nil {
				log.G(ctx).WithError(err).WithField("snapshot", info.Name).WithField("layer", l).
					Warn("layer image of a snapshot is not in the region: remove the image and pull it again")
			}
			return nil
		})
	})
	if errdefs.IsNotFound(err) {
		return nil // a new metadata store
	}
	return err
}

// refLayer sets our reference on layer image layer. Hold s.refMu.
func (s *Snapshotter) refLayer(layer digest.Digest) error {
	k, err := regionKey(layer)
	if err != nil {
		return err
	}
	if err := s.region.Ref(daxmem.KindLayer, k); err != nil {
		return fmt.Errorf("referencing layer %s: %w", layer, regionErr(err))
	}
	return nil
}

// unrefUnlessUsed drops our reference on layer when no snapshot of ours
// references it, after an attempt to record it failed. Hold s.refMu. When
// the metadata cannot be read the reference is kept: a reference too many
// keeps an image until the next restart's accounting, one too few lets
// GC free an image in use.
func (s *Snapshotter) unrefUnlessUsed(ctx context.Context, layer digest.Digest) {
	var inUse map[string]bool
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		inUse, err = layersInUse(ctx)
		return err
	})
	if err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).WithField("layer", layer).Warn("cannot tell whether a snapshot uses a layer: keeping our reference")
		return
	}
	if !inUse[layer.String()] {
		s.unref(ctx, layer)
	}
}

// unref drops our region reference on a layer. Hold s.refMu.
func (s *Snapshotter) unref(ctx context.Context, layer digest.Digest) {
	k, err := regionKey(layer)
	if err == nil {
		err = s.region.Unref(daxmem.KindLayer, k)
	}
	if err != nil && !errors.Is(err, daxmem.ErrNotFound) {
		log.G(ctx).WithError(err).WithField("layer", layer).Warn("dropping our reference to a layer")
	}
}
