package tests

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

var (
	buildOnce   sync.Once
	daemonPath  string
	daemonBuild error
)

// daemonBinary builds containerd-daxfs-grpc once per test binary.
func daemonBinary(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "daxfs-e2e-bin-")
		if err != nil {
			daemonBuild = err
			return
		}
		daemonPath = filepath.Join(dir, "containerd-daxfs-grpc")
		cmd := exec.Command("go", "build", "-o", daemonPath, "./cmd/containerd-daxfs-grpc")
		cmd.Dir = testenv.ModuleRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			daemonBuild = fmt.Errorf("building containerd-daxfs-grpc: %v\n%s", err, out)
		}
	})
	if daemonBuild != nil {
		tb.Fatal(daemonBuild)
	}
	return daemonPath
}

// daxfsDaemon is a containerd-daxfs-grpc daemon with its own root, region
// file and socket, next to a containerd configured to use it.
type daxfsDaemon struct {
	Dir, Root, Socket, Region, LogPath string
	// Metrics is the host:port of the daemon's /metrics endpoint.
	Metrics string
	// ownRegion: the region file is this daemon's, removed at cleanup.
	ownRegion bool
	bin       string
	ctrd      *testenv.Containerd
	cmd       *exec.Cmd
	exited    chan struct{}
}

// containerdConfig is the containerd configuration of the README's "Using
// it with containerd 2.4" for
// a daemon serving on socket with state in root. unpacks > 1 sets the
// transfer service's max_concurrent_unpacks: with our rebase capability,
// its pulls then unpack layers in parallel.
func containerdConfig(socket, root string, unpacks int) string {
	parallel := ""
	if unpacks > 1 {
		parallel = fmt.Sprintf("\n  max_concurrent_unpacks = %d", unpacks)
	}
	return fmt.Sprintf(`
[proxy_plugins.daxfs]
  type = "snapshot"
  address = %q
  capabilities = ["rebase"]
  [proxy_plugins.daxfs.exports]
    root = %q
    enable_remote_snapshot_annotations = "true"
[proxy_plugins.daxfs-diff]
  type = "diff"
  address = %q
[plugins."io.containerd.service.v1.diff-service"]
  default = ["daxfs-diff", "walking"]
[plugins."io.containerd.transfer.v1.local"]%s
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
    differ = "walking"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "daxfs"
    differ = "daxfs-diff"
    # pre-converted images made before the current media types
    layer_types = [%q, %q]
`, socket, root, socket, parallel, converter.LegacyMediaTypeLayer, converter.LegacyMediaTypeLayerZstd)
}

// nodeDropIn writes deploy/containerd-daxfs.toml into dir with the
// daemon's socket and root in place of the host paths it names, and
// returns its path.
func nodeDropIn(t testing.TB, dir, socket, root string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(testenv.ModuleRoot(), "deploy", "containerd-daxfs.toml"))
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	for from, to := range map[string]string{
		"/run/containerd-daxfs/containerd-daxfs-grpc.sock": socket,
		"/var/lib/containerd-daxfs":                        root,
	} {
		if !strings.Contains(s, from) {
			t.Fatalf("deploy/containerd-daxfs.toml does not name %s", from)
		}
		s = strings.ReplaceAll(s, fmt.Sprintf("%q", from), fmt.Sprintf("%q", to))
	}
	p := filepath.Join(dir, "containerd-daxfs.toml")
	if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// daxfsOptions tune startWithDaxfs.
type daxfsOptions struct {
	// Region is the region file to use; default: a new one in the
	// daemon's directory. Two daemons given the same file are two
	// participants of one region, as two kernels sharing CXL memory are.
	Region string
	// ContentAPI makes the differ read layer blobs only through
	// containerd's content API (no containerd_root).
	ContentAPI bool
	// Mode is mount.mode; default "auto" (erofs here).
	Mode string
	// MaxConcurrentUnpacks is containerd's transfer service setting
	// (default 1: sequential unpacks).
	MaxConcurrentUnpacks int
	// DropIn configures containerd with deploy/containerd-daxfs.toml, the
	// drop-in of a Kubernetes node, imported as from conf.d (its socket
	// and root moved to the daemon's), instead of containerdConfig.
	DropIn bool
}

// startWithDaxfs starts a containerd wired to a fresh daxfs daemon and the
// daemon itself; both stop at cleanup.
func startWithDaxfs(t testing.TB, opts testenv.ContainerdOptions, dopts ...daxfsOptions) (*testenv.Containerd, *daxfsDaemon) {
	t.Helper()
	testenv.RequireRoot(t)
	bin := daemonBinary(t)
	dir, err := os.MkdirTemp("/tmp", "dx")
	if err != nil {
		t.Fatal(err)
	}
	d := &daxfsDaemon{
		Dir:    dir,
		Root:   filepath.Join(dir, "root"),
		Socket: filepath.Join(dir, "daxfs.sock"),
		// Shared memory, as in production (the default region lives in
		// /dev/shm): a region file on disk would make every publish an
		// msync to the disk.
		Region:  filepath.Join("/dev/shm", filepath.Base(dir)+"-region"),
		LogPath: filepath.Join(dir, "daxfs.log"),
	}
	d.ownRegion = true
	for _, o := range dopts {
		if o.Region != "" {
			d.Region, d.ownRegion = o.Region, false
		}
	}
	unpacks := 0
	for _, o := range dopts {
		unpacks = max(unpacks, o.MaxConcurrentUnpacks)
	}
	dropIn := false
	for _, o := range dopts {
		dropIn = dropIn || o.DropIn
	}
	if dropIn {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		opts.Imports = append(opts.Imports, nodeDropIn(t, dir, d.Socket, d.Root))
	} else {
		opts.ExtraConfig = containerdConfig(d.Socket, d.Root, unpacks) + opts.ExtraConfig
	}
	ctrd := testenv.StartContainerd(t, opts)
	d.ctrd = ctrd
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	d.Metrics = l.Addr().String()
	l.Close()
	ctrdRoot, mode := ctrd.Root, "auto"
	for _, o := range dopts {
		if o.ContentAPI {
			ctrdRoot = ""
		}
		if o.Mode != "" {
			mode = o.Mode
		}
	}
	cfg := fmt.Sprintf(`root = %q
address = %q
containerd_address = %q
containerd_root = %q
metrics_address = %q
log_level = "debug"
[region]
path = %q
size = "2GiB"
entries = 1024
[mount]
mode = %q
[gc]
interval = "1h"
`, d.Root, d.Socket, ctrd.Address(), ctrdRoot, d.Metrics, d.Region, mode)
	if err := os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	d.bin = bin
	// Registered first: a daemon that starts but never serves is stopped,
	// and its region file removed, too.
	t.Cleanup(func() { d.cleanup(t) })
	d.start(t)
	return ctrd, d
}

func (d *daxfsDaemon) start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(d.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(d.bin, "serve", "--config", filepath.Join(d.Dir, "config.toml"))
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		t.Fatal(err)
	}
	logf.Close()
	d.cmd = cmd
	d.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(d.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := net.Dial("unix", d.Socket); err == nil {
			c.Close()
			d.waitContainerd(t, deadline)
			return
		}
		select {
		case <-d.exited:
			t.Fatalf("containerd-daxfs-grpc exited at start:\n%s", d.logTail())
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("containerd-daxfs-grpc did not serve on %s:\n%s", d.Socket, d.logTail())
}

// waitContainerd waits until containerd reaches the daemon through both
// of its proxy plugins. After a restart, containerd's connections to the
// old daemon are broken and gRPC retries each with a backoff (up to 3 s
// in containerd 2.4): until it reconnects, containerd fails calls to that
// plugin at once ("connection refused"), as it would for a user who
// restarts the daemon. The probes must reach the daemon: listing
// snapshots is answered from containerd's own metadata, so the snapshot
// probe prepares and removes a snapshot, and the diff probe applies
// nothing: our differ, first in the diff service's order, declines it as
// not its mounts and the walking differ then fails to find the content.
// Any answer but "unavailable" shows our differ was reached.
func (d *daxfsDaemon) waitContainerd(t testing.TB, deadline time.Time) {
	t.Helper()
	if d.ctrd == nil {
		return
	}
	cl := d.ctrd.Client(t)
	ctx := d.ctrd.Context(context.Background())
	sn := cl.SnapshotService("daxfs")
	probe := func() error {
		key := fmt.Sprintf("probe-%d", time.Now().UnixNano())
		if _, err := sn.Prepare(ctx, key, ""); err != nil {
			return fmt.Errorf("snapshotter: %w", err)
		}
		if err := sn.Remove(ctx, key); err != nil {
			return fmt.Errorf("snapshotter: removing %s: %w", key, err)
		}
		_, err := cl.DiffService().Apply(ctx, ocispec.Descriptor{MediaType: "application/vnd.daxfs.probe"}, nil)
		if err != nil && (errdefs.IsUnavailable(err) || strings.Contains(err.Error(), "connection")) {
			return fmt.Errorf("differ: %w", err)
		}
		return nil
	}
	for {
		err := probe()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("containerd does not reach the daxfs daemon: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// kill stops the daemon with SIGKILL (its FUSE serving process stays).
func (d *daxfsDaemon) kill(t testing.TB) {
	t.Helper()
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-d.exited
}

func (d *daxfsDaemon) logTail() string {
	b, _ := os.ReadFile(d.LogPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > 60 {
		lines = lines[len(lines)-60:]
	}
	return strings.Join(lines, "\n")
}

// cleanup stops the daemon, then the FUSE serving processes, unmounts
// whatever is left under its directory and removes it. containerd's own
// cleanup (registered earlier) runs after this one.
func (d *daxfsDaemon) cleanup(t testing.TB) {
	if t.Failed() {
		t.Logf("containerd-daxfs-grpc log:\n%s", d.logTail())
		if b, err := os.ReadFile(filepath.Join(d.Root, "fuse", "serve.log")); err == nil {
			t.Logf("fuse-serve log:\n%s", b)
		}
	}
	// containerd must drop its containers before the lowers go away.
	if cl := d.ctrd; cl != nil {
		_, _ = cl.Ctr(t, "tasks", "ls")
	}
	if d.cmd != nil {
		select {
		case <-d.exited:
		default:
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.exited:
			case <-time.After(15 * time.Second):
				_ = d.cmd.Process.Kill()
				<-d.exited
			}
		}
	}
	// The FUSE serving process and its descriptor holder outlive the
	// daemon by design; end them here.
	killMentioning(filepath.Join(d.Root, "fuse"))
	mounts, _ := testenv.MountsUnder(d.Dir)
	for _, m := range slices.Backward(mounts) {
		_ = mount.UnmountAll(m, syscall.MNT_DETACH)
	}
	_ = os.RemoveAll(d.Dir)
	if d.ownRegion {
		_ = os.Remove(d.Region)
	}
}

// killMentioning SIGKILLs processes whose command line contains needle.
func killMentioning(needle string) {
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid := 0
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), needle) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// metrics scrapes the daemon's /metrics endpoint.
func (d *daxfsDaemon) metrics(t testing.TB) map[string]float64 {
	t.Helper()
	resp, err := http.Get("http://" + d.Metrics + "/metrics")
	if err != nil {
		t.Fatalf("scraping metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]float64{}
	for line := range strings.SplitSeq(string(body), "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var name string
		var v float64
		if _, err := fmt.Sscanf(line, "%s %g", &name, &v); err != nil {
			t.Fatalf("metrics line %q: %v", line, err)
		}
		out[name] = v
	}
	return out
}
