package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

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

// viewTable tracks which views are mounted under mnt/ and which active and
// view snapshots use them. A view is mounted once per chain, however many
// containers use it; it is unmounted by Cleanup once no snapshot uses it
// (an unmount succeeds even while an overlay still uses a FUSE lower, so
// the users are counted here, not by the kernel).
type viewTable struct {
	s *Snapshotter

	mu      sync.Mutex
	mounted map[digest.Digest]*viewMount // by chain key
	users   map[string]digest.Digest     // snapshot ID -> chain key it uses
}

type viewMount struct {
	dir   string
	users int
	// done is closed when the mount attempt finished; err is its result.
	done chan struct{}
	err  error
}

func newViewTable(s *Snapshotter) *viewTable {
	return &viewTable{s: s, mounted: map[digest.Digest]*viewMount{}, users: map[string]digest.Digest{}}
}

func (t *viewTable) dir(chain digest.Digest) string {
	return filepath.Join(t.s.root, "mnt", chain.Encoded())
}

// adopt takes over views a previous run of the daemon left mounted, and
// counts the snapshots that use them, so running containers keep their
// lowers across a restart.
func (t *viewTable) adopt(ctx context.Context) error {
	infos, err := t.s.mounter.Mounted(ctx)
	if err != nil {
		return fmt.Errorf("listing existing view mounts: %w", err)
	}
	mnt := filepath.Join(t.s.root, "mnt")
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, mi := range infos {
		if filepath.Dir(mi.Target) != mnt {
			continue
		}
		chain := digest.NewDigestFromEncoded(digest.SHA256, filepath.Base(mi.Target))
		if chain.Validate() != nil {
			continue
		}
		vm := &viewMount{dir: mi.Target, done: make(chan struct{})}
		close(vm.done)
		t.mounted[chain] = vm
		log.G(ctx).WithField("chain", chain).Info("adopted mounted view")
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
			_, pinfo, _, err := storage.GetInfo(ctx, info.Parent)
			if err != nil {
				return err
			}
			chain := digest.Digest(pinfo.Labels[labelChain])
			if vm, ok := t.mounted[chain]; ok {
				vm.users++
				t.users[id] = chain
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

// acquire makes sure the view of committed snapshot parent is in the region
// and mounted, counts snapshot id as its user, and returns the directory.
func (t *viewTable) acquire(ctx context.Context, parent, id string) (string, error) {
	chain, layers, err := t.chainOf(ctx, parent)
	if err != nil {
		return "", err
	}
	t.mu.Lock()
	if c, ok := t.users[id]; ok && c == chain {
		if vm := t.mounted[chain]; vm != nil {
			t.mu.Unlock()
			<-vm.done
			return vm.dir, vm.err
		}
		delete(t.users, id)
	}
	vm, ok := t.mounted[chain]
	if !ok {
		vm = &viewMount{dir: t.dir(chain), done: make(chan struct{})}
		t.mounted[chain] = vm
		go func() {
			// Detached from the caller's cancellation: other callers may
			// be waiting for the same mount.
			vm.err = t.mount(context.WithoutCancel(ctx), chain, layers, vm.dir)
			close(vm.done)
		}()
	}
	vm.users++
	t.users[id] = chain
	t.mu.Unlock()

	<-vm.done
	if vm.err != nil {
		t.mu.Lock()
		vm.users--
		delete(t.users, id)
		if t.mounted[chain] == vm {
			delete(t.mounted, chain)
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
	chain, ok := t.users[id]
	if !ok {
		return
	}
	delete(t.users, id)
	if vm, ok := t.mounted[chain]; ok {
		vm.users--
	}
}

// cleanup unmounts views no snapshot uses.
func (t *viewTable) cleanup(ctx context.Context) error {
	t.mu.Lock()
	var idle []digest.Digest
	for chain, vm := range t.mounted {
		select {
		case <-vm.done:
		default:
			continue
		}
		if vm.users <= 0 {
			idle = append(idle, chain)
			delete(t.mounted, chain)
		}
	}
	t.mu.Unlock()
	var errs []error
	for _, chain := range idle {
		dir := t.dir(chain)
		if err := t.s.mounter.Unmount(ctx, dir); err != nil {
			errs = append(errs, fmt.Errorf("unmounting view %s: %w", chain, err))
			continue
		}
		_ = os.Remove(dir)
		if k, err := regionKey(chain); err == nil {
			if err := t.s.region.Unref(daxmem.KindView, k); err != nil && !errdefs.IsNotFound(err) {
				log.G(ctx).WithError(err).WithField("chain", chain).Warn("dropping our reference to a view")
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

// mount builds the view of chain in the region if no participant has yet,
// and mounts it on dir.
func (t *viewTable) mount(ctx context.Context, chain digest.Digest, layers []digest.Digest, dir string) error {
	e, window, err := t.ensureView(ctx, chain, layers)
	if err != nil {
		return err
	}
	if err := t.s.region.Ref(daxmem.KindView, e.Key); err != nil {
		return fmt.Errorf("referencing view %s: %w", chain, err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	src := mounter.Source{Path: t.s.region.Path(), Offset: e.Offset, Length: window}
	if base, ok := t.s.region.PhysAddr(); ok {
		src.PhysAddr, src.HasPhys = base+uint64(e.Offset), true
	}
	if err := t.s.mounter.Mount(ctx, src, dir); err != nil {
		_ = t.s.region.Unref(daxmem.KindView, e.Key)
		return fmt.Errorf("mounting view %s on %s: %w", chain, dir, err)
	}
	t.s.metrics.ViewsMounted.Add(1)
	log.G(ctx).WithField("chain", chain).WithField("layers", len(layers)).Debug("view mounted")
	return nil
}

// ensureView returns the READY view entry of chain and its window size,
// building and publishing it when the region has none.
func (t *viewTable) ensureView(ctx context.Context, chain digest.Digest, layers []digest.Digest) (daxmem.Entry, int64, error) {
	r := t.s.region
	k, err := regionKey(chain)
	if err != nil {
		return daxmem.Entry{}, 0, err
	}
	for {
		if e, ok := r.Lookup(daxmem.KindView, k); ok {
			// Another participant (or an earlier run) built it: its
			// superblock says how far its window reaches.
			b, err := r.Slice(e.Offset, r.Size()-e.Offset)
			if err != nil {
				return e, 0, err
			}
			img, err := daxfs.Open(b)
			if err != nil {
				return e, 0, fmt.Errorf("view %s in the region: %w", chain, err)
			}
			return e, int64(img.TotalSize()), nil
		}
		entries := make([]daxmem.Entry, len(layers))
		images := make([]*daxfs.Image, len(layers))
		below, end := int64(-1), int64(0)
		for i, l := range layers {
			e, ok, err := t.s.lookupLayer(l)
			if err != nil {
				return daxmem.Entry{}, 0, err
			}
			if !ok {
				return daxmem.Entry{}, 0, fmt.Errorf("layer %s of chain %s is not in the region: %w", l, chain, errdefs.ErrNotFound)
			}
			if images[i], err = t.s.image(e); err != nil {
				return daxmem.Entry{}, 0, fmt.Errorf("layer %s: %w", l, err)
			}
			entries[i] = e
			if below < 0 || e.Offset < below {
				below = e.Offset
			}
			end = max(end, e.Offset+e.Length)
		}
		plan, err := converter.PlanView(images)
		if err != nil {
			return daxmem.Entry{}, 0, fmt.Errorf("planning view %s: %w", chain, err)
		}
		c, err := r.Claim(ctx, daxmem.KindView, k, plan.Size(), daxmem.ClaimOptions{Below: below})
		switch {
		case errors.Is(err, daxmem.ErrExists):
			continue
		case errors.Is(err, daxmem.ErrBusy):
			if _, err := r.Wait(ctx, daxmem.KindView, k); err != nil && !errors.Is(err, daxmem.ErrAbandoned) {
				return daxmem.Entry{}, 0, fmt.Errorf("waiting for view %s: %w", chain, err)
			}
			continue
		case err != nil:
			return daxmem.Entry{}, 0, fmt.Errorf("claiming %d bytes for view %s: %w", plan.Size(), chain, err)
		}
		bases := make([]uint64, len(entries))
		for i, e := range entries {
			bases[i] = uint64(e.Offset - c.Offset())
		}
		window := end - c.Offset()
		if err := plan.Write(daxfs.NewWindow(c.Bytes()), bases, uint64(window)); err != nil {
			_ = c.Abort(ctx)
			return daxmem.Entry{}, 0, fmt.Errorf("writing view %s: %w", chain, err)
		}
		e, err := c.Publish(ctx, plan.Size())
		if err != nil {
			_ = c.Abort(ctx)
			return daxmem.Entry{}, 0, fmt.Errorf("publishing view %s: %w", chain, err)
		}
		t.s.metrics.ViewsBuilt.Add(1)
		return e, window, nil
	}
}
