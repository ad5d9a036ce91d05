package guest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// Kit is a built guest kit (scripts/guest-kit.sh): kernel, initramfs, root
// image and the daxfs module, cached outside the clone.
type Kit struct {
	Dir       string
	Kernel    string // vmlinuz
	Initrd    string // initrd.cpio
	RootImage string // root.img (ext4), booted with snapshot=on: never written
	Module    string // daxfs.ko with the kit's fix (also in the image under extra/)
	// UpstreamModule is daxfs.ko as published (in the image as
	// /lib/modules/<version>/daxfs-upstream.ko).
	UpstreamModule string
	KernelVersion  string
	// BuildTime is how long this call spent building the kit (0: cached).
	BuildTime time.Duration
}

// UnavailableError says why guests cannot run on this machine: QEMU is
// missing, or the kit is not built and its packages cannot be reached.
// Tests skip on it, loudly; every other error fails them.
type UnavailableError struct{ Reason string }

func (e *UnavailableError) Error() string { return "guests unavailable: " + e.Reason }

var (
	kitOnce sync.Once
	kit     *Kit
	kitErr  error
)

// LoadKit returns the guest kit, building it on first use (minutes; once
// per machine). An *UnavailableError means guests cannot run here.
func LoadKit() (*Kit, error) {
	kitOnce.Do(func() { kit, kitErr = loadKit() })
	return kit, kitErr
}

func loadKit() (*Kit, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("the guest tests need root (QEMU, debootstrap, loop devices in guests)")
	}
	if _, err := QEMUBinary(); err != nil {
		return nil, &UnavailableError{Reason: err.Error()}
	}
	script := filepath.Join(testenv.ModuleRoot(), "scripts", "guest-kit.sh")
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Minute)
	defer cancel()
	probe := exec.CommandContext(ctx, script, "probe")
	if out, err := probe.CombinedOutput(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 3 {
			return nil, &UnavailableError{Reason: strings.TrimSpace(string(out))}
		}
		return nil, fmt.Errorf("%s probe: %v\n%s", script, err, out)
	}
	start := time.Now()
	cmd := exec.CommandContext(ctx, script, "build")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) && ee.ExitCode() == 3 {
			return nil, &UnavailableError{Reason: unavailableReason(stderr.String())}
		}
		return nil, fmt.Errorf("%s build: %v\n%s", script, err, stderr.String())
	}
	dir := strings.TrimSpace(stdout.String())
	k := &Kit{
		Dir:       dir,
		Kernel:    filepath.Join(dir, "vmlinuz"),
		Initrd:    filepath.Join(dir, "initrd.cpio"),
		RootImage: filepath.Join(dir, "root.img"),
		Module:    filepath.Join(dir, "daxfs.ko"),

		UpstreamModule: filepath.Join(dir, "daxfs-upstream.ko"),
	}
	if strings.Contains(stderr.String(), "kit ready") {
		k.BuildTime = time.Since(start)
	}
	env, err := readEnvFile(filepath.Join(dir, "kit.env"))
	if err != nil {
		return nil, err
	}
	k.KernelVersion = env["KERNEL_VERSION"]
	for _, p := range []string{k.Kernel, k.Initrd, k.RootImage, k.Module, k.UpstreamModule} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("guest kit %s is incomplete: %w (remove it to rebuild)", dir, err)
		}
	}
	return k, nil
}

func readEnvFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			out[k] = v
		}
	}
	return out, sc.Err()
}

// QEMUBinary returns the path of qemu-system-x86_64, or an error saying
// it is missing or does not run.
func QEMUBinary() (string, error) {
	p, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return "", errors.New("qemu-system-x86_64 is not installed (scripts/deps.sh installs qemu-system-x86)")
	}
	out, err := exec.Command(p, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s --version failed: %v: %s", p, err, bytes.TrimSpace(out))
	}
	return p, nil
}

// unavailableReason picks the script's "unavailable:" line out of its
// build log (its exit trap writes more after it).
func unavailableReason(stderr string) string {
	for line := range strings.Lines(stderr) {
		if _, reason, ok := strings.Cut(line, "guest-kit: unavailable: "); ok {
			return strings.TrimSpace(reason)
		}
	}
	return strings.TrimSpace(stderr)
}
