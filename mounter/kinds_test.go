package mounter

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

// TestEveryModeKnowsEveryKind: a Mounter lists and unmounts the mounts of
// every kind, whichever mode made them, as a daemon restarted in another
// mode needs: the FUSE mounter lists and takes off an erofs mount, the
// erofs mounter a FUSE mount (through the serving process, which forgets
// it). A mount that is not an image mount is refused by Unmount and taken
// off by DetachStale.
func TestEveryModeKnowsEveryKind(t *testing.T) {
	testenv.RequireRoot(t)
	ctx, fo := testMounterOptions(t)
	byEROFS, err := New(ctx, ModeEROFS, fo)
	if err != nil {
		t.Fatal(err)
	}
	byFUSE, err := New(ctx, ModeFUSE, fo)
	if err != nil {
		t.Fatal(err)
	}

	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	mtest.WriteTree(t, src)
	img := filepath.Join(dir, "img")
	if err := mtest.ImageFromDir(src, img); err != nil {
		t.Fatal(err)
	}
	erofsDir, fuseDir, tmpfsDir := filepath.Join(dir, "erofs"), filepath.Join(dir, "fuse"), filepath.Join(dir, "tmpfs")
	for _, d := range []string{erofsDir, fuseDir, tmpfsDir} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = unix.Unmount(d, unix.MNT_DETACH) })
	}
	if err := byEROFS.Mount(ctx, Source{Path: img}, erofsDir); err != nil {
		t.Fatal(err)
	}
	if err := byFUSE.Mount(ctx, Source{Path: img}, fuseDir); err != nil {
		t.Fatal(err)
	}
	for name, m := range map[string]Mounter{"erofs": byEROFS, "fuse": byFUSE} {
		infos, err := m.Mounted(ctx)
		if err != nil {
			t.Fatal(err)
		}
		kinds := map[string]string{}
		for _, mi := range infos {
			if mi.State == StateMounted {
				kinds[mi.Target] = mi.Kind
			}
		}
		if kinds[erofsDir] != KindEROFS || kinds[fuseDir] != KindFUSE || len(kinds) != 2 {
			t.Errorf("the %s mounter lists %v; want the erofs and the FUSE mount", name, kinds)
		}
	}

	if err := byFUSE.Unmount(ctx, erofsDir); err != nil {
		t.Fatalf("the FUSE mounter unmounting an erofs mount: %v", err)
	}
	if err := byEROFS.Unmount(ctx, fuseDir); err != nil {
		t.Fatalf("the erofs mounter unmounting a FUSE mount: %v", err)
	}
	for _, d := range []string{erofsDir, fuseDir} {
		if ok, err := mountinfo.Mounted(d); err != nil || ok {
			t.Errorf("%s still mounted after Unmount (%v)", d, err)
		}
		if err := byEROFS.Unmount(ctx, d); !errdefs.IsNotFound(err) {
			t.Errorf("unmounting %s again: %v, want not found", d, err)
		}
	}
	for deadline := time.Now().Add(10 * time.Second); ; {
		infos, err := byFUSE.Mounted(ctx)
		if err == nil && len(infos) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still listed after both unmounts: %+v, %v", infos, err)
		}
		time.Sleep(20 * time.Millisecond)
	}

	if err := unix.Mount("tmpfs", tmpfsDir, "tmpfs", 0, ""); err != nil {
		t.Fatal(err)
	}
	if err := byFUSE.Unmount(ctx, tmpfsDir); !errdefs.IsInvalidArgument(err) {
		t.Errorf("Unmount of a tmpfs: %v, want invalid argument (not an image mount)", err)
	}
	if err := DetachStale(ctx, tmpfsDir); err != nil {
		t.Fatal(err)
	}
	if ok, err := mountinfo.Mounted(tmpfsDir); err != nil || ok {
		t.Errorf("%s still mounted after DetachStale (%v)", tmpfsDir, err)
	}
}

// testMounterOptions returns a context bounded for a mounter test and the
// options of a FUSE serving process of its own (this test binary in its
// server role, state in a short temporary directory: socket paths are
// limited), stopped and removed when the test ends.
func testMounterOptions(t *testing.T) (context.Context, FUSEOptions) {
	t.Helper()
	t.Setenv(roleEnv, "1")
	exe, _ := os.Executable()
	state, err := os.MkdirTemp("", "mounter-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	t.Cleanup(func() { fusesrv.NewClient(state, nil).Quit(context.Background()) })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx, FUSEOptions{StateDir: state, Binary: exe}
}
