package snapshotter

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
)

// A view is keyed in the region (and named under mnt/) by its view key:
// the chain key together with where each of its layer images lies and its
// checksum. A view stores absolute offsets into its layers, so a view built
// over layer images that were since freed and published again elsewhere
// must never be found again: its key no longer matches.
func viewKey(chain digest.Digest, layers []daxmem.Entry) digest.Digest {
	d := digest.SHA256.Digester()
	h := d.Hash()
	h.Write([]byte(chain.String()))
	var b [24]byte
	for _, e := range layers {
		binary.LittleEndian.PutUint64(b[0:], uint64(e.Offset))
		binary.LittleEndian.PutUint64(b[8:], uint64(e.Length))
		binary.LittleEndian.PutUint64(b[16:], e.Checksum)
		h.Write(b[:])
	}
	return d.Digest()
}

// acquireView makes sure the view of committed snapshot parent is in the
// region and mounted, counts snapshot id as its user, and returns the
// directory.
func (s *Snapshotter) acquireView(ctx context.Context, parent, id string) (string, error) {
	key, chain, layers, err := s.keyOf(ctx, parent)
	if err != nil {
		return "", err
	}
	return s.views.acquire(ctx, key, id, func(ctx context.Context, dir string) error {
		return s.mountView(ctx, key, chain, layers, dir)
	})
}

// warmView mounts the view of committed snapshot name ahead of its first
// container and keeps it mounted for warmFor even without users.
func (s *Snapshotter) warmView(name string) {
	ctx := context.Background()
	key, chain, layers, err := s.keyOf(ctx, name)
	if err != nil {
		log.G(ctx).WithError(err).WithField("snapshot", name).Debug("not warming the view of a snapshot")
		return
	}
	mounted, err := s.views.warm(ctx, key, name, time.Now().Add(s.warmFor), func(ctx context.Context, dir string) error {
		return s.mountView(ctx, key, chain, layers, dir)
	})
	switch {
	case err != nil:
		log.G(ctx).WithError(err).WithField("snapshot", name).Warn("warming a view")
	case mounted:
		s.metrics.ViewsWarmed.Add(1)
	}
}

// adoptViews takes over views a previous run of the daemon left mounted,
// takes its region references on them back (they may have been cleared
// while the daemon was down), and counts the snapshots that use them, so
// running containers keep their lowers across a restart.
func (s *Snapshotter) adoptViews(ctx context.Context) error {
	infos, err := s.mounter.Mounted(ctx)
	if err != nil {
		return fmt.Errorf("listing existing view mounts: %w", err)
	}
	s.views.adopt(ctx, infos, func(key digest.Digest) bool {
		k, err := regionKey(key)
		if err != nil {
			return true
		}
		if err := s.region.Ref(daxmem.KindView, k); err != nil {
			log.G(ctx).WithError(err).WithField("view", key).Error("an adopted view is not in the region: it is not reused")
			return false
		}
		return true
	})
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted || info.Parent == "" {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			key, _, _, err := s.keyOfTx(ctx, info.Parent)
			if err != nil {
				log.G(ctx).WithError(err).WithField("snapshot", info.Name).Warn("the view of this snapshot cannot be rebuilt")
				return nil
			}
			s.views.adoptUser(id, key)
			return nil
		})
	})
	if errdefs.IsNotFound(err) {
		// A new metadata store has no buckets yet: nothing to adopt.
		return nil
	}
	return err
}

// cleanupViews unmounts views no snapshot uses and drops our references
// on them.
func (s *Snapshotter) cleanupViews(ctx context.Context) error {
	exists := func(name string) bool {
		err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
			_, _, _, err := storage.GetInfo(ctx, name)
			return err
		})
		return err == nil
	}
	return s.views.cleanup(ctx, exists, func(key digest.Digest) {
		s.metrics.ViewsUnmounted.Add(1)
		if k, err := regionKey(key); err == nil {
			if err := s.region.Unref(daxmem.KindView, k); err != nil && !errors.Is(err, daxmem.ErrNotFound) {
				log.G(ctx).WithError(err).WithField("view", key).Warn("dropping our reference to a view")
			}
		}
	})
}

// keyOf returns the view key, chain key and layer entries (bottom first) of
// committed snapshot name.
func (s *Snapshotter) keyOf(ctx context.Context, name string) (key, chain digest.Digest, layers []daxmem.Entry, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		key, chain, layers, err = s.keyOfTx(ctx, name)
		return err
	})
	return key, chain, layers, err
}

// keyOfTx is keyOf inside a metadata transaction.
func (s *Snapshotter) keyOfTx(ctx context.Context, name string) (digest.Digest, digest.Digest, []daxmem.Entry, error) {
	chain, layers, err := chainOf(ctx, name)
	if err != nil {
		return "", "", nil, err
	}
	entries := make([]daxmem.Entry, len(layers))
	for i, l := range layers {
		e, ok, err := s.lookupLayer(l)
		if err != nil {
			return "", "", nil, err
		}
		if !ok {
			return "", "", nil, fmt.Errorf("layer %s of chain %s is not in the region: %w", l, chain, errdefs.ErrNotFound)
		}
		entries[i] = e
	}
	return viewKey(chain, entries), chain, entries, nil
}

// chainOf returns the chain key of committed snapshot name and its layer
// keys, bottom first. Call it inside a metadata transaction.
func chainOf(ctx context.Context, name string) (digest.Digest, []digest.Digest, error) {
	var (
		chain  digest.Digest
		layers []digest.Digest
	)
	for n := name; n != ""; {
		_, info, _, err := storage.GetInfo(ctx, n)
		if err != nil {
			return "", nil, err
		}
		if info.Kind != snapshots.KindCommitted {
			return "", nil, fmt.Errorf("parent %s is not committed: %w", n, errdefs.ErrFailedPrecondition)
		}
		l := digest.Digest(info.Labels[labelLayer])
		if l == "" {
			return "", nil, fmt.Errorf("snapshot %s has no layer image: %w", n, errdefs.ErrFailedPrecondition)
		}
		if chain == "" {
			chain = digest.Digest(info.Labels[labelChain])
		}
		layers = append(layers, l)
		n = info.Parent
	}
	for i, j := 0, len(layers)-1; i < j; i, j = i+1, j-1 {
		layers[i], layers[j] = layers[j], layers[i]
	}
	return chain, layers, nil
}

// mountView builds the view in the region if no participant has yet,
// references it, and mounts it on dir.
func (s *Snapshotter) mountView(ctx context.Context, key, chain digest.Digest, layers []daxmem.Entry, dir string) error {
	start := time.Now()
	e, window, err := s.ensureView(ctx, key, chain, layers)
	if err != nil {
		return err
	}
	built := time.Since(start)
	if err := s.region.Ref(daxmem.KindView, e.Key); err != nil {
		return fmt.Errorf("referencing view %s of chain %s: %w", key, chain, regionErr(err))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := mounter.DetachStale(ctx, dir); err != nil {
		_ = s.region.Unref(daxmem.KindView, e.Key)
		return err
	}
	src := mounter.Source{Path: s.region.Path(), Offset: e.Offset, Length: window}
	if base, ok := s.region.PhysAddr(); ok {
		src.PhysAddr, src.HasPhys = base+uint64(e.Offset), true
	}
	if err := s.mounter.Mount(ctx, src, dir); err != nil {
		_ = s.region.Unref(daxmem.KindView, e.Key)
		return fmt.Errorf("mounting view of chain %s on %s: %w", chain, dir, err)
	}
	s.metrics.ViewsMounted.Add(1)
	log.G(ctx).WithField("chain", chain).WithField("view", key).WithField("layers", len(layers)).
		WithField("build", built).WithField("total", time.Since(start)).Debug("view mounted")
	return nil
}

// ensureView returns the READY view entry for key and its window size,
// building and publishing it when the region has none.
func (s *Snapshotter) ensureView(ctx context.Context, key, chain digest.Digest, entries []daxmem.Entry) (daxmem.Entry, int64, error) {
	k, err := regionKey(key)
	if err != nil {
		return daxmem.Entry{}, 0, err
	}
	below, end := int64(-1), int64(0)
	for _, e := range entries {
		if below < 0 || e.Offset < below {
			below = e.Offset
		}
		end = max(end, e.Offset+e.Length)
	}
	var plan *converter.ViewPlan
	c, existing, err := s.claim(ctx, daxmem.KindView, k, func() (int64, daxmem.ClaimOptions, error) {
		images := make([]*daxfs.Image, len(entries))
		for i, e := range entries {
			var err error
			if images[i], err = s.image(e); err != nil {
				return 0, daxmem.ClaimOptions{}, fmt.Errorf("layer %s of chain %s: %w", e.Key, chain, err)
			}
		}
		plan, err = converter.PlanView(images)
		if err != nil {
			return 0, daxmem.ClaimOptions{}, fmt.Errorf("planning the view of chain %s: %w", chain, err)
		}
		return plan.Size(), daxmem.ClaimOptions{Below: below}, nil
	})
	if errors.Is(err, daxmem.ErrFull) && plan != nil {
		st := s.region.Stats()
		return daxmem.Entry{}, 0, fmt.Errorf("view of chain %s: %w (the view, %d bytes, must lie below its layers: the region's view area holds %d bytes, %d free; make a region with a larger view area, region.view_area or `region init --view-area`, or remove images)",
			chain, err, plan.Size(), st.ViewArea, st.ViewFree)
	}
	if err != nil {
		return daxmem.Entry{}, 0, fmt.Errorf("view of chain %s: %w", chain, err)
	}
	if c == nil {
		// Built by another participant (or earlier): the window runs to
		// the end of its last layer.
		return existing, end - existing.Offset, nil
	}
	bases := make([]uint64, len(entries))
	for i, e := range entries {
		bases[i] = uint64(e.Offset - c.Offset())
	}
	window := end - c.Offset()
	if err := plan.Write(daxfs.NewWindow(c.Bytes()), bases, uint64(window)); err != nil {
		_ = c.Abort(ctx)
		return daxmem.Entry{}, 0, fmt.Errorf("writing the view of chain %s: %w", chain, err)
	}
	e, err := c.Publish(ctx, plan.Size())
	if err != nil {
		_ = c.Abort(ctx)
		return daxmem.Entry{}, 0, fmt.Errorf("publishing the view of chain %s: %w", chain, regionErr(err))
	}
	s.metrics.ViewsBuilt.Add(1)
	return e, window, nil
}
