package testenv

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
)

// ContainerdOptions configures StartContainerd. The zero value starts a
// containerd with the stock snapshotters (overlayfs, native) and no CRI.
type ContainerdOptions struct {
	// EnableCRI keeps containerd's CRI plugins. They are disabled by
	// default: they add seconds to start-up and tests drive containerd
	// through ctr and the Go client.
	EnableCRI bool

	// ExtraConfig is TOML appended verbatim to the generated config
	// (version = 3), e.g. the [proxy_plugins.daxfs], diff-service and
	// transfer unpack_config blocks the README's "Using it with containerd
	// 2.4" shows. It may add tables
	// only (top-level keys must precede all tables) and must not repeat the
	// tables the harness writes: [grpc], [ttrpc], [debug] and [metrics].
	ExtraConfig string

	// Imports are configuration files containerd merges over the
	// generated config (its top-level imports key), as it does with
	// /etc/containerd/conf.d/*.toml.
	Imports []string

	// DisabledPlugins are disabled in addition to the harness defaults
	// (CRI unless EnableCRI, NRI, and snapshotters that cannot work here).
	DisabledPlugins []string

	// Namespace used by Ctr, Client and Context. Default: a name unique to
	// this daemon ("testenv-..."), so that runc state and cgroups, which
	// live in host-wide paths keyed by namespace, never collide between
	// daemons running at the same time.
	Namespace string

	// LogLevel of the daemon: default "debug" (the log is only shown when
	// the test fails).
	LogLevel string

	// Env holds extra environment variables for the daemon (KEY=VALUE).
	Env []string
}

// Containerd is a containerd daemon started by StartContainerd with its own
// root, state directory and sockets, stopped at test cleanup.
type Containerd struct {
	// Dir holds everything of this daemon: config.toml, containerd.log,
	// root/, state/ and the sockets.
	Dir string
	// Root and State are the daemon's root and state directories.
	Root, State string
	// ConfigPath is the generated config.toml; LogPath the daemon's log.
	ConfigPath, LogPath string
	// Namespace is the namespace Ctr, Client and Context use.
	Namespace string

	address, ttrpcAddress string
	env                   []string
	cmd                   *exec.Cmd
	exited                chan struct{}
	logFile               *os.File
}

// defaultDisabledPlugins are plugins the harness turns off: NRI listens on a
// host-wide socket (/var/run/nri/nri.sock) that parallel daemons would fight
// over, opt writes to /opt/containerd, tracing would try to export, and the
// listed snapshotters only log errors on this kind of host.
var defaultDisabledPlugins = []string{
	"io.containerd.nri.v1.nri",
	"io.containerd.snapshotter.v1.btrfs",
	"io.containerd.snapshotter.v1.zfs",
	"io.containerd.snapshotter.v1.devmapper",
	"io.containerd.snapshotter.v1.aufs",
	"io.containerd.tracing.processor.v1.otlp",
	"io.containerd.internal.v1.tracing",
	"io.containerd.internal.v1.opt",
}

var criPlugins = []string{
	"io.containerd.grpc.v1.cri",
	"io.containerd.cri.v1.images",
	"io.containerd.cri.v1.runtime",
	"io.containerd.podsandbox.controller.v1.podsandbox",
}

// StartContainerd starts a containerd daemon (the binary from .cache/bin)
// as root with a private root, state, gRPC and ttrpc socket, waits until it
// serves, and registers a cleanup that kills the tasks and shims it started,
// stops it, unmounts whatever is left under its directories and removes
// them. When the test has failed, the cleanup prints the tail of the
// daemon's log.
func StartContainerd(tb testing.TB, opts ContainerdOptions) *Containerd {
	tb.Helper()
	RequireRoot(tb)
	bin := Bin(tb, "containerd")
	Bin(tb, "containerd-shim-runc-v2") // fail early with a clear message
	Bin(tb, "runc")

	dir := shortTempDir(tb, "ctrd")
	c := &Containerd{
		Dir:          dir,
		Root:         filepath.Join(dir, "root"),
		State:        filepath.Join(dir, "state"),
		ConfigPath:   filepath.Join(dir, "config.toml"),
		LogPath:      filepath.Join(dir, "containerd.log"),
		Namespace:    opts.Namespace,
		address:      filepath.Join(dir, "containerd.sock"),
		ttrpcAddress: filepath.Join(dir, "containerd.sock.ttrpc"),
	}
	if c.Namespace == "" {
		c.Namespace = "testenv-" + strings.TrimPrefix(filepath.Base(dir), "ctrd")
	}
	if err := os.WriteFile(c.ConfigPath, []byte(c.config(opts)), 0o644); err != nil {
		tb.Fatalf("testenv: writing containerd config: %v", err)
	}
	c.env = append(os.Environ(), "PATH="+pathEnv())
	c.env = append(c.env, opts.Env...)
	tb.Cleanup(func() { c.cleanup(tb) })
	if err := c.start(bin); err != nil {
		tb.Fatalf("testenv: %v\n%s", err, c.logTail(80))
	}
	return c
}

func (c *Containerd) config(opts ContainerdOptions) string {
	disabled := append([]string{}, defaultDisabledPlugins...)
	if !opts.EnableCRI {
		disabled = append(disabled, criPlugins...)
	}
	disabled = append(disabled, opts.DisabledPlugins...)
	quoted := make([]string, len(disabled))
	for i, p := range disabled {
		quoted[i] = fmt.Sprintf("%q", p)
	}
	level := opts.LogLevel
	if level == "" {
		level = "debug"
	}
	var b strings.Builder
	fmt.Fprintf(&b, "version = 3\nroot = %q\nstate = %q\n", c.Root, c.State)
	fmt.Fprintf(&b, "disabled_plugins = [%s]\n", strings.Join(quoted, ", "))
	if len(opts.Imports) > 0 {
		imports := make([]string, len(opts.Imports))
		for i, p := range opts.Imports {
			imports[i] = fmt.Sprintf("%q", p)
		}
		fmt.Fprintf(&b, "imports = [%s]\n", strings.Join(imports, ", "))
	}
	b.WriteString("\n")
	fmt.Fprintf(&b, "[grpc]\n  address = %q\n\n", c.address)
	fmt.Fprintf(&b, "[ttrpc]\n  address = %q\n\n", c.ttrpcAddress)
	fmt.Fprintf(&b, "[debug]\n  address = \"\"\n  level = %q\n\n", level)
	b.WriteString("[metrics]\n  address = \"\"\n\n")
	if opts.ExtraConfig != "" {
		b.WriteString(opts.ExtraConfig)
		b.WriteString("\n")
	}
	return b.String()
}

// start launches the daemon and waits until it answers on its socket.
func (c *Containerd) start(bin string) error {
	logFile, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("containerd log: %w", err)
	}
	cmd := exec.Command(bin, "--config", c.ConfigPath)
	cmd.Env = c.env
	cmd.Stdout = logFile
	cmd.Stderr = logFile
	// Own process group: a Ctrl-C of go test must not reach the daemon
	// before the cleanup has stopped its containers.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("starting containerd: %w", err)
	}
	c.cmd, c.logFile = cmd, logFile
	c.exited = make(chan struct{})
	go func() { _ = cmd.Wait(); close(c.exited) }()

	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-c.exited:
			return fmt.Errorf("containerd exited during start-up: %v (log %s)", cmd.ProcessState, c.LogPath)
		default:
		}
		if c.serving() {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("containerd did not serve on %s within 30s (log %s)", c.address, c.LogPath)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (c *Containerd) serving() bool {
	if _, err := os.Stat(c.address); err != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	cl, err := client.New(c.address, client.WithTimeout(time.Second))
	if err != nil {
		return false
	}
	defer cl.Close()
	ok, err := cl.IsServing(ctx)
	return err == nil && ok
}

// InNamespace returns a handle on the same daemon whose Ctr, Client and
// Context use namespace ns: another tenant of the same containerd.
func (c *Containerd) InNamespace(ns string) *Containerd {
	other := *c
	other.Namespace = ns
	return &other
}

// Address returns the daemon's gRPC unix socket path.
func (c *Containerd) Address() string { return c.address }

// TTRPCAddress returns the daemon's ttrpc unix socket path.
func (c *Containerd) TTRPCAddress() string { return c.ttrpcAddress }

// Context returns ctx carrying the daemon's namespace.
func (c *Containerd) Context(ctx context.Context) context.Context {
	return namespaces.WithNamespace(ctx, c.Namespace)
}

// Client connects a containerd Go client to the daemon with its namespace
// as the default, closed at test cleanup. Extra options are passed to
// client.New.
func (c *Containerd) Client(tb testing.TB, opts ...client.Opt) *client.Client {
	tb.Helper()
	opts = append([]client.Opt{client.WithDefaultNamespace(c.Namespace), client.WithTimeout(10 * time.Second)}, opts...)
	cl, err := client.New(c.address, opts...)
	if err != nil {
		tb.Fatalf("testenv: connecting to containerd at %s: %v", c.address, err)
	}
	tb.Cleanup(func() { _ = cl.Close() })
	return cl
}

// MountView creates a read-only View snapshot of parent (a committed
// snapshot key, e.g. an image's top chain ID from
// testimage.Built.ChainIDs) in snapshotter, mounts it on a new temporary
// directory and returns that directory. The view is held by a lease, so
// containerd's garbage collector cannot remove it while the test uses it;
// at cleanup it is unmounted, removed, and the lease released.
func (c *Containerd) MountView(tb testing.TB, snapshotter, parent string) string {
	tb.Helper()
	cl := c.Client(tb)
	ctx, done, err := cl.WithLease(c.Context(context.Background()))
	if err != nil {
		tb.Fatalf("testenv: creating lease: %v", err)
	}
	sn := cl.SnapshotService(snapshotter)
	dir := shortTempDir(tb, "view")
	key := "testenv-view-" + filepath.Base(dir)
	mounts, err := sn.View(ctx, key, parent)
	if err != nil {
		_ = done(context.Background())
		tb.Fatalf("testenv: View %s of %s in snapshotter %s: %v", key, parent, snapshotter, err)
	}
	tb.Cleanup(func() {
		if err := mount.UnmountAll(dir, 0); err != nil {
			tb.Errorf("testenv: unmounting view %s: %v", dir, err)
		}
		if err := sn.Remove(ctx, key); err != nil {
			tb.Errorf("testenv: removing view %s: %v", key, err)
		}
		if err := done(context.Background()); err != nil {
			tb.Errorf("testenv: releasing lease of view %s: %v", key, err)
		}
	})
	if err := mount.All(mounts, dir); err != nil {
		tb.Fatalf("testenv: mounting view %s (%v): %v", key, mounts, err)
	}
	return dir
}

// Ctr runs the real ctr binary against the daemon in its namespace
// (ctr --address A --namespace N args...) and returns its standard output
// (ctr logs warnings to standard error, which would corrupt the output of
// a container). Standard error is logged, and included in the error when
// ctr fails. Commands time out after 3 minutes.
func (c *Containerd) Ctr(tb testing.TB, args ...string) (string, error) {
	tb.Helper()
	bin := Bin(tb, "ctr")
	full := append([]string{"--address", c.address, "--namespace", c.Namespace}, args...)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, full...)
	cmd.Env = c.env
	var out, stderr bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &stderr
	start := time.Now()
	err := cmd.Run()
	tb.Logf("ctr %s (%.1fs)", strings.Join(args, " "), time.Since(start).Seconds())
	if err != nil {
		return out.String(), fmt.Errorf("ctr %s: %w\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, out.String(), stderr.String())
	}
	if msg := strings.TrimSpace(cgroupV1Warning.ReplaceAllString(stderr.String(), "")); msg != "" {
		tb.Logf("ctr stderr: %s", msg)
	}
	return out.String(), nil
}

// cgroupV1Warning matches the deprecation warning ctr prints on every call
// on cgroup v1 hosts, kept out of the test log as noise.
var cgroupV1Warning = regexp.MustCompile(`(?m)^.*DEPRECATION: The support for cgroup v1 is deprecated.*$\n?`)

// CtrOK is Ctr that fails the test when ctr fails.
func (c *Containerd) CtrOK(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := c.Ctr(tb, args...)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return out
}

// Restart stops the daemon with SIGTERM, leaving its shims and containers
// running (as a containerd upgrade does), and starts it again with the same
// config and directories.
func (c *Containerd) Restart(tb testing.TB) {
	tb.Helper()
	if err := c.stopDaemon(); err != nil {
		tb.Fatalf("testenv: stopping containerd: %v", err)
	}
	if err := c.start(c.cmd.Path); err != nil {
		tb.Fatalf("testenv: restarting containerd: %v\n%s", err, c.logTail(80))
	}
}

// stopDaemon sends SIGTERM and waits up to 10s, then SIGKILL.
func (c *Containerd) stopDaemon() error {
	if c.cmd == nil || c.cmd.Process == nil {
		return nil
	}
	select {
	case <-c.exited:
	default:
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.exited:
		case <-time.After(10 * time.Second):
			_ = c.cmd.Process.Kill()
			<-c.exited
		}
	}
	if c.logFile != nil {
		c.logFile.Close()
		c.logFile = nil
	}
	return nil
}

// cleanup kills and deletes every task and container the daemon knows (in
// all namespaces), stops the daemon, kills shims that outlived it, and
// removes the cgroups of its namespace. Unmounting and removing Dir is done
// by the shortTempDir cleanup registered before this one.
func (c *Containerd) cleanup(tb testing.TB) {
	tb.Helper()
	var problems []string
	if c.cmd != nil && c.serving() {
		if err := c.deleteContainers(); err != nil {
			problems = append(problems, err.Error())
		}
	}
	_ = c.stopDaemon()
	if n := killProcessesMentioning(c.address); n > 0 {
		tb.Logf("testenv: killed %d shim process(es) left by containerd %s", n, c.address)
	}
	removeNamespaceCgroups(c.Namespace)
	// The runc shim keeps container state in a host-wide directory per
	// namespace; remove ours once empty.
	_ = os.Remove(filepath.Join("/run/containerd/runc", c.Namespace))
	if tb.Failed() || len(problems) > 0 {
		tb.Logf("testenv: containerd log %s (tail):\n%s", c.LogPath, c.logTail(150))
	}
	for _, p := range problems {
		tb.Errorf("testenv: containerd cleanup: %s", p)
	}
}

func (c *Containerd) deleteContainers() error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cl, err := client.New(c.address, client.WithTimeout(5*time.Second))
	if err != nil {
		return err
	}
	defer cl.Close()
	nss, err := cl.NamespaceService().List(ctx)
	if err != nil {
		return fmt.Errorf("listing namespaces: %w", err)
	}
	var errs []error
	for _, ns := range nss {
		nctx := namespaces.WithNamespace(ctx, ns)
		ctrs, err := cl.Containers(nctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("listing containers in %s: %w", ns, err))
			continue
		}
		for _, ctr := range ctrs {
			if task, err := ctr.Task(nctx, nil); err == nil {
				if err := deleteTask(nctx, ctr, task); err != nil {
					errs = append(errs, fmt.Errorf("deleting task %s/%s: %w", ns, ctr.ID(), err))
				}
			}
			if err := ctr.Delete(nctx, client.WithSnapshotCleanup); err != nil && !errdefs.IsNotFound(err) {
				errs = append(errs, fmt.Errorf("deleting container %s/%s: %w", ns, ctr.ID(), err))
			}
		}
	}
	return errors.Join(errs...)
}

// deleteTask kills and deletes a task of ctr. One that is gone already is
// no error: the CRI plugin deletes its pods' tasks by itself, and may do
// so between our listing the task and deleting it ("cannot delete a
// deleted process: not found") or while we delete it (its shim exits
// under our call: "ttrpc: closed").
func deleteTask(ctx context.Context, ctr client.Container, task client.Task) error {
	for attempt := 1; ; attempt++ {
		_, err := task.Delete(ctx, client.WithProcessKill)
		if err == nil || errdefs.IsNotFound(err) {
			return nil
		}
		// Deleted by someone else while our call was under way: the
		// shim's connection closes under it ("ttrpc: closed").
		if _, terr := ctr.Task(ctx, nil); errdefs.IsNotFound(terr) {
			return nil
		}
		if attempt == 10 || ctx.Err() != nil {
			return err
		}
		// A dead shim's task is cleaned up by containerd shortly.
		time.Sleep(200 * time.Millisecond)
	}
}

// logTail returns the last n lines of the daemon log.
func (c *Containerd) logTail(n int) string {
	return fileTail(c.LogPath, n)
}

func fileTail(path string, n int) string {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = append([]string{fmt.Sprintf("... (%d earlier lines in %s)", len(lines)-n, path)}, lines[len(lines)-n:]...)
	}
	return strings.Join(lines, "\n")
}

// killProcessesMentioning SIGKILLs every process whose command line
// contains needle (shims are started with -address <containerd socket>)
// and returns how many it killed.
func killProcessesMentioning(needle string) int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return 0
	}
	self := os.Getpid()
	killed := 0
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err != nil || pid == self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(needle)) {
			continue
		}
		if syscall.Kill(pid, syscall.SIGKILL) == nil {
			killed++
		}
	}
	return killed
}

// removeNamespaceCgroups removes the (by now empty) cgroup directories runc
// created for the namespace: <hierarchy>/<ns>/<id> in every cgroup v1
// hierarchy, or /sys/fs/cgroup/<ns>/<id> with cgroup v2.
func removeNamespaceCgroups(ns string) {
	bases := []string{filepath.Join("/sys/fs/cgroup", ns)}
	if hierarchies, err := os.ReadDir("/sys/fs/cgroup"); err == nil {
		for _, h := range hierarchies {
			if h.IsDir() {
				bases = append(bases, filepath.Join("/sys/fs/cgroup", h.Name(), ns))
			}
		}
	}
	for _, base := range bases {
		entries, err := os.ReadDir(base)
		if err != nil {
			continue
		}
		for _, e := range entries {
			if e.IsDir() {
				_ = syscall.Rmdir(filepath.Join(base, e.Name()))
			}
		}
		_ = syscall.Rmdir(base)
	}
}
