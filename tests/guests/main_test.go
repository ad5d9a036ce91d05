package guests

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/guest"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// Set by TestMain: the guest kit, or why guests cannot run here (skip) or
// failed to be prepared (fail).
var (
	kit        *guest.Kit
	kitSkip    string
	kitErr     error
	binDir     string // host directory with the binaries the guests run
	setupNotes []string
)

// TestMain builds the guest kit (once per machine) and the binaries the
// guests run, before any test: their minutes are not any test's time.
func TestMain(m *testing.M) {
	kit, kitErr = guest.LoadKit()
	if ue, ok := errors.AsType[*guest.UnavailableError](kitErr); ok {
		kitSkip, kitErr = ue.Reason, nil
		fmt.Fprintf(os.Stderr, "\n%s\nGUEST TESTS SKIPPED: %s\n%s\n\n", strings.Repeat("!", 72), ue.Reason, strings.Repeat("!", 72))
	}
	if kit != nil {
		if kit.BuildTime > 0 {
			setupNotes = append(setupNotes, fmt.Sprintf("built the guest kit (kernel %s) in %s: %s", kit.KernelVersion, kit.BuildTime.Round(1e9), kit.Dir))
		}
		binDir, kitErr = buildBinaries()
	}
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

// requireGuests skips (saying why) where guests cannot run, and fails
// when preparing them failed.
func requireGuests(tb testing.TB) {
	tb.Helper()
	if kitSkip != "" {
		tb.Skipf("GUEST TESTS SKIPPED: %s", kitSkip)
	}
	if kitErr != nil {
		tb.Fatalf("preparing the guests: %v", kitErr)
	}
	for _, n := range setupNotes {
		tb.Log(n)
	}
	setupNotes = nil
}

// buildBinaries puts what the guests run in a new directory, shared into
// every guest as /kit: the agent (static), containerd-daxfs-grpc (built
// now, with the build tags of GOFLAGS), and containerd, ctr and the runc
// shim from .cache/bin.
func buildBinaries() (string, error) {
	dir, err := os.MkdirTemp("", "guest-bin-")
	if err != nil {
		return "", err
	}
	build := func(out, pkg string, env ...string) error {
		cmd := exec.Command("go", "build", "-o", filepath.Join(dir, out), pkg)
		cmd.Dir = testenv.ModuleRoot()
		cmd.Env = append(os.Environ(), env...)
		if b, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("go build %s: %v\n%s", pkg, err, b)
		}
		return nil
	}
	if err := build("agent", "./internal/guest/cmd/guest-agent", "CGO_ENABLED=0"); err != nil {
		return dir, err
	}
	if err := build("containerd-daxfs-grpc", "./cmd/containerd-daxfs-grpc"); err != nil {
		return dir, err
	}
	for _, name := range []string{"containerd", "ctr", "containerd-shim-runc-v2"} {
		src := filepath.Join(testenv.BinDir(), name)
		if err := linkOrCopy(src, filepath.Join(dir, name)); err != nil {
			return dir, fmt.Errorf("%s: %w (run scripts/deps.sh)", name, err)
		}
	}
	return dir, nil
}

func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
