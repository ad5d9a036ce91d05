// Package snapshotter is the containerd snapshots.Snapshotter (and the
// diff.Applier) of containerd-daxfs.
//
// Committed snapshots are layer images in the shared region, keyed by the
// layer's diffID when containerd says which layer it is unpacking (so every
// participant of the region shares them), or by the sha256 of the image
// otherwise. A chain of committed snapshots is served to containers as a
// view image (the merged tree of the chain, metadata only) mounted once per
// chain under mnt/, the read-only lower of each container's overlay.
//
// Layout of the state directory:
//
//	metadata.db           containerd's snapshot metadata (bolt)
//	empty/                an empty directory: lower of parentless snapshots
//	snapshots/<id>/fs     upper directory of an active snapshot
//	snapshots/<id>/work   overlay work directory
//	mnt/<view key>        mounted views, one per chain in use
//
// All state of a snapshot is in the metadata store, our own in private
// labels (labels.go) written in the transactions that change it; the
// region's reference bits say which images this participant uses (see
// refs.go). Only what cannot be anywhere else is in memory: the table of
// mounted views and their users (viewmounts.go), rebuilt at start from the
// mounter, and the timers of views to warm (warm.go).
package snapshotter

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/continuity/fs"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// Config configures a Snapshotter.
type Config struct {
	// Root is the state directory.
	Root string
	// Region holds the images; the caller opened and joined it.
	Region *daxmem.Region
	// Mounter puts views on directories.
	Mounter mounter.Mounter
	// Overlay are the overlayfs options of container roots.
	Overlay overlay.Options
	// MaxLayerSize bounds one layer image (0: no bound but the region's).
	MaxLayerSize int64
	// Limits bound the entries and paths of a layer.
	Limits converter.Limits
	// Content is containerd's content store, for checking a region hit
	// against the manifest the extraction came from (nil: no hit is
	// taken at Prepare; the differ proves layers by their blobs).
	Content ContentFunc
	// WarmViews, when set, mounts the view of a freshly unpacked image
	// (the top of a chain of commits) ahead of its first container and
	// keeps it mounted this long without users.
	WarmViews time.Duration
}

// Snapshotter implements snapshots.Snapshotter over the shared region.
type Snapshotter struct {
	root    string
	ms      *storage.MetaStore
	region  *daxmem.Region
	mounter mounter.Mounter
	ovl     overlay.Options
	maxSize int64
	limits  converter.Limits
	content ContentFunc

	views   *viewMounts
	warmer  *warmer // nil: views are not warmed
	warmFor time.Duration
	metrics Metrics
	// refMu orders our region reference changes on layers with the
	// metadata transactions that decide them (see refs.go).
	refMu sync.Mutex

	closeOnce sync.Once
}

var _ snapshots.Snapshotter = (*Snapshotter)(nil)

// New opens (or creates) the snapshotter state under cfg.Root.
func New(ctx context.Context, cfg Config) (*Snapshotter, error) {
	if cfg.Root == "" || cfg.Region == nil || cfg.Mounter == nil {
		return nil, fmt.Errorf("snapshotter needs a root, a region and a mounter: %w", errdefs.ErrInvalidArgument)
	}
	if err := overlay.Supported(); err != nil {
		return nil, err
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, err
	}
	cfg.Root = root
	for _, d := range []string{cfg.Root, filepath.Join(cfg.Root, "snapshots"), filepath.Join(cfg.Root, "mnt"), filepath.Join(cfg.Root, "empty")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	// The empty lower is the root directory of parentless containers
	// until they write to it: make it look like a normal root.
	if err := os.Chmod(filepath.Join(cfg.Root, "empty"), 0o755); err != nil {
		return nil, err
	}
	ms, err := storage.NewMetaStore(filepath.Join(cfg.Root, "metadata.db"))
	if err != nil {
		return nil, fmt.Errorf("opening snapshot metadata: %w", err)
	}
	s := &Snapshotter{
		root:    cfg.Root,
		ms:      ms,
		region:  cfg.Region,
		mounter: cfg.Mounter,
		ovl:     cfg.Overlay,
		maxSize: cfg.MaxLayerSize,
		limits:  cfg.Limits,
		content: cfg.Content,
		views:   newViewMounts(filepath.Join(cfg.Root, "mnt"), cfg.Mounter),
		warmFor: cfg.WarmViews,
	}
	if cfg.WarmViews > 0 {
		s.warmer = newWarmer(warmDelay, s.warmView)
	}
	for _, step := range []func(context.Context) error{s.migrateStages, s.adoptViews, s.refLayers} {
		if err := step(ctx); err != nil {
			ms.Close()
			return nil, err
		}
	}
	return s, nil
}

func (s *Snapshotter) upperPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "fs")
}
func (s *Snapshotter) workPath(id string) string {
	return filepath.Join(s.root, "snapshots", id, "work")
}
func (s *Snapshotter) emptyDir() string { return filepath.Join(s.root, "empty") }

// Stat returns the info of a snapshot.
func (s *Snapshotter) Stat(ctx context.Context, key string) (snapshots.Info, error) {
	info, err := s.info(ctx, key)
	info.Labels = public(info.Labels)
	return info, err
}

// info returns the info of a snapshot with our private labels.
func (s *Snapshotter) info(ctx context.Context, key string) (info snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	return info, err
}

// public returns labels as clients see them: without our private keys,
// and nil when nothing is left (as a snapshot without labels reads).
func public(labels map[string]string) map[string]string {
	if labels == nil {
		return nil
	}
	out := withoutPrivate(labels)
	if len(out) == 0 && len(labels) != 0 {
		return nil
	}
	return out
}

// Update changes labels of a snapshot. Our private labels cannot be set,
// changed or removed through it.
func (s *Snapshotter) Update(ctx context.Context, info snapshots.Info, fieldpaths ...string) (out snapshots.Info, err error) {
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, cur, _, err := storage.GetInfo(ctx, info.Name)
		if err != nil {
			return err
		}
		info.Labels = withoutPrivate(info.Labels)
		var paths []string
		for _, p := range fieldpaths {
			if strings.HasPrefix(p, "labels."+labelPrefix) {
				continue
			}
			paths = append(paths, p)
		}
		if len(fieldpaths) == 0 || containsLabelsPath(fieldpaths) {
			// A whole-labels replace must keep our private labels.
			maps.Copy(info.Labels, privateOf(cur.Labels))
			if len(fieldpaths) == 0 {
				paths = nil
			}
		}
		if len(fieldpaths) > 0 && len(paths) == 0 {
			out = cur
			return nil
		}
		out, err = storage.UpdateInfo(ctx, info, paths...)
		return err
	})
	out.Labels = public(out.Labels)
	return out, err
}

func containsLabelsPath(paths []string) bool {
	return slices.Contains(paths, "labels")
}

// Usage returns the resources a snapshot takes: for an active snapshot its
// upper directory, for a committed one its layer image in the region.
func (s *Snapshotter) Usage(ctx context.Context, key string) (snapshots.Usage, error) {
	var (
		id   string
		info snapshots.Info
		u    snapshots.Usage
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, info, u, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return u, err
	}
	if info.Kind == snapshots.KindActive {
		du, err := fs.DiskUsage(ctx, s.upperPath(id))
		if err != nil {
			return u, err
		}
		u = snapshots.Usage(du)
	}
	return u, nil
}

// Mounts returns the mounts of an active or view snapshot.
func (s *Snapshotter) Mounts(ctx context.Context, key string) ([]mount.Mount, error) {
	var (
		snap storage.Snapshot
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		snap, err = storage.GetSnapshot(ctx, key)
		if err != nil {
			return err
		}
		_, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("mounts of %s: %w", key, err)
	}
	return s.mounts(ctx, snap, info)
}

// Prepare creates an active snapshot. An extraction snapshot (containerd's
// unpacker sets the ref and diff-id labels) whose layer the region already
// holds is returned read-only: containerd then skips download and apply.
func (s *Snapshotter) Prepare(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindActive, key, parent, opts)
}

// View creates a read-only view of a committed snapshot.
func (s *Snapshotter) View(ctx context.Context, key, parent string, opts ...snapshots.Opt) ([]mount.Mount, error) {
	return s.create(ctx, snapshots.KindView, key, parent, opts)
}

func (s *Snapshotter) create(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt) (_ []mount.Mount, retErr error) {
	info, opts, err := sanitizeOpts(opts, nil)
	if err != nil {
		return nil, err
	}
	var (
		st  *stage
		hit *daxmem.Entry
	)
	if kind == snapshots.KindActive {
		if isExtraction(key, info.Labels) {
			var diffID digest.Digest
			if d, ok := info.Labels[labelDiffID]; ok {
				if diffID, err = digest.Parse(d); err != nil {
					return nil, fmt.Errorf("label %s=%q of %s: %w", labelDiffID, d, key, errdefs.ErrInvalidArgument)
				}
			}
			st = &stage{DiffID: diffID}
			// The unpacker builds the next layer on parent: not the
			// top of the image, it needs no warm view.
			s.warmer.cancel(parent)
			if diffID != "" {
				if e, ok := s.provenHit(keyNamespace(ctx, key), diffID, info.Labels); ok {
					hit = &e
				}
			}
		}
	}
	snap, created, err := s.createSnapshot(ctx, kind, key, parent, opts, st, hit)
	if err != nil {
		return nil, fmt.Errorf("creating snapshot %s: %w", key, err)
	}
	if st != nil {
		// In a parallel unpack the layer will be committed over the
		// chain its label names: not the top of the image either.
		s.warmer.cancelChain(info.Labels[labelParentChain])
	}
	defer func() {
		if retErr != nil {
			if err := s.Remove(ctx, key); err != nil {
				log.G(ctx).WithError(err).WithField("key", key).Warn("removing snapshot after a failed create")
			}
		}
	}()
	if st != nil && st.Hit {
		s.metrics.RegionHits.Add(1)
		log.G(ctx).WithField("key", key).WithField("diffID", st.DiffID).Debug("layer found in the region: staged")
	}
	return s.mounts(ctx, snap, created)
}

// createSnapshot records a snapshot, with the stage of an extraction in
// its labels, and makes its directories, in one metadata transaction. A
// region hit's layer image is referenced first, under refMu: containerd
// may commit the snapshot much later (parallel unpacks commit in order),
// and GC must not free the image in between.
func (s *Snapshotter) createSnapshot(ctx context.Context, kind snapshots.Kind, key, parent string, opts []snapshots.Opt, st *stage, hit *daxmem.Entry) (snap storage.Snapshot, created snapshots.Info, err error) {
	if hit != nil {
		s.refMu.Lock()
		defer s.refMu.Unlock()
		if err := s.region.Ref(daxmem.KindLayer, hit.Key); err == nil {
			st.Hit, st.Layer = true, digest.Digest(hit.Key.String())
		}
	}
	if st != nil {
		opts = append(opts, snapshots.WithLabels(st.labels()))
	}
	var dir string
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		var err error
		snap, err = storage.CreateSnapshot(ctx, kind, key, parent, opts...)
		if err != nil {
			return err
		}
		_, created, _, err = storage.GetInfo(ctx, key)
		if err != nil || kind != snapshots.KindActive {
			return err
		}
		dir = filepath.Join(s.root, "snapshots", snap.ID)
		if err := os.MkdirAll(filepath.Join(dir, "fs"), 0o755); err != nil {
			return err
		}
		return os.MkdirAll(filepath.Join(dir, "work"), 0o711)
	})
	if err != nil {
		if dir != "" {
			_ = os.RemoveAll(dir)
		}
		if st != nil && st.Hit {
			// Give back the reference taken above, unless another
			// snapshot of ours uses the layer.
			s.unrefUnlessUsed(ctx, st.layer())
		}
	}
	return snap, created, err
}

// mounts computes the mounts of a snapshot, mounting its parent's view when
// needed.
func (s *Snapshotter) mounts(ctx context.Context, snap storage.Snapshot, info snapshots.Info) ([]mount.Mount, error) {
	st, staging, err := stageOf(info)
	if err != nil {
		return nil, err
	}
	if staging && st.Hit {
		m, err := overlay.ReadOnlyBind(s.emptyDir())
		return []mount.Mount{m}, err
	}
	// An extraction snapshot's layer goes straight into the region (our
	// differ): it needs no parent view, so none is built or mounted per
	// layer during a pull. Only the walking-differ fallback writes the
	// upper, and it needs the lower only to copy attributes onto parent
	// directories a tar leaves implicit.
	lower := s.emptyDir()
	if len(snap.ParentIDs) > 0 && !staging {
		dir, err := s.acquireView(ctx, info.Parent, snap.ID)
		if err != nil {
			return nil, fmt.Errorf("view of %s for %s: %w", info.Parent, info.Name, err)
		}
		lower = dir
	}
	if snap.Kind == snapshots.KindView {
		m, err := overlay.ReadOnlyBind(lower)
		return []mount.Mount{m}, err
	}
	m, err := overlay.Container([]string{lower}, s.upperPath(snap.ID), s.workPath(snap.ID), s.ovl)
	return []mount.Mount{m}, err
}

// Commit turns an active snapshot into a committed one: its layer image is
// in the region (our differ put it there, or the region already had it), or
// it is made now from the upper directory.
func (s *Snapshotter) Commit(ctx context.Context, name, key string, opts ...snapshots.Opt) error {
	var (
		id   string
		info snapshots.Info
	)
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		var err error
		id, info, _, err = storage.GetInfo(ctx, key)
		return err
	})
	if err != nil {
		return err
	}
	if info.Kind != snapshots.KindActive {
		return fmt.Errorf("snapshot %s is not active: %w", key, errdefs.ErrFailedPrecondition)
	}
	st, _, err := stageOf(info)
	if err != nil {
		return err
	}
	// The parent may be given at commit (containerd's parallel unpack
	// rebases layers prepared without one).
	req, _, err := sanitizeOpts(opts, nil)
	if err != nil {
		return err
	}
	parent := info.Parent
	if parent == "" {
		parent = req.Parent
	}

	var layer digest.Digest
	switch {
	case st.staged():
		layer = st.layer()
	default:
		// The walking differ or a container wrote into the upper: convert
		// it, keyed by the image's own digest. Not by the diffID label: a
		// client can put any diffID on a snapshot and write anything into
		// it, and the region is shared by every participant; only layers
		// our differ checked against their blob are keyed by diffID.
		start := time.Now()
		var size int64
		layer, size, err = s.commitUpper(ctx, id)
		s.metrics.converted(size, time.Since(start), err)
		if err != nil {
			return fmt.Errorf("converting snapshot %s to a layer image: %w", key, err)
		}
	}
	// Reference accounting (see refs.go).
	s.refMu.Lock()
	defer s.refMu.Unlock()
	e, ok, err := s.lookupLayer(layer)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("layer %s of snapshot %s is no longer in the region: %w", layer, key, errdefs.ErrFailedPrecondition)
	}
	if err := s.region.Ref(daxmem.KindLayer, e.Key); err != nil {
		return fmt.Errorf("referencing layer %s of snapshot %s: %w", layer, key, regionErr(err))
	}
	committed := false
	defer func() {
		if !committed {
			s.unrefUnlessUsed(ctx, layer)
		}
	}()

	var parentChain digest.Digest
	if parent != "" {
		pinfo, err := s.info(ctx, parent)
		if err != nil {
			return fmt.Errorf("parent %s of %s: %w", parent, key, err)
		}
		parentChain = digest.Digest(pinfo.Labels[labelChain])
		if parentChain == "" {
			return fmt.Errorf("parent %s of %s has no layer chain: %w", parent, key, errdefs.ErrFailedPrecondition)
		}
	}
	private := map[string]string{
		labelLayer: layer.String(),
		labelChain: chainKey(parentChain, layer).String(),
	}
	_, opts, err = sanitizeOpts(opts, private)
	if err != nil {
		return err
	}
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		_, err := storage.CommitActive(ctx, key, name, snapshots.Usage{Size: e.Length, Inodes: 1}, opts...)
		return err
	})
	if err != nil {
		return fmt.Errorf("committing snapshot %s as %s: %w", key, name, err)
	}
	committed = true
	s.views.release(id)
	if err := os.RemoveAll(filepath.Join(s.root, "snapshots", id)); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("removing the committed snapshot's directory")
	}
	// The parent is an intermediate layer; name's view is warmed unless
	// a layer is to follow it or something builds on it first. Mounting
	// the view ahead of the first container takes building the view and
	// mounting it (tens of milliseconds for a Debian image) off the
	// container's start.
	s.warmer.cancel(parent)
	chain := info.Labels[labelSnapshotRef]
	s.warmer.schedule(name, chain, func() bool { return s.awaited(ctx, chain) })
	return nil
}

// awaited reports whether an extraction snapshot in flight is to be
// committed over chain ID chain (its parent-chain-id label).
func (s *Snapshotter) awaited(ctx context.Context, chain string) bool {
	found := false
	err := s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindActive && isExtraction(info.Name, info.Labels) && info.Labels[labelParentChain] == chain {
				found = true
			}
			return nil
		})
	})
	if err != nil {
		log.G(ctx).WithError(err).WithField("chain", chain).Debug("cannot tell whether a layer follows: not warming its view")
		return true
	}
	return found
}

// Remove removes a snapshot. Its layer stays in the region while another
// committed snapshot (or another participant) references it.
func (s *Snapshotter) Remove(ctx context.Context, key string) error {
	s.refMu.Lock()
	defer s.refMu.Unlock()
	var (
		id    string
		info  snapshots.Info
		layer digest.Digest // the layer image this snapshot referenced
		inUse map[string]bool
	)
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		var err error
		id, info, _, err = storage.GetInfo(ctx, key)
		if err != nil {
			return err
		}
		// A committed snapshot's layer; an extraction snapshot's from
		// the region hit at Prepare, or from our differ's Publish.
		layer = digest.Digest(info.Labels[labelLayer])
		if _, _, err = storage.Remove(ctx, key); err != nil {
			return err
		}
		if layer == "" {
			return nil
		}
		inUse, err = layersInUse(ctx)
		return err
	})
	if err != nil {
		return fmt.Errorf("removing snapshot %s: %w", key, err)
	}
	s.views.release(id)
	s.warmer.cancel(key)
	if err := os.RemoveAll(filepath.Join(s.root, "snapshots", id)); err != nil {
		log.G(ctx).WithError(err).WithField("id", id).Warn("removing the snapshot's directory")
	}
	if layer != "" && !inUse[layer.String()] {
		s.unref(ctx, layer)
	}
	return nil
}

// Walk calls fn for every snapshot matching the filters.
func (s *Snapshotter) Walk(ctx context.Context, fn snapshots.WalkFunc, filters ...string) error {
	return s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			info.Labels = public(info.Labels)
			return fn(ctx, info)
		}, filters...)
	})
}

// Cleanup unmounts views no snapshot uses and removes directories of
// snapshots that no longer exist.
func (s *Snapshotter) Cleanup(ctx context.Context) error {
	var stale []string
	// Listed inside a write transaction, as containerd's overlay
	// snapshotter does: creates (which make their directory inside their
	// own write transaction) cannot interleave, and IDs only grow, so a
	// directory found stale here never belongs to a new snapshot.
	err := s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		ents, err := os.ReadDir(filepath.Join(s.root, "snapshots"))
		if err != nil {
			return err
		}
		for _, e := range ents {
			if _, ok := ids[e.Name()]; !ok {
				stale = append(stale, filepath.Join(s.root, "snapshots", e.Name()))
			}
		}
		return nil
	})
	if err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	for _, dir := range stale {
		if err := os.RemoveAll(dir); err != nil {
			log.G(ctx).WithError(err).WithField("path", dir).Warn("removing a stale snapshot directory")
		}
	}
	return s.cleanupViews(ctx)
}

// Close closes the metadata store. Mounted views stay mounted: running
// containers keep using them, and a restarted daemon adopts them.
func (s *Snapshotter) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.warmer.stop()
		err = s.ms.Close()
	})
	return err
}
