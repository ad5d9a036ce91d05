package testenv

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Nerdctl runs the real nerdctl binary (from .cache/bin) against the
// daemon in its namespace, with nerdctl's state (--data-root), registry
// hosts directory and configuration file under the daemon's directory, so
// nothing of the host's /var/lib/nerdctl or /etc/nerdctl is used. It
// returns standard output; standard error is logged, and included in the
// error when nerdctl fails. Commands time out after 3 minutes.
func (c *Containerd) Nerdctl(tb testing.TB, args ...string) (string, error) {
	tb.Helper()
	bin := Bin(tb, "nerdctl")
	dir := filepath.Join(c.Dir, "nerdctl")
	if err := os.MkdirAll(filepath.Join(dir, "certs.d"), 0o755); err != nil {
		tb.Fatal(err)
	}
	toml := filepath.Join(dir, "nerdctl.toml")
	if err := os.WriteFile(toml, nil, 0o644); err != nil {
		tb.Fatal(err)
	}
	full := append([]string{"--address", c.address, "--namespace", c.Namespace,
		"--data-root", filepath.Join(dir, "data"), "--hosts-dir", filepath.Join(dir, "certs.d"),
		"--cni-netconfpath", filepath.Join(dir, "cni")}, args...)
	env := append(append([]string{}, c.env...), "NERDCTL_TOML="+toml)
	return runTool(tb, "nerdctl", bin, env, full, args)
}

// NerdctlOK is Nerdctl that fails the test when nerdctl fails.
func (c *Containerd) NerdctlOK(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := c.Nerdctl(tb, args...)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return out
}

// Crictl runs the real crictl binary (from .cache/bin) against the
// daemon's CRI (its gRPC socket serves both the runtime and the image
// service), with a configuration file of its own so that the host's
// /etc/crictl.yaml is not read. The daemon must have been started with
// EnableCRI.
func (c *Containerd) Crictl(tb testing.TB, args ...string) (string, error) {
	tb.Helper()
	bin := Bin(tb, "crictl")
	cfg := filepath.Join(c.Dir, "crictl.yaml")
	endpoint := "unix://" + c.address
	data := fmt.Sprintf("runtime-endpoint: %s\nimage-endpoint: %s\ntimeout: 120\n", endpoint, endpoint)
	if err := os.WriteFile(cfg, []byte(data), 0o644); err != nil {
		tb.Fatal(err)
	}
	full := append([]string{"--config", cfg}, args...)
	return runTool(tb, "crictl", bin, c.env, full, args)
}

// CrictlOK is Crictl that fails the test when crictl fails.
func (c *Containerd) CrictlOK(tb testing.TB, args ...string) string {
	tb.Helper()
	out, err := c.Crictl(tb, args...)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return out
}

// runTool runs a client binary with a 3 minute timeout; shown is how the
// command is named in the log and errors (without the harness's flags).
func runTool(tb testing.TB, name, bin string, env, args, shown []string) (string, error) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	start := time.Now()
	err := cmd.Run()
	tb.Logf("%s %s (%.1fs)", name, strings.Join(shown, " "), time.Since(start).Seconds())
	if err != nil {
		return out.String(), fmt.Errorf("%s %s: %w\nstdout:\n%s\nstderr:\n%s", name, strings.Join(shown, " "), err, out.String(), stderr.String())
	}
	if msg := strings.TrimSpace(cgroupV1Warning.ReplaceAllString(stderr.String(), "")); msg != "" {
		tb.Logf("%s stderr: %s", name, msg)
	}
	return out.String(), nil
}
