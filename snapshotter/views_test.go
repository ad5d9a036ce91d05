package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// lowerOf returns the one lower directory of a container's mounts, or the
// source of a view's bind mount.
func lowerOf(t *testing.T, mounts []mount.Mount) string {
	t.Helper()
	if lowers, ok := overlay.LowerDirs(mounts); ok && len(lowers) == 1 {
		return lowers[0]
	}
	if len(mounts) == 1 && mounts[0].Type == "bind" {
		return mounts[0].Source
	}
	t.Fatalf("no single lower in %+v", mounts)
	return ""
}

// TestViewMountedOncePerChain: the containers and views of a chain share
// one view mount, which Cleanup leaves while any of them exists and takes
// off (with our region reference on the view) once none does; the next
// container mounts it again. Another chain gets its own view.
func TestViewMountedOncePerChain(t *testing.T) {
	e := newTestEnv(t)
	a, b := e.layer("a"), e.layer("b")
	names := e.pull("default/1", a, b)
	top := names[1]
	key := e.viewKeyOf(top)
	dir := filepath.Join(e.root, "mnt", key.Encoded())

	c1 := lowerOf(t, e.prepare("default/2/c1", top, nil))
	c2 := lowerOf(t, e.prepare("default/2/c2", top, nil))
	v1 := lowerOf(t, e.mustView("default/2/v1", top))
	if c1 != dir || c2 != dir || v1 != dir {
		t.Fatalf("lowers %s, %s, %s; want the view directory %s", c1, c2, v1, dir)
	}
	if m, _, targets := e.mnt.state(); m != 1 || len(targets) != 1 || targets[0] != dir {
		t.Fatalf("%d mounts, mounted %v; want one mount on %s", m, targets, dir)
	}
	if !e.referenced(daxmem.KindView, key) {
		t.Fatal("the mounted view is not referenced in the region")
	}
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, u, _ := e.mnt.state(); u != 0 {
		t.Fatalf("Cleanup unmounted a view in use (%d unmounts)", u)
	}
	for _, k := range []string{"default/2/c1", "default/2/c2", "default/2/v1"} {
		if err := e.sn.Remove(e.ctx, k); err != nil {
			t.Fatal(err)
		}
		if err := e.sn.Cleanup(e.ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, u, targets := e.mnt.state(); u != 1 || len(targets) != 0 {
		t.Fatalf("%d unmounts, still mounted %v; want the view taken off once", u, targets)
	}
	if e.referenced(daxmem.KindView, key) {
		t.Error("the unmounted view is still referenced")
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the view directory is left: %v", err)
	}
	if got := e.sn.Metrics().ViewsUnmounted.Load(); got != 1 {
		t.Errorf("%d views unmounted counted, want 1", got)
	}

	if lowerOf(t, e.prepare("default/3/c3", top, nil)) != dir {
		t.Fatal("the next container got another view")
	}
	other := lowerOf(t, e.prepare("default/3/c4", names[0], nil))
	if other == dir {
		t.Fatal("a container of the chain below shares the top chain's view")
	}
	if m, _, targets := e.mnt.state(); m != 3 || len(targets) != 2 {
		t.Fatalf("%d mounts, mounted %v; want the view mounted again and one for the other chain", m, targets)
	}
	if b := e.sn.Metrics().ViewsBuilt.Load(); b != 2 {
		t.Errorf("%d views built, want 2 (one per chain; the region keeps them)", b)
	}
}

// TestViewMountFailure: a failed view mount fails the Prepare (which
// leaves no snapshot behind and gives the view reference back), and the
// next Prepare mounts the view.
func TestViewMountFailure(t *testing.T) {
	e := newTestEnv(t)
	top := e.pull("default/1", e.layer("a"))[0]
	key := e.viewKeyOf(top)
	injected := errors.New("injected mount failure")
	e.mnt.mu.Lock()
	e.mnt.failNext = injected
	e.mnt.mu.Unlock()
	if _, err := e.sn.Prepare(e.ctx, "default/2/c1", top); !errors.Is(err, injected) {
		t.Fatalf("Prepare with a failing mount: %v, want the mount's error", err)
	}
	if _, err := e.sn.Stat(e.ctx, "default/2/c1"); err == nil {
		t.Error("the failed Prepare left its snapshot")
	}
	if e.referenced(daxmem.KindView, key) {
		t.Error("the view is referenced after its mount failed")
	}
	e.prepare("default/2/c1", top, nil)
	if m, _, targets := e.mnt.state(); m != 1 || len(targets) != 1 {
		t.Fatalf("%d mounts, mounted %v after the retry; want one", m, targets)
	}
}

// TestConcurrentPreparesShareOneMount: containers prepared at once over
// one chain wait for one mount; the caller that started it going away
// does not fail it for the others.
func TestConcurrentPreparesShareOneMount(t *testing.T) {
	e := newTestEnv(t)
	top := e.pull("default/1", e.layer("a"))[0]
	gate, entered := make(chan struct{}), make(chan string, 1)
	e.mnt.mu.Lock()
	e.mnt.gate, e.mnt.entered = gate, entered
	e.mnt.mu.Unlock()

	first, cancel := context.WithCancel(e.ctx)
	errc := make(chan error, 1)
	go func() {
		_, err := e.sn.Prepare(first, "default/2/first", top)
		errc <- err
	}()
	<-entered // the first Prepare is mounting
	const n = 8
	var wg sync.WaitGroup
	lowers := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			m, err := e.sn.Prepare(e.ctx, fmt.Sprintf("default/2/c%d", i), top)
			if errs[i] = err; err == nil {
				lowers[i] = lowerOf(t, m)
			}
		})
	}
	// Once every container waits for the mount, its starter goes away.
	key := e.viewKeyOf(top)
	for deadline := time.Now().Add(10 * time.Second); e.viewUsers(key) < n+1; {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d Prepares wait for the mount", e.viewUsers(key), n+1)
		}
		time.Sleep(time.Millisecond)
	}
	cancel()
	time.Sleep(20 * time.Millisecond)
	close(gate)
	wg.Wait()
	if err := <-errc; err != nil {
		t.Errorf("the Prepare that started the mount: %v", err)
	}
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("container %d: %v", i, errs[i])
		}
		if lowers[i] != lowers[0] {
			t.Fatalf("containers got different lowers: %s, %s", lowers[0], lowers[i])
		}
	}
	if m, _, _ := e.mnt.state(); m != 1 {
		t.Fatalf("%d mounts for %d concurrent containers of one chain, want 1", m, n+1)
	}
}

// TestCleanupDuringPrepares: Cleanup running while containers come and go
// never takes off a view a container was handed, and takes it off once
// they are gone.
func TestCleanupDuringPrepares(t *testing.T) {
	e := newTestEnv(t)
	top := e.pull("default/1", e.layer("a"))[0]
	stop := make(chan struct{})
	var cleaner sync.WaitGroup
	cleaner.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := e.sn.Cleanup(e.ctx); err != nil {
				t.Error(err)
				return
			}
		}
	})
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 25 {
				key := fmt.Sprintf("default/2/w%d-%d", w, i)
				m, err := e.sn.Prepare(e.ctx, key, top)
				if err != nil {
					t.Error(err)
					return
				}
				if dir := lowerOf(t, m); !e.mnt.isMounted(dir) {
					t.Errorf("%s was handed %s, which is not mounted", key, dir)
				}
				if err := e.sn.Remove(e.ctx, key); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	close(stop)
	cleaner.Wait()
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, targets := e.mnt.state(); len(targets) != 0 {
		t.Fatalf("still mounted after the last container and Cleanup: %v", targets)
	}
	if e.referenced(daxmem.KindView, e.viewKeyOf(top)) {
		t.Error("the view is still referenced")
	}
}

// TestAdoptViewsAtRestart: a restarted daemon adopts the views the
// mounter lists under mnt/ (takes its region reference back and counts the
// snapshots using them), so a new container reuses the mount and Cleanup
// leaves it while the old container exists. Mounts elsewhere, detached
// ones, and views the region no longer holds are not adopted.
func TestAdoptViewsAtRestart(t *testing.T) {
	e := newTestEnv(t)
	top := e.pull("default/1", e.layer("a"))[0]
	dir := lowerOf(t, e.prepare("default/2/old", top, nil))
	key := e.viewKeyOf(top)

	// While the daemon was down its references were cleared (its slot
	// reclaimed), and other mounts appeared.
	k, _ := daxmem.KeyFromDigest(key.String())
	if err := e.region.Unref(daxmem.KindView, k); err != nil {
		t.Fatal(err)
	}
	gone := filepath.Join(e.root, "mnt", digest.FromString("a view the region lost").Encoded())
	e.mnt.mu.Lock()
	e.mnt.mounted[gone] = mounter.Source{Path: "elsewhere"}
	e.mnt.mounted[filepath.Join(t.TempDir(), key.Encoded())] = mounter.Source{Path: "not under mnt"}
	e.mnt.mu.Unlock()

	e.restart()
	if !e.referenced(daxmem.KindView, key) {
		t.Fatal("the adopted view's reference was not taken back")
	}
	if lowerOf(t, e.prepare("default/3/new", top, nil)) != dir {
		t.Fatal("the new container did not get the adopted view")
	}
	if m, _, _ := e.mnt.state(); m != 1 {
		t.Fatalf("%d mounts; the adopted view should have been reused", m)
	}
	if err := e.sn.Remove(e.ctx, "default/3/new"); err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if !e.mnt.isMounted(dir) {
		t.Fatal("Cleanup took off the view of a container that ran before the restart")
	}
	if !e.mnt.isMounted(gone) {
		t.Error("Cleanup unmounted a mount it did not adopt")
	}
	if err := e.sn.Remove(e.ctx, "default/2/old"); err != nil {
		t.Fatal(err)
	}
	if err := e.sn.Cleanup(e.ctx); err != nil {
		t.Fatal(err)
	}
	if e.mnt.isMounted(dir) {
		t.Fatal("the adopted view outlived its last user's Cleanup")
	}
}

// mustView creates a view snapshot.
func (e *testEnv) mustView(key, parent string) []mount.Mount {
	e.t.Helper()
	m, err := e.sn.View(e.ctx, key, parent)
	if err != nil {
		e.t.Fatalf("view %s: %v", key, err)
	}
	return m
}

// viewUsers returns how many snapshots use (or wait for) view key.
func (e *testEnv) viewUsers(key digest.Digest) int {
	e.sn.views.mu.Lock()
	defer e.sn.views.mu.Unlock()
	if vm, ok := e.sn.views.mounted[key]; ok {
		return vm.users
	}
	return 0
}
