package guests

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/guest"
)

// Paths inside the guests.
const (
	guestPath       = "PATH=/kit/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	ctrdSocket      = "/run/containerd/containerd.sock"
	daxfsSocket     = "/run/containerd-daxfs/containerd-daxfs-grpc.sock"
	daxfsRoot       = "/var/lib/containerd-daxfs"
	daxfsLog        = "/var/log/containerd-daxfs.log"
	ctrdLog         = "/var/log/containerd.log"
	metricsAddr     = "127.0.0.1:9300"
	devDAX          = "/dev/dax0.0"
	registryInGuest = guest.ForwardIP + ":5000"
	namespace       = "default"
)

// cluster is the guests of one test with the share they mount on /kit.
type cluster struct {
	share  string // host directory: agent, bin/, one config directory per guest
	shared *guest.SharedMemory
	nodes  []*node
	// pmemAlias maps the shared memory a second time as legacy
	// persistent memory (/dev/pmem0) in the guests booted next.
	pmemAlias bool
}

// node is one guest running the product.
type node struct {
	*guest.Machine
	share    string // host side of /kit/<name>
	daxfsPID int
	// daxfsConfig replaces the default daemon configuration when set.
	daxfsConfig string
	proxy       *countingProxy
	bootNotes   string
}

// newCluster prepares the share (binaries and per-guest directories) and a
// shared memory file of size bytes under /dev/shm.
func newCluster(tb testing.TB, size int64) *cluster {
	tb.Helper()
	share, err := os.MkdirTemp("", "guest-share-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(share) })
	if err := os.Mkdir(filepath.Join(share, "bin"), 0o755); err != nil {
		tb.Fatal(err)
	}
	ents, err := os.ReadDir(binDir)
	if err != nil {
		tb.Fatal(err)
	}
	for _, e := range ents {
		dst := filepath.Join(share, "bin", e.Name())
		if e.Name() == "agent" {
			dst = filepath.Join(share, "agent")
		}
		if err := linkOrCopy(filepath.Join(binDir, e.Name()), dst); err != nil {
			tb.Fatal(err)
		}
	}
	if err := linkOrCopy(filepath.Join(binDir, "agent"), filepath.Join(share, "bin", "guest-agent")); err != nil {
		tb.Fatal(err)
	}
	memDir, err := os.MkdirTemp("/dev/shm", "guest-mem-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(memDir) })
	return &cluster{share: share, shared: &guest.SharedMemory{Path: filepath.Join(memDir, "memory"), Size: size}}
}

// boot starts guests named names in parallel, each with a registry
// forward to its own counting proxy in front of registry.
func (c *cluster) boot(tb testing.TB, registry string, names ...string) []*node {
	tb.Helper()
	nodes := make([]*node, len(names))
	var wg sync.WaitGroup
	errs := make([]error, len(names))
	for i, name := range names {
		dir := filepath.Join(c.share, name)
		if err := os.MkdirAll(dir, 0o755); err != nil {
			tb.Fatal(err)
		}
		n := &node{share: dir}
		if registry != "" {
			n.proxy = startCountingProxy(tb, registry)
		}
		nodes[i] = n
		cfg := guest.Config{Name: name, Kit: kit, Share: c.share, Shared: c.shared, PmemAlias: c.pmemAlias,
			Relay: []string{filepath.Join(c.share, "agent"), "relay"}}
		if n.proxy != nil {
			cfg.Forwards = []guest.Forward{{GuestPort: 5000, HostAddr: n.proxy.Addr}}
		}
		wg.Go(func() {
			n.Machine, errs[i] = guest.Start(cfg)
		})
	}
	wg.Wait()
	// Every started guest is stopped at cleanup, whichever failed.
	for _, n := range nodes {
		if n.Machine != nil {
			n.Machine.StopAtCleanup(tb)
		}
	}
	for i, name := range names {
		if errs[i] != nil {
			tb.Fatalf("booting guest %s: %v", name, errs[i])
		}
	}
	for _, n := range nodes {
		tb.Logf("guest %s booted in %s (TCG, kernel %s)", n.Name, n.BootTime.Round(100*time.Millisecond), kit.KernelVersion)
		n.setup(tb)
	}
	c.nodes = append(c.nodes, nodes...)
	return nodes
}

// setup loads the modules the product needs (the daxfs module is the
// kit's, see scripts/guest-kit.sh) and binds the shared memory's device to
// device_dax, checking it has a known physical base. Soft-reserved memory
// is given to dax_hmem regions meant for the kmem driver (which would
// online it as the guest's RAM); device_dax takes it only when told to,
// by new_id, as daxctl reconfigure-device does.
func (n *node) setup(tb testing.TB) {
	tb.Helper()
	out := n.sh(tb, `
modprobe -a dax_hmem device_dax erofs overlay loop
modprobe daxfs
grep -qw daxfs /proc/filesystems || { echo "daxfs not in /proc/filesystems"; exit 1; }
d=/sys/bus/dax/devices/dax0.0
i=0; while [ ! -e $d ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ -e $d ] || { echo "no dax0.0: the shared memory is not soft-reserved"; ls /sys/bus/dax/devices; exit 1; }
[ -e $d/driver ] || echo dax0.0 > /sys/bus/dax/drivers/device_dax/new_id
i=0; while ! { [ -c `+devDAX+` ] && [ "$(basename "$(readlink $d/driver)")" = device_dax ]; } && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
[ "$(basename "$(readlink $d/driver)")" = device_dax ] || { echo "dax0.0 is not bound to device_dax: $(readlink $d/driver)"; exit 1; }
echo "dax0.0 size=$(cat $d/size) align=$(cat $d/align) resource=$(cat $d/resource)"
mkdir -p /var/log
`)
	n.bootNotes = strings.TrimSpace(out)
	tb.Logf("guest %s: %s", n.Name, n.bootNotes)
}

// sh runs a script in the guest with the product's PATH; it fails the test
// unless the script exits 0.
func (n *node) sh(tb testing.TB, script string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res, err := n.Run(ctx, []string{guestPath}, "/bin/sh", "-ec", script)
	if err != nil {
		tb.Fatal(err)
	}
	if res.Exit != 0 || res.Error != "" {
		tb.Fatalf("guest %s: exit %d %s\nscript:%s\nstdout:\n%s\nstderr:\n%s", n.Name, res.Exit, res.Error, script, res.Stdout, res.Stderr)
	}
	return string(res.Stdout)
}

// try runs a script and returns its output and whether it exited 0.
func (n *node) try(tb testing.TB, script string) (string, string, bool) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	res, err := n.Run(ctx, []string{guestPath}, "/bin/sh", "-c", script)
	if err != nil {
		tb.Fatal(err)
	}
	return string(res.Stdout), string(res.Stderr), res.Exit == 0 && res.Error == ""
}

// ctr runs ctr against the guest's containerd and returns its output.
func (n *node) ctr(tb testing.TB, args ...string) string {
	tb.Helper()
	return n.sh(tb, "ctr --address "+ctrdSocket+" --namespace "+namespace+" "+strings.Join(args, " ")+" 2>/tmp/ctr.err || { cat /tmp/ctr.err >&2; exit 1; }")
}

// timedCtr runs ctr and returns how long it took in the guest.
func (n *node) timedCtr(tb testing.TB, args ...string) time.Duration {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	full := append([]string{"ctr", "--address", ctrdSocket, "--namespace", namespace}, args...)
	res, err := n.Run(ctx, []string{guestPath}, full...)
	if err != nil {
		tb.Fatal(err)
	}
	if res.Exit != 0 || res.Error != "" {
		tb.Fatalf("guest %s: %s: exit %d %s\n%s%s", n.Name, strings.Join(full, " "), res.Exit, res.Error, res.Stdout, res.Stderr)
	}
	return res.Elapsed
}

// containerdConfig is containerd's configuration in a guest: the README's
// daxfs proxy plugins and unpack configuration, overlayfs beside them.
const containerdConfig = `version = 3
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.images", "io.containerd.cri.v1.runtime",
  "io.containerd.podsandbox.controller.v1.podsandbox", "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "` + ctrdSocket + `"

[proxy_plugins.daxfs]
  type = "snapshot"
  address = "` + daxfsSocket + `"
  capabilities = ["rebase"]
  [proxy_plugins.daxfs.exports]
    root = "` + daxfsRoot + `"
    enable_remote_snapshot_annotations = "true"
[proxy_plugins.daxfs-diff]
  type = "diff"
  address = "` + daxfsSocket + `"
[plugins."io.containerd.service.v1.diff-service"]
  default = ["daxfs-diff", "walking"]
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
    differ = "walking"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "daxfs"
    differ = "daxfs-diff"
`

// daxfsConfig is the daemon's configuration in a guest: the region on the
// shared memory as device DAX, views mounted by mount.mode = "auto".
const daxfsConfig = `root = "` + daxfsRoot + `"
address = "` + daxfsSocket + `"
containerd_address = "` + ctrdSocket + `"
containerd_root = "/var/lib/containerd"
log_level = "debug"
metrics_address = "` + metricsAddr + `"

[region]
backend = "devdax"
path = "` + devDAX + `"

[mount]
mode = "auto"
`

// startProduct starts the daxfs daemon, then containerd, as the systemd
// units order them, and waits until both serve.
func (n *node) startProduct(tb testing.TB) {
	tb.Helper()
	dcfg := daxfsConfig
	if n.daxfsConfig != "" {
		dcfg = n.daxfsConfig
	}
	for name, body := range map[string]string{"containerd.toml": containerdConfig, "daxfs.toml": dcfg} {
		if err := os.WriteFile(filepath.Join(n.share, name), []byte(body), 0o644); err != nil {
			tb.Fatal(err)
		}
	}
	n.startDaxfs(tb)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := n.Start(ctx, ctrdLog, []string{guestPath}, "/kit/bin/containerd", "--config", "/kit/"+n.Name+"/containerd.toml"); err != nil {
		tb.Fatal(err)
	}
	n.waitFor(tb, "containerd", ctrdLog, "ctr --address "+ctrdSocket+" version >/dev/null 2>&1")
}

// startDaxfs starts containerd-daxfs-grpc and waits until it serves.
func (n *node) startDaxfs(tb testing.TB) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pid, err := n.Start(ctx, daxfsLog, []string{guestPath}, "/kit/bin/containerd-daxfs-grpc", "--config", "/kit/"+n.Name+"/daxfs.toml")
	if err != nil {
		tb.Fatal(err)
	}
	n.daxfsPID = pid
	n.waitFor(tb, "containerd-daxfs-grpc", daxfsLog, "[ -S "+daxfsSocket+" ] && busybox wget -qO /dev/null http://"+metricsAddr+"/metrics")
}

// waitContainerdReaches waits until the node's containerd reaches a
// restarted daemon: containerd's proxy reconnects with a backoff (up to
// 3 s), failing calls until then, and only a call the daemon answers
// proves it (a snapshot listing is containerd's own metadata).
func (n *node) waitContainerdReaches(tb testing.TB) {
	tb.Helper()
	c := "ctr --address " + ctrdSocket + " --namespace " + namespace + " snapshot --snapshotter daxfs "
	n.waitFor(tb, "containerd's connection to containerd-daxfs-grpc", ctrdLog, c+"prepare probe-$$ >/dev/null 2>&1 && "+c+"rm probe-$$")
}

// waitFor polls check in the guest for up to 2 minutes.
func (n *node) waitFor(tb testing.TB, what, logPath, check string) {
	tb.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		if _, _, ok := n.try(tb, check); ok {
			return
		}
		if time.Now().After(deadline) {
			out, _, _ := n.try(tb, "tail -n 40 "+logPath)
			tb.Fatalf("guest %s: %s did not come up within 2 minutes; log:\n%s", n.Name, what, out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// metrics returns the daemon's Prometheus counters and gauges by name
// (label sets summed).
func (n *node) metrics(tb testing.TB) map[string]float64 {
	tb.Helper()
	out := n.sh(tb, "busybox wget -qO- http://"+metricsAddr+"/metrics")
	m := map[string]float64{}
	for line := range strings.SplitSeq(out, "\n") {
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name := f[0]
		if i := strings.IndexByte(name, '{'); i >= 0 {
			name = name[:i]
		}
		v, err := strconv.ParseFloat(f[1], 64)
		if err == nil {
			m[name] += v
		}
	}
	return m
}

// daxfsMount is a view mounted by the daxfs module. ID is the mount's
// ID in mountinfo: a remount on the same target gets another.
type daxfsMount struct {
	ID, Target, Options string
}

// daxfsMounts lists the daxfs module's mounts in the guest (mountinfo:
// mount point and super options).
func (n *node) daxfsMounts(tb testing.TB) []daxfsMount {
	tb.Helper()
	out := n.sh(tb, "cat /proc/self/mountinfo")
	var ms []daxfsMount
	for line := range strings.SplitSeq(out, "\n") {
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 3 || g[0] != "daxfs" {
			continue
		}
		ms = append(ms, daxfsMount{ID: f[0], Target: f[4], Options: g[2]})
	}
	return ms
}

// daemonLog returns the daxfs daemon's log.
func (n *node) daemonLog(tb testing.TB) string {
	tb.Helper()
	out, _, _ := n.try(tb, "cat "+daxfsLog)
	return out
}
