package tests

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/core/content"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"

	"github.com/containerd-daxfs/containerd-daxfs/converter/imageconv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// pullRows are the rows of BenchmarkPull: containerd's overlayfs
// snapshotter, daxfs on a fresh region (unpacking layers one after the
// other, containerd's default, and in parallel with the transfer
// service's max_concurrent_unpacks = 3), daxfs pulling an image whose
// layers were pre-converted to DAXFS, and daxfs as a second participant
// of a region another daemon (another kernel or host on the same memory)
// already pulled the image into.
var pullRows = []string{"overlayfs", "daxfs", "daxfs-parallel", "daxfs-preconverted", "daxfs-shared"}

// BenchmarkPull measures `ctr image pull` (fetch and unpack) from a
// registry on loopback, cold (fresh daemons, writeback done and caches
// dropped before each pull), and the layer bytes each pull stored in
// containerd's content store, as ratios to overlayfs:
//
//	go test -run '^$' -bench Pull -benchtime 1x -v ./tests/
//
// The shared row is what a region buys: its layers are found in the
// region, so containerd downloads and unpacks none of them.
func BenchmarkPull(b *testing.B) {
	testenv.RequireRoot(b)
	reg := testenv.StartRegistry(b)
	src := testenv.StartContainerd(b, testenv.ContainerdOptions{})
	images := benchImages(b)
	remotes := map[string]string{}
	for name, img := range images {
		remote, _ := pushImage(b, src, reg, img, "bench-"+name+":latest")
		remotes[name] = remote
		pre := reg + "/library/bench-" + name + ":daxfs-layers"
		local := "docker.io/library/bench-" + name + ":latest"
		if _, err := ctrconverter.Convert(src.Context(context.Background()), src.Client(b), pre, local, ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc())); err != nil {
			b.Fatalf("converting %s to DAXFS layers: %v", name, err)
		}
		src.CtrOK(b, "image", "push", "--plain-http", pre)
		remotes[name+"-preconverted"] = pre
	}

	type row struct {
		pullT  time.Duration
		stored int64
	}
	results, failures := measureRows(b, []string{"debian", "multilayer"}, pullRows,
		func(tb testing.TB, name, r string, i int) (row, error) {
			pullT, stored, err := pullRow(tb, r, remotes[name], remotes[name+"-preconverted"], fmt.Sprintf("pull-%d", i))
			return row{pullT, stored}, err
		},
		func(a, b row) row { return row{a.pullT + b.pullT, a.stored + b.stored} })
	var tab strings.Builder
	fmt.Fprintf(&tab, "\n%-11s %-19s %10s %8s %14s %8s\n", "image", "snapshotter", "pull", "ratio", "content stored", "ratio")
	for _, name := range []string{"debian", "multilayer"} {
		base := results[name]["overlayfs"]
		for _, r := range pullRows {
			res, ok := results[name][r]
			if !ok || base.pullT == 0 {
				fmt.Fprintf(&tab, "%-11s %-19s %10s %8s %14s %8s\n", name, r, "failed", "-", "-", "-")
				continue
			}
			n := int64(b.N)
			rp := float64(res.pullT) / float64(base.pullT)
			rs := float64(res.stored) / float64(base.stored)
			fmt.Fprintf(&tab, "%-11s %-19s %10s %7.2fx %12.1fMB %7.2fx\n", name, r, (res.pullT / time.Duration(n)).Round(time.Millisecond), rp, float64(res.stored/n)/1e6, rs)
			if r != "overlayfs" {
				b.ReportMetric(rp, name+"-"+r+"-pull/overlayfs")
			}
		}
	}
	for _, f := range failures {
		fmt.Fprintf(&tab, "failure: %s\n", f)
	}
	b.Log(tab.String())
	if len(failures) > 0 {
		b.Errorf("%d pulls failed", len(failures))
	}
}

// pullRow starts the daemons of one row of BenchmarkPull, times a pull of
// remote (of pre, the pre-converted image, on that row) and checks that a
// container runs from it. It returns the pull time and the bytes the pull
// left in containerd's content store.
func pullRow(tb testing.TB, row, remote, pre, id string) (time.Duration, int64, error) {
	var ctrd *testenv.Containerd
	sn, ref := "daxfs", remote
	switch row {
	case "overlayfs":
		sn = row
		ctrd = testenv.StartContainerd(tb, testenv.ContainerdOptions{})
	case "daxfs":
		ctrd, _ = startWithDaxfs(tb, testenv.ContainerdOptions{})
	case "daxfs-parallel":
		ctrd, _ = startWithDaxfs(tb, testenv.ContainerdOptions{}, daxfsOptions{MaxConcurrentUnpacks: 3})
	case "daxfs-preconverted":
		ref = pre
		ctrd, _ = startWithDaxfs(tb, testenv.ContainerdOptions{})
	case "daxfs-shared":
		// Another participant pulls first, into the region the measured
		// daemon then joins.
		first, d := startWithDaxfs(tb, testenv.ContainerdOptions{})
		first.CtrOK(tb, "image", "pull", "--plain-http", "--snapshotter", "daxfs", ref)
		ctrd, _ = startWithDaxfs(tb, testenv.ContainerdOptions{}, daxfsOptions{Region: d.Region})
	default:
		return 0, 0, fmt.Errorf("unknown row %q", row)
	}
	settle(tb)
	start := time.Now()
	if _, err := ctrd.Ctr(tb, "image", "pull", "--plain-http", "--snapshotter", sn, ref); err != nil {
		return 0, 0, fmt.Errorf("pull: %v", firstLine(err))
	}
	pullT := time.Since(start)
	out, err := ctrd.Ctr(tb, "run", "--rm", "--snapshotter", sn, ref, id, "/bin/sh", "-c", "echo ok")
	if err != nil || strings.TrimSpace(out) != "ok" {
		return 0, 0, fmt.Errorf("run: %v %q", firstLine(err), out)
	}
	ctx := ctrd.Context(context.Background())
	var stored int64
	err = ctrd.Client(tb).ContentStore().Walk(ctx, func(info content.Info) error {
		stored += info.Size
		return nil
	})
	return pullT, stored, err
}
