package guest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/guest/agent"
)

// Guest-physical layout. RAM sits below 4 GiB (max-ram-below-4g is the
// RAM size); the shared file follows at 4 GiB as NUMA node 1, which the
// kernel command line turns into soft-reserved memory: dax_hmem and
// device_dax then offer it as /dev/dax0.0 with its physical base in sysfs.
// With PmemAlias the same file is mapped a second time right after it, as
// NUMA node 2, which memmap=SIZE!BASE turns into legacy persistent memory:
// /dev/pmem0, a DAX-capable block device over the very same bytes.
const (
	SharedBase = 4 << 30
	// ForwardIP is the guest address whose ports Forwards reach.
	ForwardIP = "10.0.2.100"
)

// SharedMemory is a host file the guests map as memory. Size must be a
// multiple of 2 MiB.
type SharedMemory struct {
	Path string
	Size int64
}

// Forward makes guest connections to ForwardIP:GuestPort reach HostAddr
// (a host loopback address) through QEMU's user networking; nothing else
// outside the guest is reachable. QEMU runs Config.Relay with HostAddr
// appended for each connection, connected to it by standard input and
// output (a guestfwd to a TCP address would be one connection that every
// guest connection shares).
type Forward struct {
	GuestPort int
	HostAddr  string
}

// Config describes one guest.
type Config struct {
	Name      string // host name, and the name in logs
	Kit       *Kit
	Share     string // host directory mounted read-only on /kit (holds /kit/agent)
	MemoryMiB int    // RAM (default 1024)
	Shared    *SharedMemory
	PmemAlias bool
	Forwards  []Forward
	// Relay is the host command (words without commas) that relays its
	// standard input and output to the TCP address appended to it, such
	// as the agent's `relay` helper.
	Relay []string
	// Dir holds the console log and QEMU's scratch files (default: a
	// temporary directory removed at cleanup).
	Dir string
}

// Machine is a running guest.
type Machine struct {
	Name     string
	Config   Config
	BootTime time.Duration
	ownDir   bool
	console  string
	cmd      *exec.Cmd
	exited   chan struct{}
	url      string
	client   *http.Client
}

// KernelArgs returns the kernel command line for cfg.
func KernelArgs(cfg Config) string {
	args := []string{"console=ttyS0", "root=/dev/vda", "rw", "panic=-1", "quiet", "nokaslr", "daxfs.name=" + cfg.Name}
	if s := cfg.Shared; s != nil {
		args = append(args, fmt.Sprintf("memmap=%dM%%%#x-1+0xefffffff", s.Size>>20, SharedBase))
		if cfg.PmemAlias {
			args = append(args, fmt.Sprintf("memmap=%dM!%#x", s.Size>>20, SharedBase+s.Size))
		}
	}
	return strings.Join(args, " ")
}

// qemuArgs returns QEMU's command line for cfg, its agent reachable on the
// host's loopback port hostPort.
func qemuArgs(cfg Config, hostPort int) []string {
	mem := cfg.MemoryMiB
	total := int64(mem) << 20
	nodes := []string{
		"-object", fmt.Sprintf("memory-backend-ram,id=ram0,size=%dM", mem),
		"-numa", "node,nodeid=0,cpus=0,memdev=ram0",
	}
	if s := cfg.Shared; s != nil {
		nodes = append(nodes,
			"-object", fmt.Sprintf("memory-backend-file,id=shm,size=%d,mem-path=%s,share=on", s.Size, s.Path),
			"-numa", "node,nodeid=1,memdev=shm")
		total += s.Size
		if cfg.PmemAlias {
			nodes = append(nodes,
				"-object", fmt.Sprintf("memory-backend-file,id=shmalias,size=%d,mem-path=%s,share=on", s.Size, s.Path),
				"-numa", "node,nodeid=2,memdev=shmalias")
			total += s.Size
		}
	}
	var netdev strings.Builder
	fmt.Fprintf(&netdev, "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:%d-:%d", hostPort, agent.Port)
	for _, f := range cfg.Forwards {
		fmt.Fprintf(&netdev, ",guestfwd=tcp:%s:%d-cmd:%s %s", ForwardIP, f.GuestPort, strings.Join(cfg.Relay, " "), f.HostAddr)
	}
	args := []string{
		"-name", cfg.Name,
		"-machine", fmt.Sprintf("pc,accel=tcg,max-ram-below-4g=%dM", mem),
		"-cpu", "max",
		"-smp", "1",
		"-m", fmt.Sprintf("%dM", total>>20),
	}
	args = append(args, nodes...)
	args = append(args,
		"-kernel", cfg.Kit.Kernel,
		"-initrd", cfg.Kit.Initrd,
		"-append", KernelArgs(cfg),
		"-drive", "file="+cfg.Kit.RootImage+",if=virtio,format=raw,snapshot=on,cache=unsafe",
		"-netdev", netdev.String(),
		"-device", "virtio-net-pci,netdev=n0",
		"-virtfs", "local,path="+cfg.Share+",mount_tag=kit,security_model=none,readonly=on",
		"-nodefaults", "-display", "none", "-no-reboot",
		"-serial", "file:"+filepath.Join(cfg.Dir, "console.log"),
	)
	return args
}

// Boot starts a guest and waits until its agent answers (up to 5
// minutes). The guest is stopped at cleanup; when the test failed, the
// tail of its console is logged.
func Boot(tb testing.TB, cfg Config) *Machine {
	tb.Helper()
	m, err := Start(cfg)
	if m != nil {
		m.StopAtCleanup(tb)
	}
	if err != nil {
		tb.Fatal(err)
	}
	return m
}

// StopAtCleanup stops the guest at tb's cleanup, logging the tail of its
// console first when the test failed, and removes its directory if Start
// made it.
func (m *Machine) StopAtCleanup(tb testing.TB) {
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("guest %s console (tail):\n%s", m.Name, m.ConsoleTail(60))
		}
		m.Stop()
		if m.ownDir {
			os.RemoveAll(m.Config.Dir)
		}
	})
}

// Start starts a guest and waits until its agent answers (up to 5
// minutes). Even on an error it may return the Machine, to be stopped.
func Start(cfg Config) (*Machine, error) {
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 1024
	}
	ownDir := false
	if cfg.Dir == "" {
		dir, err := os.MkdirTemp("", "guest-"+cfg.Name+"-")
		if err != nil {
			return nil, err
		}
		cfg.Dir, ownDir = dir, true
	}
	qemu, err := QEMUBinary()
	if err != nil {
		return nil, err
	}
	if len(cfg.Forwards) > 0 && len(cfg.Relay) == 0 {
		return nil, fmt.Errorf("guest %s: forwards need a relay command", cfg.Name)
	}
	for _, w := range cfg.Relay {
		if strings.ContainsAny(w, ", ") {
			return nil, fmt.Errorf("guest %s: relay command word %q has a comma or space", cfg.Name, w)
		}
	}
	m := &Machine{Name: cfg.Name, Config: cfg, ownDir: ownDir, console: filepath.Join(cfg.Dir, "console.log"), client: &http.Client{}}
	var lastErr error
	for range 5 {
		port, err := freePort()
		if err != nil {
			return m, err
		}
		lastErr = m.start(qemu, qemuArgs(cfg, port), port)
		if lastErr == nil {
			return m, nil
		}
		if !strings.Contains(lastErr.Error(), "hostfwd") {
			break // only a lost port race is worth another attempt
		}
	}
	return m, fmt.Errorf("guest %s: %v\nconsole:\n%s", cfg.Name, lastErr, m.ConsoleTail(40))
}

func (m *Machine) start(qemu string, args []string, port int) error {
	qlog := filepath.Join(m.Config.Dir, "qemu.log")
	logf, err := os.Create(qlog)
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(qemu, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = append(os.Environ(), "TMPDIR="+m.Config.Dir) // snapshot=on's scratch image
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting QEMU: %w", err)
	}
	m.cmd, m.exited = cmd, make(chan struct{})
	go func() { _ = cmd.Wait(); close(m.exited) }()
	m.url = "http://127.0.0.1:" + strconv.Itoa(port)
	deadline := time.Now().Add(5 * time.Minute)
	for {
		select {
		case <-m.exited:
			b, _ := os.ReadFile(qlog)
			return fmt.Errorf("QEMU exited during boot (%v): %s", cmd.ProcessState, bytes.TrimSpace(b))
		default:
		}
		if m.ping() {
			m.BootTime = time.Since(start)
			return nil
		}
		if time.Now().After(deadline) {
			m.Stop()
			return fmt.Errorf("the agent did not answer within 5 minutes of boot")
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// AgentURL is the base URL of the guest's agent on the host's loopback.
func (m *Machine) AgentURL() string { return m.url }

func (m *Machine) ping() bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, m.url+agent.PathPing, nil)
	resp, err := m.client.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// Stop kills QEMU (the guest's disk writes are discarded: snapshot=on)
// and whatever it started (the registry relays): its process group.
func (m *Machine) Stop() {
	if m.cmd == nil || m.cmd.Process == nil {
		return
	}
	defer func() { _ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL) }()
	select {
	case <-m.exited:
		return
	default:
	}
	_ = m.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-m.exited:
	case <-time.After(10 * time.Second):
		_ = m.cmd.Process.Kill()
		<-m.exited
	}
}

// ConsoleTail returns the last n lines of the guest's serial console.
func (m *Machine) ConsoleTail(n int) string {
	b, err := os.ReadFile(m.console)
	if err != nil {
		return fmt.Sprintf("(no console log: %v)", err)
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (m *Machine) post(ctx context.Context, path string, in, out any) error {
	body, err := json.Marshal(in)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, m.url+path, bytes.NewReader(body))
	if err != nil {
		return err
	}
	resp, err := m.client.Do(req)
	if err != nil {
		return fmt.Errorf("guest %s agent: %w", m.Name, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("guest %s agent %s: %s: %s", m.Name, path, resp.Status, bytes.TrimSpace(b))
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Run runs args in the guest and returns what it did; an error only when
// the agent could not be asked.
func (m *Machine) Run(ctx context.Context, env []string, args ...string) (agent.RunResult, error) {
	var res agent.RunResult
	err := m.post(ctx, agent.PathRun, agent.RunRequest{Args: args, Env: env}, &res)
	return res, err
}

// Sh runs a shell script in the guest and returns its standard output;
// an error (with both outputs) unless it exits 0.
func (m *Machine) Sh(ctx context.Context, script string) (string, error) {
	res, err := m.Run(ctx, nil, "/bin/sh", "-c", script)
	if err != nil {
		return "", err
	}
	if res.Exit != 0 || res.Error != "" {
		return string(res.Stdout), fmt.Errorf("guest %s: %q: exit %d %s\nstdout:\n%s\nstderr:\n%s", m.Name, script, res.Exit, res.Error, res.Stdout, res.Stderr)
	}
	return string(res.Stdout), nil
}

// ShOK is Sh that fails the test on an error.
func (m *Machine) ShOK(tb testing.TB, script string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	out, err := m.Sh(ctx, script)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

// Start starts args in the background in the guest (its own session),
// output appended to logPath in the guest, and returns its PID.
func (m *Machine) Start(ctx context.Context, logPath string, env []string, args ...string) (int, error) {
	var res agent.StartResult
	err := m.post(ctx, agent.PathStart, agent.StartRequest{Args: args, Env: env, Log: logPath}, &res)
	return res.PID, err
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
