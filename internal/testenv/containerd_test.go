package testenv_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// TestContainerdCleanupStopsEverything starts a daemon with a running
// container in a subtest and checks that the subtest's cleanup left no
// process, mount, cgroup or directory behind.
func TestContainerdCleanupStopsEverything(t *testing.T) {
	testenv.RequireRoot(t)
	var ctrd *testenv.Containerd
	t.Run("run", func(t *testing.T) {
		ctrd = testenv.StartContainerd(t, testenv.ContainerdOptions{})
		archive, _ := testenv.WriteImageArchive(t, testenv.BusyboxImage(t), "docker.io/library/bb:cleanup")
		ctrd.CtrOK(t, "image", "import", archive)
		ctrd.CtrOK(t, "run", "-d", "docker.io/library/bb:cleanup", "sleeper", "sleep", "600")
		tasks := ctrd.CtrOK(t, "task", "ls")
		if !strings.Contains(tasks, "sleeper") || !strings.Contains(tasks, "RUNNING") {
			t.Fatalf("task ls:\n%s", tasks)
		}
		// The overlay root of the running container is mounted under Dir.
		mounts, err := testenv.MountsUnder(ctrd.Dir)
		if err != nil || len(mounts) == 0 {
			t.Fatalf("no mounts under %s while a container runs: %v %v", ctrd.Dir, mounts, err)
		}
	})
	if _, err := os.Stat(ctrd.Dir); !os.IsNotExist(err) {
		t.Errorf("%s still exists after cleanup: %v", ctrd.Dir, err)
	}
	if mounts, err := testenv.MountsUnder(ctrd.Dir); err != nil || len(mounts) > 0 {
		t.Errorf("still mounted after cleanup: %v %v", mounts, err)
	}
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && bytes.Contains(cmdline, []byte(ctrd.Address())) {
			t.Errorf("process %s still running: %q", e.Name(), cmdline)
		}
	}
	cg, _ := filepath.Glob("/sys/fs/cgroup/*/" + ctrd.Namespace) // cgroup v1
	if _, err := os.Stat("/sys/fs/cgroup/" + ctrd.Namespace); err == nil {
		cg = append(cg, "/sys/fs/cgroup/"+ctrd.Namespace) // cgroup v2
	}
	if len(cg) > 0 {
		t.Errorf("cgroups left: %v", cg)
	}
	if _, err := os.Stat(filepath.Join("/run/containerd/runc", ctrd.Namespace)); !os.IsNotExist(err) {
		t.Errorf("runc state for %s left: %v", ctrd.Namespace, err)
	}
}

// TestContainerdRestartKeepsTasks checks that Restart stops only the
// daemon: a running container survives and is seen again after restart.
func TestContainerdRestartKeepsTasks(t *testing.T) {
	testenv.RequireRoot(t)
	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	archive, _ := testenv.WriteImageArchive(t, testenv.BusyboxImage(t), "docker.io/library/bb:restart")
	ctrd.CtrOK(t, "image", "import", archive)
	ctrd.CtrOK(t, "run", "-d", "docker.io/library/bb:restart", "survivor", "sleep", "600")
	ctrd.Restart(t)
	deadline := time.Now().Add(10 * time.Second)
	for {
		out := ctrd.CtrOK(t, "task", "ls")
		if strings.Contains(out, "survivor") && strings.Contains(out, "RUNNING") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("task not running after restart:\n%s", out)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if out := ctrd.CtrOK(t, "task", "exec", "--exec-id", "e1", "survivor", "echo", "alive"); out != "alive\n" {
		t.Fatalf("exec after restart: %q", out)
	}
}

// TestContainerdExtraConfig checks that ExtraConfig reaches the daemon:
// a plugin configured there is listed with its settings.
func TestContainerdExtraConfig(t *testing.T) {
	testenv.RequireRoot(t)
	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{
		ExtraConfig: `[proxy_plugins.testproxy]
  type = "snapshot"
  address = "/nonexistent/testproxy.sock"
`,
	})
	out := ctrd.CtrOK(t, "plugins", "ls")
	if !strings.Contains(out, "testproxy") {
		t.Fatalf("proxy plugin from ExtraConfig not listed:\n%s", out)
	}
	if strings.Contains(out, "io.containerd.cri.v1") {
		t.Fatalf("CRI is loaded although EnableCRI is false:\n%s", out)
	}
}

func TestRegistryServesV2(t *testing.T) {
	testenv.RequireRoot(t)
	host := testenv.StartRegistry(t)
	if !strings.HasPrefix(host, "127.0.0.1:") {
		t.Fatalf("registry address %q is not loopback", host)
	}
}

// TestContainerdEnableCRI checks that the CRI plugins load when asked for.
func TestContainerdEnableCRI(t *testing.T) {
	testenv.RequireRoot(t)
	ctrd := testenv.StartContainerd(t, testenv.ContainerdOptions{EnableCRI: true})
	out := ctrd.CtrOK(t, "plugins", "ls")
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) >= 4 && f[0] == "io.containerd.grpc.v1" && f[1] == "cri" {
			if f[len(f)-1] != "ok" {
				t.Fatalf("CRI plugin not ok: %s", line)
			}
			return
		}
	}
	t.Fatalf("CRI plugin not listed:\n%s", out)
}
