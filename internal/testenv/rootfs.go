package testenv

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// DebianRootfs returns the path of a minbase Debian root filesystem built
// with debootstrap from the apt mirror this machine is configured with
// (the only one reachable in CI), for the suite the mirror serves. It is
// built once and cached under .cache/rootfs/debian-<suite>-minbase: the
// build goes to a temporary directory renamed into place when complete,
// under a file lock so parallel test processes build it once. A cold build
// takes minutes; use it from benchmarks, not from ordinary tests. Treat the
// tree as read-only.
func DebianRootfs(tb testing.TB) string {
	tb.Helper()
	RequireRoot(tb)
	mirror, suite, err := aptMirror()
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	dir := filepath.Join(CacheDir(), "rootfs")
	final := filepath.Join(dir, "debian-"+suite+"-minbase")
	unlock := lockCache(tb, dir)
	defer unlock()
	if _, err := os.Stat(final); err == nil {
		return final
	}
	debootstrap := Bin(tb, "debootstrap")
	tmp, err := os.MkdirTemp(dir, ".build-")
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	defer func() {
		if err := unmountUnder(tmp); err == nil {
			_ = os.RemoveAll(tmp)
		}
	}()
	target := filepath.Join(tmp, "rootfs")
	logPath := filepath.Join(dir, "debootstrap.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	defer logFile.Close()
	tb.Logf("testenv: building Debian %s minbase rootfs from %s with debootstrap (minutes; cached in %s)", suite, mirror, final)
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, debootstrap, "--variant=minbase", suite, target, mirror)
	cmd.Env = append(os.Environ(), "PATH="+pathEnv(), "DEBIAN_FRONTEND=noninteractive")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Run(); err != nil {
		tb.Fatalf("testenv: debootstrap %s %s failed: %v\n%s", suite, mirror, err, fileTail(logPath, 40))
	}
	if err := unmountUnder(tmp); err != nil {
		tb.Fatalf("testenv: after debootstrap: %v", err)
	}
	if err := os.Rename(target, final); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	tb.Logf("testenv: Debian rootfs built in %s", time.Since(start).Round(time.Second))
	return final
}

// DebianRootfsTar returns the path of an uncompressed layer tar of
// DebianRootfs (see testimage.TarDir), cached next to it.
func DebianRootfsTar(tb testing.TB) string {
	tb.Helper()
	root := DebianRootfs(tb)
	dir := filepath.Dir(root)
	final := root + ".tar"
	unlock := lockCache(tb, dir)
	defer unlock()
	if _, err := os.Stat(final); err == nil {
		return final
	}
	f, err := os.CreateTemp(dir, ".tar-")
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	defer os.Remove(f.Name())
	w := bufio.NewWriterSize(f, 1<<20)
	if err := testimage.TarDir(w, root); err != nil {
		f.Close()
		tb.Fatalf("testenv: tar of %s: %v", root, err)
	}
	if err := w.Flush(); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	if err := f.Close(); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	if err := os.Chmod(f.Name(), 0o644); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	if err := os.Rename(f.Name(), final); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	return final
}

// lockCache takes an exclusive flock on dir/.lock (creating dir).
func lockCache(tb testing.TB, dir string) func() {
	tb.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		tb.Fatalf("testenv: %v", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		tb.Fatalf("testenv: locking %s: %v", f.Name(), err)
	}
	return func() { f.Close() }
}

// aptMirror returns the first Debian mirror URI and suite configured for
// apt (deb822 .sources files first, then one-line .list files), skipping
// security and disabled entries.
func aptMirror() (uri, suite string, err error) {
	var files []string
	if m, _ := filepath.Glob("/etc/apt/sources.list.d/*.sources"); m != nil {
		files = append(files, m...)
	}
	files = append(files, "/etc/apt/sources.list")
	if m, _ := filepath.Glob("/etc/apt/sources.list.d/*.list"); m != nil {
		files = append(files, m...)
	}
	for _, path := range files {
		data, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		var u, s string
		if strings.HasSuffix(path, ".sources") {
			u, s = parseDeb822(string(data))
		} else {
			u, s = parseOneLine(string(data))
		}
		if u != "" && s != "" {
			return u, s, nil
		}
	}
	return "", "", fmt.Errorf("no Debian mirror found in /etc/apt/sources.list{,.d/*}")
}

func parseDeb822(data string) (string, string) {
	for stanza := range strings.SplitSeq(data, "\n\n") {
		fields := map[string]string{}
		for line := range strings.SplitSeq(stanza, "\n") {
			line = strings.TrimSpace(line)
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			if k, v, ok := strings.Cut(line, ":"); ok {
				fields[strings.ToLower(strings.TrimSpace(k))] = strings.TrimSpace(v)
			}
		}
		if !strings.Contains(" "+fields["types"]+" ", " deb ") || strings.EqualFold(fields["enabled"], "no") {
			continue
		}
		uris, suites := strings.Fields(fields["uris"]), strings.Fields(fields["suites"])
		if len(uris) == 0 || len(suites) == 0 || !usableMirror(uris[0], suites[0]) {
			continue
		}
		return uris[0], suites[0]
	}
	return "", ""
}

func parseOneLine(data string) (string, string) {
	for line := range strings.SplitSeq(data, "\n") {
		f := strings.Fields(line)
		if len(f) < 3 || f[0] != "deb" {
			continue
		}
		f = f[1:]
		if strings.HasPrefix(f[0], "[") { // [arch=amd64 signed-by=...]
			for len(f) > 0 && !strings.HasSuffix(f[0], "]") {
				f = f[1:]
			}
			if len(f) > 0 {
				f = f[1:]
			}
		}
		if len(f) >= 2 && usableMirror(f[0], f[1]) {
			return f[0], f[1]
		}
	}
	return "", ""
}

// usableMirror accepts main Debian archives, not security or third-party
// repositories.
func usableMirror(uri, suite string) bool {
	return strings.Contains(uri, "debian") && !strings.Contains(uri, "security") &&
		!strings.Contains(suite, "/") && !strings.Contains(suite, "-")
}
