package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// daemonBinary is the containerd-daxfs-grpc binary TestMain builds: the
// snapshotter starts it as the FUSE serving process, as the daemon does.
var daemonBinary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "daxfs-snapshotter-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	daemonBinary = filepath.Join(dir, "containerd-daxfs-grpc")
	build := exec.Command("go", "build", "-o", daemonBinary, "./cmd/containerd-daxfs-grpc")
	build.Dir = testenv.ModuleRoot()
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building containerd-daxfs-grpc:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// newTestSnapshotter builds a snapshotter on real parts: a file-backed
// region under root, the FUSE serving process, overlayfs. configure, when
// given, adjusts its Config.
func newTestSnapshotter(ctx context.Context, root string, configure ...func(*Config)) (*Snapshotter, func() error, error) {
	region, err := daxmem.Create(ctx, daxmem.Options{
		Path:         filepath.Join(root, "region"),
		Size:         512 << 20,
		Entries:      1024,
		Participants: 4,
	})
	if err != nil {
		return nil, nil, err
	}
	if _, err := region.Join(ctx, daxmem.ParticipantInfo{Host: "test", PID: os.Getpid()}, filepath.Join(root, "participant")); err != nil {
		region.Close()
		return nil, nil, err
	}
	fuseState := filepath.Join(root, "fuse")
	mnt, err := mounter.New(ctx, mounter.ModeFUSE, mounter.FUSEOptions{StateDir: fuseState, Binary: daemonBinary, Validate: true})
	if err != nil {
		region.Close()
		return nil, nil, err
	}
	cfg := Config{Root: root, Region: region, Mounter: mnt, Overlay: overlay.DefaultOptions()}
	for _, c := range configure {
		c(&cfg)
	}
	sn, err := New(ctx, cfg)
	if err != nil {
		region.Close()
		return nil, nil, err
	}
	cleanup := func() error {
		var errs []error
		errs = append(errs, sn.Close())
		infos, err := mnt.Mounted(ctx)
		errs = append(errs, err)
		for _, mi := range infos {
			errs = append(errs, mnt.Unmount(ctx, mi.Target))
		}
		errs = append(errs, fusesrv.NewClient(fuseState, nil).Quit(ctx))
		errs = append(errs, region.Close())
		return errors.Join(errs...)
	}
	return sn, cleanup, nil
}

// TestSnapshotterSuite runs containerd's snapshotter conformance suite
// in-process. The suite is told we are "overlayfs": container roots are
// overlayfs mounts, so renaming a lower directory needs redirect_dir,
// exactly as for containerd's overlayfs and erofs snapshotters.
func TestSnapshotterSuite(t *testing.T) {
	testenv.RequireRoot(t)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return newTestSnapshotter(ctx, root)
	})
}
