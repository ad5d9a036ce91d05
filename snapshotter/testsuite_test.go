package snapshotter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// daemonBinary builds the containerd-daxfs-grpc binary once, for the tests
// that need it: the snapshotter starts it as the FUSE serving process, as
// the daemon does. The tests against a fake mounter need neither it nor
// root.
var daemonBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "daxfs-snapshotter-bin-")
	if err != nil {
		return "", err
	}
	binDir = dir
	bin := filepath.Join(dir, "containerd-daxfs-grpc")
	build := exec.Command("go", "build", "-o", bin, "./cmd/containerd-daxfs-grpc")
	build.Dir = testenv.ModuleRoot()
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building containerd-daxfs-grpc: %v: %s", err, out)
	}
	return bin, nil
})

// binDir holds the binary daemonBinary built, if it did.
var binDir string

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
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
	bin, err := daemonBinary()
	if err != nil {
		region.Close()
		return nil, nil, err
	}
	fuseState := filepath.Join(root, "fuse")
	mnt, err := mounter.New(ctx, mounter.ModeFUSE, mounter.FUSEOptions{StateDir: fuseState, Binary: bin, Validate: true})
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
