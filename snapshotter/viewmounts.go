package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/mounter"
)

// viewMounts is the table of the views mounted under mnt/ and of the
// active and view snapshots that use them. A view is mounted once, however
// many containers use it, and unmounted by cleanup once none does. An
// unmount succeeds even while an overlay still uses a FUSE lower, so users
// are counted here, not by the kernel. This is in memory only: a restarted
// daemon rebuilds it from the mounter's list (adopt, adoptUser).
type viewMounts struct {
	dir     string // mnt/: a view is mounted on dir/<view key's hex>
	mounter mounter.Mounter

	// mu guards the maps, and is held across cleanup's unmounts so that
	// an acquire never reuses a view being unmounted.
	mu      sync.Mutex
	mounted map[digest.Digest]*viewMount // by view key
	users   map[string]digest.Digest     // snapshot ID -> view key it uses
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

// mountFunc puts view key (building it first if need be) on dir.
type mountFunc func(ctx context.Context, dir string) error

func newViewMounts(dir string, m mounter.Mounter) *viewMounts {
	return &viewMounts{dir: dir, mounter: m, mounted: map[digest.Digest]*viewMount{}, users: map[string]digest.Digest{}}
}

func (t *viewMounts) dirOf(key digest.Digest) string {
	return filepath.Join(t.dir, key.Encoded())
}

// acquire makes sure view key is mounted (with mount, unless it is or is
// being mounted), counts snapshot id as its user, and returns the
// directory. A snapshot uses one view: counted on another before, it is
// moved to this one.
func (t *viewMounts) acquire(ctx context.Context, key digest.Digest, id string, mount mountFunc) (string, error) {
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
		vm = t.startLocked(ctx, key, mount)
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

// startLocked records view key as being mounted and mounts it in the
// background, detached from the caller's cancellation: other callers may
// come to wait for the same mount.
func (t *viewMounts) startLocked(ctx context.Context, key digest.Digest, mount mountFunc) *viewMount {
	vm := &viewMount{dir: t.dirOf(key), done: make(chan struct{})}
	t.mounted[key] = vm
	ctx = context.WithoutCancel(ctx)
	go func() {
		err := mount(ctx, vm.dir)
		t.mu.Lock()
		vm.err = err
		t.mu.Unlock()
		close(vm.done)
	}()
	return vm
}

// warm mounts view key for committed snapshot name unless it is (or is
// being) mounted, and keeps it mounted without users until until, while
// that snapshot exists (see cleanup). It reports whether it mounted the
// view, and how that went.
func (t *viewMounts) warm(ctx context.Context, key digest.Digest, name string, until time.Time, mount mountFunc) (bool, error) {
	t.mu.Lock()
	vm, ok := t.mounted[key]
	if !ok {
		vm = t.startLocked(ctx, key, mount)
	}
	vm.warmUntil, vm.warmName = until, name
	t.mu.Unlock()
	if ok {
		return false, nil
	}
	<-vm.done
	if vm.err != nil {
		t.mu.Lock()
		if t.mounted[key] == vm && vm.users == 0 {
			delete(t.mounted, key)
		}
		t.mu.Unlock()
	}
	return true, vm.err
}

// release drops snapshot id's use of its view. The view stays mounted
// until cleanup.
func (t *viewMounts) release(id string) {
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

// adopt takes over the views an earlier run left mounted under dir,
// listed by the mounter, as mounted views without users. take is asked
// for each (it takes the region reference back) and may refuse it.
// Detached FUSE connections still serve overlays of containers that ran
// before, but are no mount point to hand out.
func (t *viewMounts) adopt(ctx context.Context, infos []mounter.MountInfo, take func(key digest.Digest) bool) {
	dirs := map[string]bool{t.dir: true}
	if real, err := filepath.EvalSymlinks(t.dir); err == nil {
		dirs[real] = true // mountinfo shows resolved paths
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, mi := range infos {
		if !dirs[filepath.Dir(mi.Target)] || mi.State == mounter.StateDetached {
			continue
		}
		key := digest.NewDigestFromEncoded(digest.SHA256, filepath.Base(mi.Target))
		if key.Validate() != nil || t.mounted[key] != nil || !take(key) {
			continue
		}
		vm := &viewMount{dir: t.dirOf(key), done: make(chan struct{})}
		close(vm.done)
		t.mounted[key] = vm
		log.G(ctx).WithField("view", key).WithField("kind", mi.Kind).Info("adopted mounted view")
	}
}

// adoptUser counts snapshot id as a user of view key if it is mounted:
// a container that ran before a restart.
func (t *viewMounts) adoptUser(id string, key digest.Digest) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if vm, ok := t.mounted[key]; ok {
		vm.users++
		t.users[id] = key
	}
}

// cleanup unmounts the views no snapshot uses, except warm ones whose
// snapshot still exists (exists tells), and calls unmounted for each. It
// holds the table's lock throughout, so a concurrent acquire of the same
// view waits and then mounts it afresh instead of getting a directory
// being unmounted; a view whose unmount fails stays in the table for the
// next cleanup.
func (t *viewMounts) cleanup(ctx context.Context, exists func(name string) bool, unmounted func(key digest.Digest)) error {
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
		if time.Now().Before(vm.warmUntil) && exists(vm.warmName) {
			continue // warmed for an image that is still here
		}
		// NotFound: something else took it off already.
		if err := t.mounter.Unmount(ctx, vm.dir); err != nil && !errdefs.IsNotFound(err) {
			errs = append(errs, fmt.Errorf("unmounting view %s: %w", key, err))
			continue
		}
		delete(t.mounted, key)
		_ = os.Remove(vm.dir)
		unmounted(key)
	}
	return errors.Join(errs...)
}
