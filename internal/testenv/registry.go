package testenv

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// StartRegistry starts a distribution registry (the binary from .cache/bin)
// serving plain HTTP on 127.0.0.1 at a free port, with its storage in a
// temporary directory, and stops it at test cleanup. It returns host:port;
// ctr needs --plain-http to talk to it.
func StartRegistry(tb testing.TB) string {
	tb.Helper()
	bin := Bin(tb, "registry")
	dir := shortTempDir(tb, "reg")
	logPath := filepath.Join(dir, "registry.log")

	var lastErr error
	for range 5 {
		addr, err := freeLoopbackAddr()
		if err != nil {
			tb.Fatalf("testenv: %v", err)
		}
		host, err := startRegistryAt(tb, bin, dir, addr, logPath)
		if err == nil {
			return host
		}
		// Another process may have taken the port between our probe and
		// the registry's bind: try another one.
		lastErr = err
	}
	tb.Fatalf("testenv: starting registry: %v\n%s", lastErr, fileTail(logPath, 40))
	return ""
}

func startRegistryAt(tb testing.TB, bin, dir, addr, logPath string) (string, error) {
	storage := filepath.Join(dir, "storage")
	if err := os.MkdirAll(storage, 0o755); err != nil {
		return "", err
	}
	config := fmt.Sprintf(`version: 0.1
log:
  level: info
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
`, storage, addr)
	configPath := filepath.Join(dir, "config.yml")
	if err := os.WriteFile(configPath, []byte(config), 0o644); err != nil {
		return "", err
	}
	logFile, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return "", err
	}
	cmd := exec.Command(bin, "serve", configPath)
	// The registry exports OpenTelemetry traces unless told not to; the
	// tests have no collector and must not reach the network.
	cmd.Env = append(os.Environ(), "OTEL_TRACES_EXPORTER=none", "OTEL_METRICS_EXPORTER=none", "OTEL_LOGS_EXPORTER=none", "OTEL_SDK_DISABLED=true")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logFile.Close()
		return "", fmt.Errorf("starting %s: %w", bin, err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited); logFile.Close() }()
	stop := func() {
		select {
		case <-exited:
			return
		default:
		}
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}

	url := "http://" + addr + "/v2/"
	deadline := time.Now().Add(20 * time.Second)
	for {
		select {
		case <-exited:
			return "", fmt.Errorf("registry exited during start-up: %v", cmd.ProcessState)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := http.DefaultClient.Do(req)
		cancel()
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			stop()
			return "", fmt.Errorf("registry did not answer %s within 20s", url)
		}
		time.Sleep(50 * time.Millisecond)
	}
	tb.Cleanup(func() {
		stop()
		if tb.Failed() {
			tb.Logf("testenv: registry log %s (tail):\n%s", logPath, fileTail(logPath, 40))
		}
	})
	return addr, nil
}

// freeLoopbackAddr returns 127.0.0.1:PORT for a port that was free a moment
// ago.
func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("finding a free port: %w", err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr, nil
}
