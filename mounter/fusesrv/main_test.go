package fusesrv

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

// roleEnv makes the test binary act as fuse-serve (server or holder), so
// the tests run the real separate processes without building the command.
const roleEnv = "FUSESRV_TEST_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(roleEnv) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := Main(ctx, os.Args[1:])
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startServer starts a serving process (and its holder) for a new state
// directory. Cleanup quits both and checks that they are gone.
func startServer(t *testing.T) *Client {
	t.Helper()
	testenv.RequireRoot(t)
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Fatalf("/dev/fuse is needed: %v", err)
	}
	t.Setenv(roleEnv, "1")
	state, err := os.MkdirTemp("", "fusesrv-")
	if err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	c := NewClient(state, []string{exe, "--state", state})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := c.Ensure(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := c.Quit(ctx); err != nil && alive(serveSock(state)) {
			t.Errorf("quit: %v", err) // (a test may have stopped it already)
		}
		// Both processes must be gone: their locks become free.
		for _, lock := range []string{serveLock(state), holderLock(state)} {
			deadline := time.Now().Add(10 * time.Second)
			for {
				f, err := lockFile(lock)
				if err == nil {
					f.Close()
					break
				}
				if time.Now().After(deadline) {
					t.Errorf("%s still held after quit", lock)
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		if t.Failed() {
			for _, l := range []string{"serve.log", "holder.log"} {
				b, _ := os.ReadFile(filepath.Join(state, l))
				t.Logf("%s:\n%s", l, b)
			}
		}
		os.RemoveAll(state)
	})
	return c
}

// waitFree waits until no process holds lock (its holder exited).
func waitFree(t *testing.T, lock string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		f, err := lockFile(lock)
		if err == nil {
			f.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s still held", lock)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// testImage writes the conformance tree and its image; it returns both.
func testImage(t *testing.T) (src, img string) {
	t.Helper()
	dir := t.TempDir()
	src = filepath.Join(dir, "src")
	mtest.WriteTree(t, src)
	img = filepath.Join(dir, "image.daxfs")
	if err := mtest.ImageFromDir(src, img); err != nil {
		t.Fatal(err)
	}
	return src, img
}

func mkdir(t *testing.T, p string) string {
	t.Helper()
	if err := os.MkdirAll(p, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// mountOverlay mounts an overlay with lower as its only lower layer and
// returns the merged directory; cleanup unmounts it.
func mountOverlay(t *testing.T, lower, dir string) (merged, upper string) {
	t.Helper()
	upper = mkdir(t, filepath.Join(dir, "upper"))
	work := mkdir(t, filepath.Join(dir, "work"))
	merged = mkdir(t, filepath.Join(dir, "merged"))
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
		t.Fatalf("mount overlay %s: %v", opts, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(merged, 0); err != nil && err != unix.EINVAL {
			t.Errorf("unmount overlay: %v", err)
		}
	})
	return merged, upper
}

func serverPID(t *testing.T, c *Client) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r, err := c.Ensure(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return r.PID
}

func listMounts(t *testing.T, c *Client) []MountRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ms, err := c.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return ms
}

func describe(ms []MountRecord) string {
	var s []string
	for _, m := range ms {
		s = append(s, fmt.Sprintf("%s %s %s adoptions=%d", m.Target, m.State, m.Source, m.Adoptions))
	}
	return strings.Join(s, "; ")
}

// mountImage mounts src on target and registers a cleanup that unmounts
// it (before the temporary directories are removed).
func mountImage(t *testing.T, c *Client, src Source, target string, validate bool) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.Mount(ctx, src, target, validate); err != nil {
		return err
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		c.Unmount(ctx, target)
	})
	return nil
}
