package snapshotter

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
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

// viewTable tracks which views are mounted under mnt/ and which active and
// view snapshots use them. A view is mounted once, however many containers
// use it; Cleanup unmounts it once no snapshot uses it. An unmount succeeds
// even while an overlay still uses a FUSE lower, so users are counted here,
// not by the kernel.
type viewTable struct {
	s *Snapshotter

	// mu guards the maps, and is held across Cleanup's unmounts so that
	// an acquire never reuses a view being unmounted.
	mu      sync.Mutex
	mounted map[digest.Digest]*viewMount // by view key
	users   map[string]digest.Digest     // snapshot ID -> view key it uses

	// warmFor is how long a view mounted ahead of its first container
	// stays mounted without users (0: views are not warmed).
	warmFor time.Duration
	warmMu  sync.Mutex
	pending map[string]*pendingWarm // committed snapshot name -> its warming
	// awaited counts, by chain ID, the extraction snapshots in flight
	// that will be committed over it (their parent-chain-id label);
	// extracting maps such an extraction's key to that chain ID. Chain
	// IDs, not snapshot names: the names we see are containerd's
	// namespaced ones ("ns/12/sha256:..."), the labels hold bare chain
	// IDs.
	awaited    map[string]int
	extracting map[string]string
	closed     bool
}

type pendingWarm struct {
	timer *time.Timer
	chain string // the chain ID the unpacker committed, if known
}

type viewMount struct {
	dir   string
	users int
	// done is closed when the mount attempt finished; err is its result.
	done chan struct{}
	err  error
	// warmUntil keeps a view warmed for committed snapshot warmName
	// mounted without users until then, while that snapshot exists.
	warmUntil time.Time
	warmName  string
}

func newViewTable(s *Snapshotter, warmFor time.Duration) *viewTable {
	return &viewTable{s: s, mounted: map[digest.Digest]*viewMount{}, users: map[string]digest.Digest{},
		warmFor: warmFor, pending: map[string]*pendingWarm{},
		awaited: map[string]int{}, extracting: map[string]string{}}
}

// warmDelay is how long a freshly committed snapshot waits before its view
// is warmed when no layer is known to follow it. A sequential unpack
// prepares the next layer's snapshot over it a few milliseconds after the
// commit, which cancels the warming; the image's top layer is the one
// nothing follows. Short, because the first container often follows the
// unpack at once (ctr image pull && ctr run): the warming must be under
// way, if not done, when its Prepare comes.
const warmDelay = 50 * time.Millisecond

// extraction is told that extraction snapshot key was prepared to be
// committed over chain ID parentChain (the unpacker's parent-chain-id
// label; empty for a first layer). A parallel unpack prepares every layer
// before it commits the first, so a commit that some extraction awaits is
// not the image's top and needs no warm view.
// It reports whether it recorded the extraction.
func (t *viewTable) extraction(key, parentChain string) bool {
	if parentChain == "" || t.warmFor <= 0 {
		return false
	}
	t.warmMu.Lock()
	defer t.warmMu.Unlock()
	if _, ok := t.extracting[key]; ok {
		return false // a Prepare of a key in use: it fails
	}
	t.extracting[key] = parentChain
	t.awaited[parentChain]++
	for name, p := range t.pending {
		if p.chain == parentChain {
			t.cancelLocked(name)
		}
	}
	return true
}

// extractionDone is told that snapshot key was committed or removed.
func (t *viewTable) extractionDone(key string) {
	t.warmMu.Lock()
	defer t.warmMu.Unlock()
	parentChain, ok := t.extracting[key]
	if !ok {
		return
	}
	delete(t.extracting, key)
	if t.awaited[parentChain]--; t.awaited[parentChain] <= 0 {
		delete(t.awaited, parentChain)
	}
}

// committed is told that snapshot name, chain ID chain for the unpacker
// (its snapshot.ref label; empty if it has none), was committed over
// parent: the parent is an intermediate layer (no warming for it), and
// name's view is warmed after warmDelay unless a layer is to follow it
// (see extraction) or something builds on it first. Mounting the view
// ahead of the first container takes building the view and mounting it
// (tens of milliseconds for a Debian image) off the container's start.
func (t *viewTable) committed(name, parent, chain string) {
	if t.warmFor <= 0 {
		return
	}
	t.warmMu.Lock()
	defer t.warmMu.Unlock()
	if parent != "" {
		t.cancelLocked(parent)
	}
	if t.closed || (chain != "" && t.awaited[chain] > 0) {
		return
	}
	t.cancelLocked(name)
	p := &pendingWarm{chain: chain}
	t.pending[name] = p
	p.timer = time.AfterFunc(warmDelay, func() {
		t.warmMu.Lock()
		if t.pending[name] != p {
			// Cancelled (or replaced) after the timer fired but
			// before we got the lock.
			t.warmMu.Unlock()
			return
		}
		delete(t.pending, name)
		closed := t.closed
		t.warmMu.Unlock()
		if !closed {
			t.warm(context.Background(), name)
		}
	})
}

// built is told that an extraction snapshot was created over parent, or
// that parent was removed: parent's view needs no warming of its own.
func (t *viewTable) built(parent string) {
	if parent == "" || t.warmFor <= 0 {
		return
	}
	t.warmMu.Lock()
	defer t.warmMu.Unlock()
	t.cancelLocked(parent)
}

func (t *viewTable) cancelLocked(name string) {
	if p, ok := t.pending[name]; ok {
		p.timer.Stop()
		delete(t.pending, name)
	}
}

// stopWarming cancels pending warmings (the snapshotter closes).
func (t *viewTable) stopWarming() {
	t.warmMu.Lock()
	defer t.warmMu.Unlock()
	t.closed = true
	for name := range t.pending {
		t.cancelLocked(name)
	}
}

// warm mounts the view of committed snapshot name and keeps it mounted
// for warmFor even without users.
func (t *viewTable) warm(ctx context.Context, name string) {
	key, chain, layers, err := t.keyOf(ctx, name)
	if err != nil {
		log.G(ctx).WithError(err).WithField("snapshot", name).Debug("not warming the view of a snapshot")
		return
	}
	t.mu.Lock()
	vm, ok := t.mounted[key]
	if !ok {
		vm = &viewMount{dir: t.dir(key), done: make(chan struct{})}
		t.mounted[key] = vm
		go func() {
			err := t.mount(ctx, key, chain, layers, vm.dir)
			t.mu.Lock()
			vm.err = err
			if err != nil && t.mounted[key] == vm && vm.users == 0 {
				delete(t.mounted, key)
			}
			t.mu.Unlock()
			close(vm.done)
			if err != nil {
				log.G(ctx).WithError(err).WithField("snapshot", name).Warn("warming a view")
			} else {
				t.s.metrics.ViewsWarmed.Add(1)
			}
		}()
	}
	vm.warmUntil = time.Now().Add(t.warmFor)
	vm.warmName = name
	t.mu.Unlock()
}

func (t *viewTable) dir(key digest.Digest) string {
	return filepath.Join(t.s.root, "mnt", key.Encoded())
}

// adopt takes over views a previous run of the daemon left mounted, takes
// its region references on them back (they may have been cleared while the
// daemon was down), and counts the snapshots that use them, so running
// containers keep their lowers across a restart.
func (t *viewTable) adopt(ctx context.Context) error {
	infos, err := t.s.mounter.Mounted(ctx)
	if err != nil {
		return fmt.Errorf("listing existing view mounts: %w", err)
	}
	mnt := filepath.Join(t.s.root, "mnt")
	dirs := map[string]bool{mnt: true}
	if real, err := filepath.EvalSymlinks(mnt); err == nil {
		dirs[real] = true // mountinfo shows resolved paths
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, mi := range infos {
		if !dirs[filepath.Dir(mi.Target)] || mi.State == mounter.StateDetached {
			// Detached connections still serve overlays of containers
			// that ran before, but are no mount point to hand out.
			continue
		}
		key := digest.NewDigestFromEncoded(digest.SHA256, filepath.Base(mi.Target))
		if key.Validate() != nil {
			continue
		}
		if k, err := regionKey(key); err == nil {
			if err := t.s.region.Ref(daxmem.KindView, k); err != nil {
				log.G(ctx).WithError(err).WithField("view", key).Error("an adopted view is not in the region: it is not reused")
				continue
			}
		}
		vm := &viewMount{dir: t.dir(key), done: make(chan struct{})}
		close(vm.done)
		t.mounted[key] = vm
		log.G(ctx).WithField("view", key).Info("adopted mounted view")
	}
	err = t.s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		return storage.WalkInfo(ctx, func(ctx context.Context, info snapshots.Info) error {
			if info.Kind == snapshots.KindCommitted || info.Parent == "" {
				return nil
			}
			id, _, _, err := storage.GetInfo(ctx, info.Name)
			if err != nil {
				return err
			}
			key, _, _, err := t.keyOf(ctx, info.Parent)
			if err != nil {
				log.G(ctx).WithError(err).WithField("snapshot", info.Name).Warn("the view of this snapshot cannot be rebuilt")
				return nil
			}
			if vm, ok := t.mounted[key]; ok {
				vm.users++
				t.users[id] = key
			}
			return nil
		})
	})
	if errdefs.IsNotFound(err) {
		// A new metadata store has no buckets yet: nothing to adopt.
		return nil
	}
	return err
}

// exists reports whether snapshot name is in the metadata store.
func (t *viewTable) exists(ctx context.Context, name string) bool {
	err := t.s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		_, _, _, err := storage.GetInfo(ctx, name)
		return err
	})
	return err == nil
}

// keyOf returns the view key, chain key and layer entries (bottom first) of
// committed snapshot name.
func (t *viewTable) keyOf(ctx context.Context, name string) (digest.Digest, digest.Digest, []daxmem.Entry, error) {
	chain, layers, err := t.chainOf(ctx, name)
	if err != nil {
		return "", "", nil, err
	}
	entries := make([]daxmem.Entry, len(layers))
	for i, l := range layers {
		e, ok, err := t.s.lookupLayer(l)
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

// acquire makes sure the view of committed snapshot parent is in the region
// and mounted, counts snapshot id as its user, and returns the directory.
func (t *viewTable) acquire(ctx context.Context, parent, id string) (string, error) {
	key, chain, layers, err := t.keyOf(ctx, parent)
	if err != nil {
		return "", err
	}
	t.mu.Lock()
	if k, ok := t.users[id]; ok {
		if vm := t.mounted[k]; k == key && vm != nil {
			t.mu.Unlock()
			<-vm.done
			return vm.dir, vm.err
		}
		// Its old view is gone or stale: count it on the current one.
		if vm := t.mounted[k]; vm != nil {
			vm.users--
		}
		delete(t.users, id)
	}
	vm, ok := t.mounted[key]
	if !ok {
		vm = &viewMount{dir: t.dir(key), done: make(chan struct{})}
		t.mounted[key] = vm
		go func() {
			// Detached from the caller's cancellation: other callers may
			// be waiting for the same mount.
			vm.err = t.mount(context.WithoutCancel(ctx), key, chain, layers, vm.dir)
			close(vm.done)
		}()
	}
	vm.users++
	t.users[id] = key
	t.mu.Unlock()

	<-vm.done
	if vm.err != nil {
		t.mu.Lock()
		vm.users--
		if t.users[id] == key {
			delete(t.users, id)
		}
		if t.mounted[key] == vm {
			delete(t.mounted, key)
		}
		t.mu.Unlock()
		return "", vm.err
	}
	return vm.dir, nil
}

// release drops snapshot id's use of its view. The view stays mounted until
// Cleanup.
func (t *viewTable) release(ctx context.Context, id string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	key, ok := t.users[id]
	if !ok {
		return
	}
	delete(t.users, id)
	if vm, ok := t.mounted[key]; ok {
		vm.users--
	}
}

// cleanup unmounts views no snapshot uses and drops our references on them.
// It holds the table's lock throughout, so a concurrent acquire of the same
// view waits and then mounts it afresh instead of getting a directory being
// unmounted; a view whose unmount fails stays in the table (and referenced)
// for the next Cleanup.
func (t *viewTable) cleanup(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	var errs []error
	for key, vm := range t.mounted {
		select {
		case <-vm.done:
		default:
			continue // still being mounted
		}
		if vm.users > 0 {
			continue
		}
		if time.Now().Before(vm.warmUntil) && t.exists(ctx, vm.warmName) {
			continue // warmed for an image that is still here
		}
		// NotFound: something else took it off already.
		if err := t.s.mounter.Unmount(ctx, vm.dir); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("unmounting view %s: %w", key, err))
			continue
		}
		delete(t.mounted, key)
		t.s.metrics.ViewsUnmounted.Add(1)
		_ = os.Remove(vm.dir)
		if k, err := regionKey(key); err == nil {
			if err := t.s.region.Unref(daxmem.KindView, k); err != nil && !errors.Is(err, daxmem.ErrNotFound) {
				log.G(ctx).WithError(err).WithField("view", key).Warn("dropping our reference to a view")
			}
		}
	}
	return errors.Join(errs...)
}

// chainOf returns the chain key of committed snapshot name and its layer
// keys, bottom first.
func (t *viewTable) chainOf(ctx context.Context, name string) (digest.Digest, []digest.Digest, error) {
	var (
		chain  digest.Digest
		layers []digest.Digest
	)
	err := t.s.ms.WithTransaction(ctx, false, func(ctx context.Context) error {
		for n := name; n != ""; {
			_, info, _, err := storage.GetInfo(ctx, n)
			if err != nil {
				return err
			}
			if info.Kind != snapshots.KindCommitted {
				return fmt.Errorf("parent %s is not committed: %w", n, errdefs.ErrFailedPrecondition)
			}
			l := digest.Digest(info.Labels[labelLayer])
			if l == "" {
				return fmt.Errorf("snapshot %s has no layer image: %w", n, errdefs.ErrFailedPrecondition)
			}
			if chain == "" {
				chain = digest.Digest(info.Labels[labelChain])
			}
			layers = append(layers, l)
			n = info.Parent
		}
		return nil
	})
	if err != nil {
		return "", nil, err
	}
	for i, j := 0, len(layers)-1; i < j; i, j = i+1, j-1 {
		layers[i], layers[j] = layers[j], layers[i]
	}
	return chain, layers, nil
}

// mount builds the view in the region if no participant has yet, and
// mounts it on dir.
func (t *viewTable) mount(ctx context.Context, key, chain digest.Digest, layers []daxmem.Entry, dir string) error {
	start := time.Now()
	e, window, err := t.ensureView(ctx, key, chain, layers)
	if err != nil {
		return err
	}
	built := time.Since(start)
	if err := t.s.region.Ref(daxmem.KindView, e.Key); err != nil {
		return fmt.Errorf("referencing view %s of chain %s: %w", key, chain, regionErr(err))
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := mounter.DetachStale(ctx, dir); err != nil {
		_ = t.s.region.Unref(daxmem.KindView, e.Key)
		return err
	}
	src := mounter.Source{Path: t.s.region.Path(), Offset: e.Offset, Length: window}
	if base, ok := t.s.region.PhysAddr(); ok {
		src.PhysAddr, src.HasPhys = base+uint64(e.Offset), true
	}
	if err := t.s.mounter.Mount(ctx, src, dir); err != nil {
		_ = t.s.region.Unref(daxmem.KindView, e.Key)
		return fmt.Errorf("mounting view of chain %s on %s: %w", chain, dir, err)
	}
	t.s.metrics.ViewsMounted.Add(1)
	log.G(ctx).WithField("chain", chain).WithField("view", key).WithField("layers", len(layers)).
		WithField("build", built).WithField("total", time.Since(start)).Debug("view mounted")
	return nil
}

// ensureView returns the READY view entry for key and its window size,
// building and publishing it when the region has none.
func (t *viewTable) ensureView(ctx context.Context, key, chain digest.Digest, entries []daxmem.Entry) (daxmem.Entry, int64, error) {
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
	c, existing, err := t.s.claim(ctx, daxmem.KindView, k, func() (int64, daxmem.ClaimOptions, error) {
		images := make([]*daxfs.Image, len(entries))
		for i, e := range entries {
			var err error
			if images[i], err = t.s.image(e); err != nil {
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
		st := t.s.region.Stats()
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
	t.s.metrics.ViewsBuilt.Add(1)
	return e, window, nil
}
