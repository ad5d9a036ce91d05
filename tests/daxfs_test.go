package tests

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/core/remotes/docker"
	"github.com/containerd/platforms"
	"github.com/moby/sys/mountinfo"

	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/converter/imageconv"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// regionHasLayer reports whether the daemon's region holds a READY layer
// image for diffID (keyed by it, or an identical image it is an alias
// of), looking at the shared region as another participant would.
func regionHasLayer(t *testing.T, d *daxfsDaemon, diffID digest.Digest) bool {
	t.Helper()
	_, ok := regionLayer(t, d, diffID)
	return ok
}

// regionLayer returns the region entry of diffID's layer image.
func regionLayer(t *testing.T, d *daxfsDaemon, diffID digest.Digest) (daxmem.Entry, bool) {
	t.Helper()
	r, err := daxmem.Open(context.Background(), daxmem.Options{Path: d.Region})
	if err != nil {
		t.Fatalf("opening the daemon's region: %v", err)
	}
	defer r.Close()
	k, err := daxmem.KeyFromDigest(diffID.String())
	if err != nil {
		t.Fatal(err)
	}
	return r.Resolve(k)
}

// mountModes are the mounters the end-to-end tests run with: the default
// (auto: erofs over loop devices on this kernel, which has no daxfs
// module) and FUSE, with the file system type their views show.
var mountModes = []struct{ mode, fstype string }{
	{"auto", "erofs"},
	{"fuse", "fuse.daxfs"},
}

// requireViewFSType fails unless every view the daemon has mounted is of
// file system type fstype, and there is at least one.
func requireViewFSType(t *testing.T, d *daxfsDaemon, fstype string) {
	t.Helper()
	ms, err := mountinfo.GetMounts(nil)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, m := range ms {
		if filepath.Dir(m.Mountpoint) != filepath.Join(d.Root, "mnt") {
			continue
		}
		if m.FSType != fstype {
			t.Fatalf("view %s is mounted as %s, want %s", m.Mountpoint, m.FSType, fstype)
		}
		n++
	}
	if n == 0 {
		t.Fatalf("no view is mounted under %s", filepath.Join(d.Root, "mnt"))
	}
}

// TestDaxfsImportRun imports an image through the transfer service with
// --snapshotter daxfs (our differ converts each layer into the region) and
// runs containers that read, exec, write, delete and list, with each
// mounter.
func TestDaxfsImportRun(t *testing.T) {
	for _, mm := range mountModes {
		t.Run(mm.mode, func(t *testing.T) { testImportRun(t, mm.mode, mm.fstype) })
	}
}

func testImportRun(t *testing.T, mode, fstype string) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{Mode: mode})
	ref := "docker.io/library/greeting-daxfs:latest"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)

	for _, diffID := range built.DiffIDs {
		if !regionHasLayer(t, d, diffID) {
			t.Fatalf("layer %s is not in the region after import", diffID)
		}
	}
	// Our differ streamed each layer once (not the walking differ plus a
	// conversion at Commit); nothing came from the region.
	if m := d.metrics(t); m["daxfs_layers_applied_total"] != float64(len(built.DiffIDs)) ||
		m["daxfs_layers_converted_total"] != float64(len(built.DiffIDs)) || m["daxfs_region_hits_total"] != 0 {
		t.Fatalf("after a cold import: %v layers applied by our differ, %v converted, %v region hits; want %d, %d and 0",
			m["daxfs_layers_applied_total"], m["daxfs_layers_converted_total"], m["daxfs_region_hits_total"], len(built.DiffIDs), len(built.DiffIDs))
	}

	out := ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", ref, "read",
		"sh", "-c", "cat /etc/greeting; sha256sum /bin/busybox")
	if want := greeting + busyboxSum(t) + "  /bin/busybox\n"; out != want {
		t.Fatalf("container output %q, want %q", out, want)
	}
	requireViewFSType(t, d, fstype)
	// Copy-up on write, delete of a lower file, rename, and a listing of
	// the merged directory, all in one container.
	script := strings.Join([]string{
		"echo changed >> /etc/greeting",
		"rm /bin/ls",
		"mv /etc/greeting /etc/moved",
		"cat /etc/moved",
		"test ! -e /bin/ls && echo ls-gone",
		"echo listing: $(ls /etc)",
	}, " && ")
	out = ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", ref, "write", "sh", "-c", script)
	head, listing, _ := strings.Cut(out, "listing: ")
	if head != greeting+"changed\nls-gone\n" {
		t.Fatalf("write container output %q", out)
	}
	names := strings.Fields(listing)
	if !slices.Contains(names, "moved") || slices.Contains(names, "greeting") {
		t.Fatalf("/etc after the rename lists %v: want moved, not greeting", names)
	}
	// The lower is untouched: a new container sees the image as it was.
	out = ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", ref, "again", "sh", "-c", "cat /etc/greeting; ls /bin/ls")
	if out != greeting+"/bin/ls\n" {
		t.Fatalf("second container output %q", out)
	}
}

// TestDaxfsEquivalence unpacks the layered image (whiteouts, opaque
// directories, hard links, FIFOs, devices, xattrs, mtimes, long UTF-8
// names) with containerd's overlayfs snapshotter and with daxfs in the same
// containerd, and compares the two root trees path for path.
func TestDaxfsEquivalence(t *testing.T) {
	ctrd, _ := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/layered:latest"
	archive, built := testenv.WriteImageArchive(t, layeredImage(t), ref)
	ctrd.CtrOK(t, "image", "import", archive)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)

	want := viewTree(t, ctrd, "overlayfs", built)
	got := viewTree(t, ctrd, "daxfs", built)
	// overlayfs reports nlink 1 for directories merged from several
	// lowers; daxfs counts subdirectories like a normal filesystem.
	if d := testenv.Diff(want, got, testenv.FieldDirMtime|testenv.FieldDirNlink); len(d) > 0 {
		t.Fatalf("daxfs root differs from overlayfs root:\n%s", strings.Join(d, "\n"))
	}
	if len(got) < 20 {
		t.Fatalf("daxfs root has only %d paths: %v", len(got), got)
	}
}

// TestDaxfsRegistryPull pushes an image to a real registry and pulls it
// with `ctr image pull --snapshotter daxfs` (the transfer service and our
// differ), then runs it.
func TestDaxfsRegistryPull(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	remote, built := pushImage(t, src, reg, greetingImage(t, testimage.Zstd), "greeting:daxfs")

	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ctrd.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", remote)
	requireApplied(t, d, built)
	// The daemon runs beside containerd: blobs come from the files of its
	// content store, not through its content API.
	if m := d.metrics(t); m["daxfs_blobs_local_total"] < float64(len(built.DiffIDs)) || m["daxfs_blobs_remote_total"] != 0 {
		t.Fatalf("blobs read locally %v, through the content API %v; want %d and 0", m["daxfs_blobs_local_total"], m["daxfs_blobs_remote_total"], len(built.DiffIDs))
	}
	runGreetingOn(t, ctrd, "daxfs", remote, "pulled")
}

// requireApplied fails unless every layer of built is READY in the
// daemon's region and our differ (not the walking differ) put it there.
func requireApplied(t *testing.T, d *daxfsDaemon, built *testimage.Built) {
	t.Helper()
	for _, diffID := range built.DiffIDs {
		if !regionHasLayer(t, d, diffID) {
			t.Fatalf("layer %s is not in the region", diffID)
		}
	}
	if got := d.metrics(t)["daxfs_layers_applied_total"]; got < float64(len(built.DiffIDs)) {
		t.Fatalf("our differ applied %v layers, want at least %d", got, len(built.DiffIDs))
	}
}

// runGreetingOn is runGreeting with a snapshotter.
func runGreetingOn(t *testing.T, ctrd *testenv.Containerd, snapshotter, ref, id string) {
	t.Helper()
	out := ctrd.CtrOK(t, "run", "--rm", "--snapshotter", snapshotter, ref, id, "sh", "-c", "cat /etc/greeting; sha256sum /bin/busybox")
	if want := greeting + busyboxSum(t) + "  /bin/busybox\n"; out != want {
		t.Fatalf("container output:\n%q\nwant:\n%q", out, want)
	}
}

// TestDaxfsClientPull pulls with the Go client's Pull(WithPullUnpack):
// unpacking goes through the diff service's default order, where our
// differ comes first. The daemon is not told containerd's root, so it
// reads blobs through containerd's content API.
func TestDaxfsClientPull(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	remote, built := pushImage(t, src, reg, greetingImage(t, testimage.Gzip), "greeting:client")

	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{ContentAPI: true})
	cl := ctrd.Client(t)
	ctx := ctrd.Context(context.Background())
	resolver := docker.NewResolver(docker.ResolverOptions{Hosts: docker.ConfigureDefaultRegistries(docker.WithPlainHTTP(docker.MatchAllHosts))})
	img, err := cl.Pull(ctx, remote, client.WithPullUnpack, client.WithPullSnapshotter("daxfs"), client.WithResolver(resolver))
	if err != nil {
		t.Fatalf("client.Pull: %v", err)
	}
	if ok, err := img.IsUnpacked(ctx, "daxfs"); err != nil || !ok {
		t.Fatalf("image not unpacked into daxfs: %v %v", ok, err)
	}
	requireApplied(t, d, built)
	if m := d.metrics(t); m["daxfs_blobs_remote_total"] < float64(len(built.DiffIDs)) || m["daxfs_blobs_local_total"] != 0 {
		t.Fatalf("blobs read through the content API %v, locally %v; want %d and 0", m["daxfs_blobs_remote_total"], m["daxfs_blobs_local_total"], len(built.DiffIDs))
	}
	runGreetingOn(t, ctrd, "daxfs", remote, "client-pulled")
}

// TestDaxfsSharedRegion runs two daemons (two participants, as two kernels
// sharing one memory pool) on one region: the second import finds every
// layer in the region and converts nothing.
func TestDaxfsSharedRegion(t *testing.T) {
	first, d1 := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/greeting:shared"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	first.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	before := layerWriters(t, d1, built.DiffIDs)

	second, d2 := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{Region: d1.Region})
	second.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)
	after := layerWriters(t, d2, built.DiffIDs)
	for i, diffID := range built.DiffIDs {
		if before[i] != after[i] {
			t.Fatalf("layer %s was rewritten by the second participant (%v -> %v)", diffID, before[i], after[i])
		}
	}
	if m := d2.metrics(t); m["daxfs_layers_converted_total"] != 0 || m["daxfs_region_hits_total"] != float64(len(built.DiffIDs)) {
		t.Fatalf("second participant: %v layers converted, %v region hits; want 0 and %d", m["daxfs_layers_converted_total"], m["daxfs_region_hits_total"], len(built.DiffIDs))
	}
	runGreetingOn(t, second, "daxfs", ref, "on-second")
	runGreetingOn(t, first, "daxfs", ref, "on-first")
}

// layerWriters returns, for each diffID, the region entry's writer and
// publication time: what changes if a layer is converted again.
func layerWriters(t *testing.T, d *daxfsDaemon, diffIDs []digest.Digest) []string {
	t.Helper()
	r, err := daxmem.Open(context.Background(), daxmem.Options{Path: d.Region})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	var out []string
	for _, diffID := range diffIDs {
		k, err := daxmem.KeyFromDigest(diffID.String())
		if err != nil {
			t.Fatal(err)
		}
		e, ok := r.Lookup(daxmem.KindLayer, k)
		if !ok {
			t.Fatalf("layer %s not in the region", diffID)
		}
		out = append(out, fmt.Sprintf("%d@%d/%d", e.Writer, e.Offset, e.Published.UnixNano()))
	}
	return out
}

// TestDaxfsDaemonRestart keeps a container reading its root filesystem in
// a loop while the daemon is killed with SIGKILL and restarted: not one
// read may fail, and new containers start after the restart.
func TestDaxfsDaemonRestart(t *testing.T) {
	for _, mm := range mountModes {
		t.Run(mm.mode, func(t *testing.T) { testDaemonRestart(t, mm.mode, mm.fstype) })
	}
}

func testDaemonRestart(t *testing.T, mode, fstype string) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{}, daxfsOptions{Mode: mode})
	ref := "docker.io/library/greeting:restart"
	archive, _ := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", archive)

	logPath := filepath.Join(t.TempDir(), "reader.log")
	loop := `n=0; while true; do
  if ! cat /etc/greeting /bin/busybox > /dev/null || ! ls /bin > /dev/null; then echo READ-ERROR; fi
  n=$((n+1)); echo "iteration $n"; sleep 0.05
done`
	ctrd.CtrOK(t, "run", "-d", "--snapshotter", "daxfs", "--log-uri", "file://"+logPath, ref, "reader", "sh", "-c", loop)
	t.Cleanup(func() { _, _ = ctrd.Ctr(t, "task", "kill", "-s", "SIGKILL", "reader") })

	waitIterations := func(min int) int {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			n := iterations(t, logPath)
			if n >= min {
				return n
			}
			if time.Now().After(deadline) {
				t.Fatalf("reader made %d iterations, want %d:\n%s", n, min, tail(logPath))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	n := waitIterations(5)
	requireViewFSType(t, d, fstype)
	d.kill(t)
	// The reader keeps going with the daemon dead.
	n = waitIterations(n + 20)
	d.start(t)
	n = waitIterations(n + 20)
	runGreetingOn(t, ctrd, "daxfs", ref, "after-restart")
	// The restarted daemon adopted the view the reader uses: the new
	// container got the same mount, none was made.
	if got := d.metrics(t)["daxfs_views_mounted_total"]; got != 0 {
		t.Fatalf("the restarted daemon mounted %v views for a chain whose view was already mounted", got)
	}
	// Garbage collection of another image ends in the snapshotter's
	// Cleanup, which must keep the adopted view: it still has a user.
	other := "docker.io/library/greeting:other"
	otherImg := testenv.BusyboxImage(t, testimage.Layer{Entries: []testimage.Entry{testimage.File("other", []byte("other\n"), 0o644)}})
	otherArchive, _ := testenv.WriteImageArchive(t, otherImg, other)
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "daxfs", otherArchive)
	ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", other, "other", "true")
	ctrd.CtrOK(t, "image", "rm", "--sync", other)
	if got := d.metrics(t)["daxfs_views_unmounted_total"]; got < 1 {
		t.Fatalf("Cleanup after removing %s unmounted %v views: the idle one should go", other, got)
	}
	waitIterations(n + 20)
	if b, _ := os.ReadFile(logPath); strings.Contains(string(b), "READ-ERROR") || strings.Contains(string(b), "rror") {
		t.Fatalf("the reader saw errors across the restart:\n%s", tail(logPath))
	}
}

func iterations(t *testing.T, path string) int {
	b, _ := os.ReadFile(path)
	return strings.Count(string(b), "iteration ")
}

func tail(path string) string {
	b, _ := os.ReadFile(path)
	s := string(b)
	if len(s) > 2000 {
		s = s[len(s)-2000:]
	}
	return s
}

// TestDaxfsPreconverted makes pre-converted images of an image, zstd
// compressed with the daemon's convert command and bare with our
// containerd image converter, pushes both to a registry, pulls them with
// --snapshotter daxfs and runs them: our differ validates each layer and
// copies it into the region.
func TestDaxfsPreconverted(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	local := "docker.io/library/greeting:orig"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), local)
	src.CtrOK(t, "image", "import", archive)
	ctx := src.Context(context.Background())

	// A platform the image does not have is an error, not an empty image.
	out, err := exec.Command(daemonBinary(t), "convert", "--address", src.Address(), "--namespace", src.Namespace,
		"--platform", "linux/s390x", local, reg+"/library/greeting:s390x").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "no manifest for the platform asked for (linux/s390x)") || !strings.Contains(string(out), local) {
		t.Fatalf("convert for a platform the image lacks: %v, %s", err, out)
	}

	for _, tc := range []struct {
		tag       string
		convert   func(remote string) error
		mediaType string
	}{
		{"daxfs-zstd", func(remote string) error {
			out, err := exec.Command(daemonBinary(t), "convert", "--address", src.Address(), "--namespace", src.Namespace, local, remote).CombinedOutput()
			if err != nil {
				return fmt.Errorf("%v: %s", err, out)
			}
			return nil
		}, converter.MediaTypeLayerZstd},
		{"daxfs-bare", func(remote string) error {
			_, err := ctrconverter.Convert(ctx, src.Client(t), remote, local,
				ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc(imageconv.WithCompression(imageconv.None))))
			return err
		}, converter.MediaTypeLayer},
	} {
		remote := reg + "/library/greeting:" + tc.tag
		if err := tc.convert(remote); err != nil {
			t.Fatalf("converting %s to DAXFS layers as %s: %v", local, remote, err)
		}
		img, err := src.Client(t).GetImage(ctx, remote)
		if err != nil {
			t.Fatal(err)
		}
		mf, err := images.Manifest(ctx, src.Client(t).ContentStore(), img.Target(), platforms.All)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range mf.Layers {
			if l.MediaType != tc.mediaType {
				t.Fatalf("converted layer %s is %s, want %s", l.Digest, l.MediaType, tc.mediaType)
			}
		}
		src.CtrOK(t, "image", "push", "--plain-http", remote)

		// A daemon of its own: both forms have the same diffIDs, so a
		// region holding one form's layers already holds the other's.
		ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
		ctrd.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", remote)
		if m := d.metrics(t); m["daxfs_layers_applied_total"] != float64(len(built.DiffIDs)) {
			t.Fatalf("our differ took %v pre-converted layers, want %d", m["daxfs_layers_applied_total"], len(built.DiffIDs))
		}
		runGreetingOn(t, ctrd, "daxfs", remote, "preconverted-"+tc.tag)
	}
}

// TestDaxfsPreconvertedManyFiles pulls a pre-converted image of 20,000
// small files: every file takes a page of the image, which zstd
// compresses to almost nothing, so the image is over 60 times its blob.
// The differ sizes the region extent from the image's superblock and
// converts it in one go, with no second attempt on a larger guess.
func TestDaxfsPreconvertedManyFiles(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	img := testenv.BusyboxImage(t)
	var files []testimage.Entry
	for d := range 100 {
		files = append(files, testimage.Dir(fmt.Sprintf("many/%02d", d), 0o755))
		for f := range 200 {
			files = append(files, testimage.File(fmt.Sprintf("many/%02d/%03d", d, f), []byte(fmt.Sprintf("file %d/%d\n", d, f)), 0o644))
		}
	}
	img.Layers = append(img.Layers, testimage.Layer{Compression: testimage.Gzip, Entries: append([]testimage.Entry{testimage.Dir("many", 0o755)}, files...)})
	local := "docker.io/library/many:orig"
	archive, built := testenv.WriteImageArchive(t, img, local)
	src.CtrOK(t, "image", "import", archive)
	remote := reg + "/library/many:daxfs"
	ctx := src.Context(context.Background())
	if _, err := ctrconverter.Convert(ctx, src.Client(t), remote, local, ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc())); err != nil {
		t.Fatal(err)
	}
	src.CtrOK(t, "image", "push", "--plain-http", remote)

	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ctrd.CtrOK(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", remote)
	if m := d.metrics(t); m["daxfs_layers_applied_total"] != float64(len(built.DiffIDs)) || m["daxfs_convert_failures_total"] != 0 {
		t.Fatalf("applied %v layers with %v failures, want %d and none", m["daxfs_layers_applied_total"], m["daxfs_convert_failures_total"], len(built.DiffIDs))
	}
	if log, err := os.ReadFile(d.LogPath); err != nil {
		t.Fatal(err)
	} else if strings.Contains(string(log), "converting again with more") {
		t.Fatal("the pre-converted layer was converted twice: its size was guessed, not read")
	}
	out := ctrd.CtrOK(t, "run", "--rm", "--snapshotter", "daxfs", remote, "many", "sh", "-c", "cat /many/42/199; ls /many/07 | wc -l")
	if out != "file 42/199\n200\n" {
		t.Fatalf("container output %q", out)
	}
}

// TestDaxfsClientUnpack unpacks with the Go client's Image.Unpack, which
// names its extraction snapshots ("extract-<unique> <chain ID>") but
// labels them with nothing, not even the layer's diffID: our differ learns
// each diffID from its blob and converts the layer straight into the
// region, instead of leaving it to the walking differ.
func TestDaxfsClientUnpack(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/greeting:unpack"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	ctrd.CtrOK(t, "image", "import", "--no-unpack", archive)
	cl := ctrd.Client(t)
	ctx := ctrd.Context(context.Background())
	img, err := cl.GetImage(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.Unpack(ctx, "daxfs"); err != nil {
		t.Fatalf("Image.Unpack: %v", err)
	}
	requireApplied(t, d, built)
	if m := d.metrics(t); m["daxfs_layers_converted_total"] != float64(len(built.DiffIDs)) {
		t.Fatalf("%v layers converted, want %d (by our differ, none at commit)", m["daxfs_layers_converted_total"], len(built.DiffIDs))
	}
	runGreetingOn(t, ctrd, "daxfs", ref, "unpacked")
}
