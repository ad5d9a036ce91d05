package mounter

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/errdefs"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

const roleEnv = "MOUNTER_TEST_FUSE_SERVE"

// TestMain lets the test binary act as `fuse-serve` for the FUSE mounter.
func TestMain(m *testing.M) {
	if os.Getenv(roleEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := fusesrv.Main(ctx, os.Args[2:]) // after the "fuse-serve" argument
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestFUSEMounter: the FUSE mounter mounts (even a source with a physical
// address), a second Mounter (a restarted daemon) sees the mount, and
// Unmount removes it.
func TestFUSEMounter(t *testing.T) {
	testenv.RequireRoot(t)
	if ok, _ := KernelAvailable(); ok {
		t.Fatal("this test expects no daxfs kernel module")
	}
	ctx, fo := testMounterOptions(t)

	if _, err := New(ctx, ModeKernel, fo); !errdefs.IsNotImplemented(err) {
		t.Errorf("kernel mode without the module: %v, want not implemented", err)
	}
	if _, err := New(ctx, "bogus", fo); !errdefs.IsInvalidArgument(err) {
		t.Errorf("bogus mode: %v", err)
	}
	m, err := New(ctx, ModeFUSE, fo)
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
	st, _ := os.Stat(img)
	target := filepath.Join(dir, "mnt")
	os.Mkdir(target, 0o755)
	if err := m.Mount(ctx, Source{Path: img, Length: st.Size(), PhysAddr: 0x100000000, HasPhys: true}, target); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(target, "one")); err != nil || string(b) != "x" {
		t.Errorf("read through the mount: %q %v", b, err)
	}
	// A restarted daemon re-adopts what is mounted.
	m2, err := New(ctx, ModeFUSE, fo)
	if err != nil {
		t.Fatal(err)
	}
	ms, err := m2.Mounted(ctx)
	if err != nil || len(ms) != 1 || ms[0].Target != target || ms[0].Kind != KindFUSE || ms[0].Source.Path != img {
		t.Fatalf("Mounted = %+v, %v", ms, err)
	}
	if err := m2.Unmount(ctx, target); err != nil {
		t.Fatal(err)
	}
	if err := m2.Unmount(ctx, target); !errdefs.IsNotFound(err) {
		t.Errorf("second unmount: %v, want not found", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		ms, _ := m.Mounted(ctx)
		if len(ms) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still mounted: %+v", ms)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
