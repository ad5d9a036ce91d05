package tests

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// benchImages are the images of BenchmarkImportRun: a Debian minbase
// rootfs as one layer, and a multi-layer image (busybox plus the Debian
// rootfs split into three layers by top-level directory).
func benchImages(b testing.TB) map[string]testimage.Image {
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
	refs, archives := map[string]string{}, map[string]string{}
	for name, img := range images {
		refs[name] = "docker.io/library/bench-" + name + ":latest"
		archives[name], _ = testenv.WriteImageArchive(b, img, refs[name])
	}
	results, failures := measureRows(b, []string{"debian", "multilayer"}, benchRows,
		func(tb testing.TB, name, r string, i int) (row, error) {
			importT, runT, err := benchRow(tb, r, refs[name], archives[name], fmt.Sprintf("bench-%d", i))
			return row{importT, runT}, err
		},
		func(a, b row) row { return row{a.importT + b.importT, a.runT + b.runT} })
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

// measureRows runs measure for every image and row, b.N times over, each
// row in a cleanup scope of its own: its daemons stop before the next row
// starts (idle daemons of earlier rows, and their mounts, would slow the
// later ones). It sums what measure returns by image and row, and lists
// the rows that failed instead.
func measureRows[T any](b *testing.B, images, rows []string, measure func(tb testing.TB, image, row string, i int) (T, error), add func(T, T) T) (map[string]map[string]T, []string) {
	sums := map[string]map[string]T{}
	var failures []string
	for i := 0; i < b.N; i++ {
		for _, image := range images {
			if sums[image] == nil {
				sums[image] = map[string]T{}
			}
			for _, row := range rows {
				v, err := func() (T, error) {
					scope := &cleanupScope{TB: b}
					defer scope.done()
					return measure(scope, image, row, i)
				}()
				if err != nil {
					failures = append(failures, fmt.Sprintf("%s on %s: %v", image, row, err))
					continue
				}
				sums[image][row] = add(sums[image][row], v)
			}
		}
	}
	return sums, failures
}

// benchRow starts the daemons of one row of BenchmarkImportRun and times
// `ctr image import` of archive and a first `ctr run` of ref on them.
func benchRow(tb testing.TB, row, ref, archive, id string) (importT, runT time.Duration, err error) {
	var ctrd *testenv.Containerd
	sn := row
	switch row {
	case "daxfs":
		ctrd, _ = startWithDaxfs(tb, testenv.ContainerdOptions{})
	case "daxfs-fuse":
		sn = "daxfs"
		ctrd, _ = startWithDaxfs(tb, testenv.ContainerdOptions{}, daxfsOptions{Mode: "fuse"})
	case "erofs":
		// containerd's EROFS snapshotter. Its own differ needs
		// mkfs.erofs --tar (erofs-utils 1.8), which Debian 12's 1.5 lacks
		// (the differ skips loading): the walking differ unpacks into
		// the snapshot and Commit converts the directory with
		// mkfs.erofs, as the snapshotter documents for other differs.
		ctrd = testenv.StartContainerd(tb, testenv.ContainerdOptions{ExtraConfig: erofsUnpackConfig})
	case "overlayfs":
		ctrd = testenv.StartContainerd(tb, testenv.ContainerdOptions{})
	default:
		return 0, 0, fmt.Errorf("unknown row %q", row)
	}
	// Every import starts from the same state: nothing dirty waiting for
	// writeback from the previous one (which would slow whoever comes
	// next), no cached archive.
	settle(tb)
	start := time.Now()
	if _, err := ctrd.Ctr(tb, "image", "import", "--snapshotter", sn, archive); err != nil {
		return 0, 0, fmt.Errorf("import: %v", firstLine(err))
	}
	importT = time.Since(start)
	settle(tb)
	start = time.Now()
	out, err := ctrd.Ctr(tb, "run", "--rm", "--snapshotter", sn, ref, id, "/bin/sh", "-c", "echo ok")
	if err != nil || strings.TrimSpace(out) != "ok" {
		return 0, 0, fmt.Errorf("run: %v %q", firstLine(err), out)
	}
	return importT, time.Since(start), nil
}

// erofsUnpackConfig lets the transfer service unpack for containerd's
// EROFS snapshotter (next to overlayfs, the default).
const erofsUnpackConfig = `
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
    differ = "walking"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "erofs"
    differ = "walking"
`

// cleanupScope is a testing.TB whose Cleanup functions run at done, not
// at the end of the benchmark: the daemons of one row stop before the
// next row starts.
type cleanupScope struct {
	testing.TB
	cleanups []func()
}

func (s *cleanupScope) Cleanup(f func()) { s.cleanups = append(s.cleanups, f) }

func (s *cleanupScope) done() {
	for _, v := range slices.Backward(s.cleanups) {
		v()
	}
	s.cleanups = nil
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
func settle(b testing.TB) {
	b.Helper()
	if err := exec.Command("sync").Run(); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o644); err != nil {
		b.Fatal(err)
	}
}
