package tests

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	snapshotsproxy "github.com/containerd/containerd/v2/core/snapshots/proxy"
	"github.com/containerd/containerd/v2/core/snapshots/testsuite"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// TestSnapshotterSuiteGRPC runs containerd's snapshotter conformance suite
// against the daemon over its gRPC socket, a fresh daemon (and region) per
// case, the way containerd's proxy plugin talks to it. As in-process, the
// suite is told "overlayfs": container roots are overlayfs mounts.
func TestSnapshotterSuiteGRPC(t *testing.T) {
	testenv.RequireRoot(t)
	bin := daemonBinary(t)
	testsuite.SnapshotterSuite(t, "overlayfs", func(ctx context.Context, root string) (snapshots.Snapshotter, func() error, error) {
		return startSuiteDaemon(ctx, bin, root)
	})
}

func startSuiteDaemon(ctx context.Context, bin, root string) (snapshots.Snapshotter, func() error, error) {
	sockDir, err := os.MkdirTemp("/tmp", "dxs")
	if err != nil {
		return nil, nil, err
	}
	sock := filepath.Join(sockDir, "s.sock")
	logf, err := os.Create(filepath.Join(sockDir, "daemon.log"))
	if err != nil {
		return nil, nil, err
	}
	// An empty config file (the defaults), so a config installed on the
	// host cannot leak in; flags set the rest.
	cfg := filepath.Join(sockDir, "config.toml")
	if err := os.WriteFile(cfg, nil, 0o644); err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(bin, "serve", "--config", cfg, "--root", root, "--address", sock, "--region-path", filepath.Join(root, "region"),
		"--region-size", "512MiB", "--mount-mode", "fuse", "--log-level", "debug")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, nil, err
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); logf.Close(); close(exited) }()
	log := func() string { b, _ := os.ReadFile(logf.Name()); return string(b) }

	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		select {
		case <-exited:
			return nil, nil, fmt.Errorf("daemon exited at start:\n%s", log())
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			return nil, nil, fmt.Errorf("daemon did not serve on %s:\n%s", sock, log())
		}
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		_ = cmd.Process.Kill()
		return nil, nil, err
	}
	sn := snapshotsproxy.NewSnapshotter(snapshotsapi.NewSnapshotsClient(conn), "daxfs")
	cleanup := func() error {
		var errs []error
		errs = append(errs, conn.Close())
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
			errs = append(errs, fmt.Errorf("daemon did not stop on SIGTERM:\n%s", log()))
		}
		if cmd.ProcessState != nil && !cmd.ProcessState.Success() {
			errs = append(errs, fmt.Errorf("daemon exited with %v:\n%s", cmd.ProcessState, log()))
		}
		killMentioning(filepath.Join(root, "fuse"))
		mounts, _ := testenv.MountsUnder(root)
		for _, m := range slices.Backward(mounts) {
			_ = mount.UnmountAll(m, syscall.MNT_DETACH)
		}
		errs = append(errs, os.RemoveAll(sockDir))
		return errors.Join(errs...)
	}
	return sn, cleanup, nil
}
