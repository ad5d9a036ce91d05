package guests

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// BenchmarkGuestPull boots two guests sharing one memory (as
// TestTwoKernelsOneMemory does) and prints guest B's pull of the image,
// joining the region guest A pulled it into, against A's (download and
// conversion), with B's pull of the same image into containerd's
// overlayfs snapshotter for reference, and the page cache that reading a
// whole container root adds in B with daxfs and with overlayfs:
//
//	go test -run '^$' -bench GuestPull -benchtime 1x -v -timeout 40m ./tests/guests/
//
// Each iteration boots fresh guests (TCG: about a minute); times are
// measured in the guests, around `ctr image pull`. One iteration takes
// minutes, so the default -benchtime runs one.
func BenchmarkGuestPull(b *testing.B) {
	requireGuests(b)
	var pullA, pullB, pullOvl time.Duration
	var downA, downB, downOvl int64
	var pc pageCache
	for i := 0; i < b.N; i++ {
		g := startTwoGuests(b)
		testPullInA(b, g)
		testJoinFromB(b, g)
		pullA, pullB = pullA+g.pullA, pullB+g.pullB
		downA, downB = downA+g.a.proxy.LayerBytes(g.built), downB+g.b.proxy.LayerBytes(g.built)
		before := g.b.proxy.LayerBytes(g.built)
		pullOvl += g.b.timedCtr(b, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", g.ref)
		downOvl += g.b.proxy.LayerBytes(g.built) - before
		p := measurePageCache(b, g)
		pc.daxRead, pc.daxCgroup, pc.daxCached = pc.daxRead+p.daxRead, pc.daxCgroup+p.daxCgroup, pc.daxCached+p.daxCached
		pc.ovlRead, pc.ovlCgroup, pc.ovlCached = pc.ovlRead+p.ovlRead, pc.ovlCgroup+p.ovlCgroup, pc.ovlCached+p.ovlCached
	}
	n := time.Duration(b.N)
	var tab strings.Builder
	fmt.Fprintf(&tab, "\n%-44s %10s %8s %16s\n", "pull of the guest image (busybox + 2 layers)", "time", "vs A", "layers download")
	row := func(name string, d time.Duration, bytes int64) {
		fmt.Fprintf(&tab, "%-44s %10s %7.2fx %13.1f MB\n", name, (d / n).Round(time.Millisecond), float64(d)/float64(pullA), float64(bytes)/float64(b.N)/1e6)
	}
	row("guest A, daxfs, empty region", pullA, downA)
	row("guest B, daxfs, joining A's region", pullB, downB)
	row("guest B, overlayfs", pullOvl, downOvl)
	k := int64(b.N)
	fmt.Fprintf(&tab, "\npage cache added by reading a whole container root in guest B (%.1f MiB read):\n", mib(pc.daxRead/k))
	fmt.Fprintf(&tab, "  %-10s container cgroup file pages %+7.1f MiB, guest Cached %+7.1f MiB\n", "daxfs", mib(pc.daxCgroup/k), mib(pc.daxCached/k))
	fmt.Fprintf(&tab, "  %-10s container cgroup file pages %+7.1f MiB, guest Cached %+7.1f MiB\n", "overlayfs", mib(pc.ovlCgroup/k), mib(pc.ovlCached/k))
	b.Log(tab.String())
	b.ReportMetric(float64(pullB)/float64(pullA), "pullB/pullA")
	b.ReportMetric(mib(pc.daxCgroup/k), "daxfs-MiB-cached")
	b.ReportMetric(mib(pc.ovlCgroup/k), "overlayfs-MiB-cached")
}
