package testenv

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
)

// modulePath is the module whose root ModuleRoot looks for.
const modulePath = "github.com/containerd-daxfs/containerd-daxfs"

var moduleRoot = sync.OnceValues(findModuleRoot)

// ModuleRoot returns the directory holding the project's go.mod. It looks
// upwards from the working directory (go test runs in the package
// directory), then from this source file's directory. It panics when neither
// is inside the module: a test binary run elsewhere cannot find its tools.
func ModuleRoot() string {
	dir, err := moduleRoot()
	if err != nil {
		panic(err)
	}
	return dir
}

func findModuleRoot() (string, error) {
	var starts []string
	if wd, err := os.Getwd(); err == nil {
		starts = append(starts, wd)
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		starts = append(starts, filepath.Dir(file))
	}
	for _, start := range starts {
		for dir := start; ; dir = filepath.Dir(dir) {
			data, err := os.ReadFile(filepath.Join(dir, "go.mod"))
			if err == nil && bytes.Contains(data, []byte("module "+modulePath+"\n")) {
				return dir, nil
			}
			if parent := filepath.Dir(dir); parent == dir {
				break
			}
		}
	}
	return "", fmt.Errorf("testenv: no go.mod of module %s above %v", modulePath, starts)
}

// CacheDir returns the git-ignored cache directory at the module root
// (.cache): binaries in .cache/bin, rootfs builds in .cache/rootfs.
func CacheDir() string { return filepath.Join(ModuleRoot(), ".cache") }

// BinDir returns .cache/bin, where scripts/deps.sh installs containerd, ctr,
// containerd-shim-runc-v2 and registry.
func BinDir() string { return filepath.Join(CacheDir(), "bin") }

// Bin returns the absolute path of the executable name, looked up in
// .cache/bin first and then in PATH (plus /usr/sbin and /sbin, where Debian
// puts runc and debootstrap). It fails the test, pointing at
// scripts/deps.sh, when the executable cannot be found.
func Bin(tb testing.TB, name string) string {
	tb.Helper()
	path, err := lookBin(name)
	if err != nil {
		tb.Fatalf("testenv: %v: run scripts/deps.sh (as root) to install the test dependencies", err)
	}
	return path
}

func lookBin(name string) (string, error) {
	p := filepath.Join(BinDir(), name)
	if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return filepath.Abs(p)
	}
	for _, dir := range []string{"/usr/local/sbin", "/usr/sbin", "/sbin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable %q not found in %s or PATH", name, BinDir())
}

// RequireRoot fails the test when it does not run as root. It never skips:
// CI runs as root, and a test that silently skipped must not count as
// passing.
func RequireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Fatalf("testenv: %s needs root (it mounts filesystems and runs containerd); run the tests as root, e.g. sudo -E go test", tb.Name())
	}
}

// pathEnv returns a PATH value with .cache/bin first and the sbin
// directories present, for the daemons the harness starts (containerd looks
// for containerd-shim-runc-v2 and runc in PATH).
func pathEnv() string {
	dirs := []string{BinDir(), os.Getenv("PATH"), "/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"}
	return strings.Join(dirs, string(os.PathListSeparator))
}

// shortTempDir makes a temporary directory with a short path, removed at
// cleanup. tb.TempDir embeds the test name, which can push unix socket paths
// past their 108-byte limit and overlay mount options past a page.
func shortTempDir(tb testing.TB, prefix string) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	tb.Cleanup(func() {
		if err := unmountUnder(dir); err != nil {
			tb.Errorf("testenv: %v", err)
			return // never remove through a mount
		}
		if err := os.RemoveAll(dir); err != nil {
			tb.Errorf("testenv: removing %s: %v", dir, err)
		}
	})
	return dir
}
