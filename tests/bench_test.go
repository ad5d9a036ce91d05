package tests

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// benchImages are the images of BenchmarkImportRun: a Debian minbase
// rootfs as one layer, and a multi-layer image (busybox plus the Debian
// rootfs split into three layers by top-level directory).
func benchImages(b *testing.B) map[string]testimage.Image {
	b.Helper()
	raw, err := os.ReadFile(testenv.DebianRootfsTar(b))
	if err != nil {
		b.Fatal(err)
	}
	debian := testimage.Image{Layers: []testimage.Layer{{Raw: raw, Compression: testimage.Gzip}}}
	debian.Config.Cmd = []string{"/bin/sh"}

	root := testenv.DebianRootfs(b)
	var parts [3][]string
	ents, err := os.ReadDir(root)
	if err != nil {
		b.Fatal(err)
	}
	for _, e := range ents {
		switch e.Name() {
		case "usr":
			parts[0] = append(parts[0], e.Name())
		case "var", "etc":
			parts[1] = append(parts[1], e.Name())
		default:
			parts[2] = append(parts[2], e.Name())
		}
	}
	multi := testenv.BusyboxImage(b)
	for _, p := range parts {
		var buf bytes.Buffer
		args := append([]string{"-C", root, "--numeric-owner", "--xattrs", "-cf", "-"}, p...)
		cmd := exec.Command("tar", args...)
		cmd.Stdout = &buf
		if err := cmd.Run(); err != nil {
			b.Fatalf("tar of %v: %v", p, err)
		}
		multi.Layers = append(multi.Layers, testimage.Layer{Raw: buf.Bytes(), Compression: testimage.Gzip})
	}
	multi.Config.Cmd = []string{"/bin/sh"}
	return map[string]testimage.Image{"debian": debian, "multilayer": multi}
}

// benchRows are the rows of BenchmarkImportRun: containerd's snapshotters,
// then daxfs with its default mounter (erofs over loop devices here) and
// with FUSE.
var benchRows = []string{"overlayfs", "erofs", "daxfs", "daxfs-fuse"}

// BenchmarkImportRun measures, in one run on the same images, the time of
// `ctr image import` (import and unpack) and of the first `ctr run` for
// containerd's overlayfs and erofs snapshotters and for daxfs (with each
// mounter), and reports them as ratios to overlayfs (b.ReportMetric, and
// a table in the log).
//
//	go test -run '^$' -bench ImportRun -benchtime 1x -v ./tests/
//
// Each iteration uses fresh daemons, so every import is cold: nothing is
// in the region or the content store beforehand.
func BenchmarkImportRun(b *testing.B) {
	testenv.RequireRoot(b)
	images := benchImages(b)
	type row struct{ importT, runT time.Duration }
	results := map[string]map[string]row{}
	var failures []string
	for i := 0; i < b.N; i++ {
		for name, img := range images {
			ref := "docker.io/library/bench-" + name + ":latest"
			archive, _ := testenv.WriteImageArchive(b, img, ref)
			if results[name] == nil {
				results[name] = map[string]row{}
			}
			for _, row := range benchRows {
				var ctrd *testenv.Containerd
				sn := row
				switch row {
				case "daxfs":
					ctrd, _ = startWithDaxfs(b, testenv.ContainerdOptions{})
				case "daxfs-fuse":
					sn = "daxfs"
					ctrd, _ = startWithDaxfs(b, testenv.ContainerdOptions{}, daxfsOptions{Mode: "fuse"})
				default:
					ctrd = testenv.StartContainerd(b, testenv.ContainerdOptions{})
				}
				// Every import starts from the same state: nothing dirty
				// waiting for writeback from the previous one (which would
				// slow whoever comes next), no cached archive.
				settle(b)
				start := time.Now()
				if _, err := ctrd.Ctr(b, "image", "import", "--snapshotter", sn, archive); err != nil {
					failures = append(failures, fmt.Sprintf("%s on %s: import: %v", name, row, firstLine(err)))
					continue
				}
				importT := time.Since(start)
				settle(b)
				start = time.Now()
				out, err := ctrd.Ctr(b, "run", "--rm", "--snapshotter", sn, ref, fmt.Sprintf("bench-%d", i), "/bin/sh", "-c", "echo ok")
				if err != nil || strings.TrimSpace(out) != "ok" {
					failures = append(failures, fmt.Sprintf("%s on %s: run: %v %q", name, row, firstLine(err), out))
					continue
				}
				r := results[name][row]
				r.importT += importT
				r.runT += time.Since(start)
				results[name][row] = r
			}
		}
	}
	var tab strings.Builder
	fmt.Fprintf(&tab, "\n%-11s %-10s %12s %9s %12s %9s\n", "image", "snapshotter", "import+unpack", "ratio", "first run", "ratio")
	for _, name := range []string{"debian", "multilayer"} {
		base := results[name]["overlayfs"]
		for _, sn := range benchRows {
			r, ok := results[name][sn]
			if !ok || base.importT == 0 {
				fmt.Fprintf(&tab, "%-11s %-10s %12s %9s %12s %9s\n", name, sn, "failed", "-", "failed", "-")
				continue
			}
			n := time.Duration(b.N)
			ri, rr := float64(r.importT)/float64(base.importT), float64(r.runT)/float64(base.runT)
			fmt.Fprintf(&tab, "%-11s %-10s %12s %8.2fx %12s %8.2fx\n", name, sn, (r.importT / n).Round(time.Millisecond), ri, (r.runT / n).Round(time.Millisecond), rr)
			if strings.HasPrefix(sn, "daxfs") {
				b.ReportMetric(ri, name+"-"+sn+"-import/overlayfs")
				b.ReportMetric(rr, name+"-"+sn+"-run/overlayfs")
			}
		}
	}
	for _, f := range failures {
		fmt.Fprintf(&tab, "failure: %s\n", f)
	}
	b.Log(tab.String())
}

// firstLine shortens a ctr failure to the line that says why (ctr's own
// "ctr: ..." message from its standard error), else the first line.
func firstLine(err error) string {
	if err == nil {
		return ""
	}
	lines := strings.Split(err.Error(), "\n")
	for _, l := range lines {
		if strings.HasPrefix(strings.TrimSpace(l), "ctr: ") {
			return strings.TrimSpace(l)
		}
	}
	return lines[0]
}

// settle writes back dirty pages and drops the page cache.
func settle(b *testing.B) {
	b.Helper()
	if err := exec.Command("sync").Run(); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o644); err != nil {
		b.Fatal(err)
	}
}
