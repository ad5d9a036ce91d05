package tests

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/moby/sys/mountinfo"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// TestDaxfsModeChange restarts the daemon from the default mount mode
// (erofs here) into FUSE mode while a container runs on an erofs view:
// the restarted daemon adopts the erofs view (a new container reuses it,
// nothing is mounted), and once no container uses it, Cleanup takes it off
// although the FUSE mounter does not know erofs mounts.
func TestDaxfsModeChange(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/greeting:modechange"
	archive, _ := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	ctrd.CtrOK(t, "run", "-d", "--snapshotter", "daxfs", ref, "holder", "sleep", "1000")
	t.Cleanup(func() { _, _ = ctrd.Ctr(t, "task", "kill", "-s", "SIGKILL", "holder") })
	requireViewFSType(t, d, "erofs")

	d.kill(t)
	cfgPath := filepath.Join(d.Dir, "config.toml")
	cfg, err := os.ReadFile(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cfg), `mode = "auto"`) {
		t.Fatalf("daemon config without the auto mode line:\n%s", cfg)
	}
	if err := os.WriteFile(cfgPath, []byte(strings.Replace(string(cfg), `mode = "auto"`, `mode = "fuse"`, 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	d.start(t)

	runGreetingOn(t, ctrd, "daxfs", ref, "after-mode-change")
	if got := d.metrics(t)["daxfs_views_mounted_total"]; got != 0 {
		t.Fatalf("the FUSE-mode daemon mounted %v views; the erofs view should have been adopted", got)
	}
	requireViewFSType(t, d, "erofs")

	// The holder goes, then the image: Cleanup must unmount the view.
	ctrd.CtrOK(t, "task", "delete", "--force", "holder")
	ctrd.CtrOK(t, "container", "rm", "holder")
	ctrd.CtrOK(t, "image", "rm", "--sync", ref)
	if got := d.metrics(t)["daxfs_views_unmounted_total"]; got < 1 {
		t.Fatalf("Cleanup unmounted %v views, want the adopted erofs view", got)
	}
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if filepath.Dir(m.Mountpoint) == filepath.Join(d.Root, "mnt") {
			t.Fatalf("%s (%s) is still mounted after Cleanup", m.Mountpoint, m.FSType)
		}
	}
}
