package guests

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/internal/guest"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
)

// sharedSize is the memory the guests share: the region (TestOneGuest
// keeps its last 128 MiB for a test image of its own).
const sharedSize = 1 << 30

// twoGuests is the setting of the tests: a registry on the host with the
// guest image, guests A and B sharing one memory file that holds a region
// made on the host with `region init --align 2M`, and the product running
// in both.
type twoGuests struct {
	c      *cluster
	a, b   *node
	built  *testimage.Built
	ref    string // the image as the guests name it
	lossy  string // lossyGuestImage as the guests name it
	pullA  time.Duration
	pullB  time.Duration
	mounts []daxfsMount // A's view mounts after its first container
}

// hostCLI runs the daemon binary's operator commands on the host.
func hostCLI(tb testing.TB, args ...string) (string, error) {
	tb.Helper()
	out, err := exec.Command(filepath.Join(binDir, "containerd-daxfs-grpc"), args...).CombinedOutput()
	return string(out), err
}

// regionInit makes a region on a host file as an operator would.
func regionInit(tb testing.TB, path string, extra ...string) {
	tb.Helper()
	args := append([]string{"region", "init", "--path", path, "--size", strconv.Itoa(sharedSize>>20) + "M", "--entries", "1024"}, extra...)
	if out, err := hostCLI(tb, args...); err != nil {
		tb.Fatalf("region %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// startTwoGuests pushes the guest image to a registry on the host and
// boots A and B on a region the host made with `region init --align 2M`
// (without it device DAX refuses the region: TestOneGuest/Alignment). The
// steps start the product in each.
func startTwoGuests(tb testing.TB) *twoGuests {
	tb.Helper()
	reg := testenv.StartRegistry(tb)
	g := &twoGuests{built: guestImage(tb), ref: registryInGuest + "/guest/layered:v1", lossy: registryInGuest + "/guest/lossy:v1"}
	pushImage(tb, reg, "guest/layered", "v1", g.built)
	pushImage(tb, reg, "guest/lossy", "v1", lossyGuestImage(tb))
	g.c = newCluster(tb, sharedSize)
	regionInit(tb, g.c.shared.Path, "--align", "2M")
	ns := g.c.boot(tb, reg, "a", "b")
	g.a, g.b = ns[0], ns[1]
	return g
}

// TestTwoKernelsOneMemory runs the product in two kernels sharing one
// memory: guest A pulls a multi-layer image with whiteouts into the region
// (device DAX) and runs it with views mounted by the daxfs module; guest B
// pulls the same image from the same registry and downloads and converts
// nothing; both roots equal the overlayfs root of that image; reading B's
// whole root adds almost nothing to B's page cache where overlayfs adds
// the bytes read; A's daemon is SIGKILLed and restarted while B reads; and
// garbage collection frees the image only when neither kernel uses it.
func TestTwoKernelsOneMemory(t *testing.T) {
	requireGuests(t)
	g := startTwoGuests(t)
	steps := []struct {
		name string
		fn   func(testing.TB, *twoGuests)
	}{
		{"PullInA", testPullInA},
		{"JoinFromB", testJoinFromB},
		{"RootsEqualOverlayfs", testRootsEqualOverlayfs},
		{"PageCache", testPageCache},
		{"KillDaemonInA", testKillDaemonInA},
		{"GCAcrossKernels", testGCAcrossKernels},
	}
	for _, s := range steps {
		if !t.Run(s.name, func(t *testing.T) { s.fn(t, g) }) {
			t.Fatalf("%s failed: the later steps build on it", s.name)
		}
	}
}

// testPullInA: A pulls the image (downloading and converting every
// layer) and runs a container whose lower is a view mounted by the daxfs
// module at the region's physical address.
func testPullInA(t testing.TB, g *twoGuests) {
	a := g.a
	a.startProduct(t)
	g.pullA = a.timedCtr(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", g.ref)
	t.Logf("guest A: pull %s", g.pullA.Round(time.Millisecond))
	n := float64(len(g.built.Layers))
	if m := a.metrics(t); m["daxfs_layers_converted_total"] != n || m["daxfs_region_hits_total"] != 0 {
		t.Fatalf("guest A converted %v layers with %v region hits, want %v and 0", m["daxfs_layers_converted_total"], m["daxfs_region_hits_total"], n)
	}
	if got, want := a.proxy.LayerBytes(g.built), layerBytes(g.built); got != want {
		t.Fatalf("guest A downloaded %d layer bytes, want all %d", got, want)
	}
	want := "keep\nnew\n" + sha(bigData(0)) + "  /big/0\n"
	if out := a.ctr(t, "run", "--rm", "--snapshotter", "daxfs", g.ref, "a1", "sh", "-c", "'cat /data/keep /data/replaced; sha256sum /big/0'"); out != want {
		t.Fatalf("container in A printed %q, want %q", out, want)
	}
	g.mounts = viewMounts(t, a)
	for _, m := range g.mounts {
		opts := strings.Split(m.Options, ",")
		if !slices.Contains(opts, "ro") || !slices.Contains(opts, "static") || !hasPrefix(opts, "phys=0x") || !hasPrefix(opts, "size=") {
			t.Fatalf("view %s: daxfs options %q, want ro,phys=0x...,size=N,static", m.Target, m.Options)
		}
	}
	t.Logf("guest A: views mounted by the daxfs module: %v", g.mounts)
}

// viewMounts returns the daxfs module's mounts of the daemon's views,
// failing unless there is at least one and every view mount is one.
func viewMounts(t testing.TB, n *node) []daxfsMount {
	t.Helper()
	var views []daxfsMount
	for _, m := range n.daxfsMounts(t) {
		if filepath.Dir(m.Target) == daxfsRoot+"/mnt" {
			views = append(views, m)
		}
	}
	if len(views) == 0 {
		out, _, _ := n.try(t, "cat /proc/self/mountinfo | grep containerd-daxfs/mnt")
		t.Fatalf("guest %s: no view is mounted by the daxfs module; view mounts:\n%s", n.Name, out)
	}
	return views
}

func hasPrefix(opts []string, p string) bool {
	return slices.ContainsFunc(opts, func(o string) bool { return strings.HasPrefix(o, p) })
}

// testJoinFromB: B's daemon joins the region and pulls the image: no
// layer byte is downloaded, nothing converted, no layer blob stored, and
// its container's lower is a daxfs mount of the same physical bytes as
// A's.
func testJoinFromB(t testing.TB, g *twoGuests) {
	b := g.b
	b.startProduct(t)
	g.pullB = b.timedCtr(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", g.ref)
	t.Logf("guest B: pull %s (guest A: %s)", g.pullB.Round(time.Millisecond), g.pullA.Round(time.Millisecond))
	if got := b.proxy.LayerBytes(g.built); got != 0 {
		t.Fatalf("guest B downloaded %d layer bytes, want 0 (served: %v)", got, b.proxy)
	}
	n := float64(len(g.built.Layers))
	if m := b.metrics(t); m["daxfs_layers_converted_total"] != 0 || m["daxfs_region_hits_total"] != n {
		t.Fatalf("guest B converted %v layers with %v region hits, want 0 and %v", m["daxfs_layers_converted_total"], m["daxfs_region_hits_total"], n)
	}
	content := b.ctr(t, "content", "ls", "-q")
	for _, l := range g.built.Layers {
		if strings.Contains(content, l.Descriptor.Digest.String()) {
			t.Fatalf("guest B's content store holds layer blob %s:\n%s", l.Descriptor.Digest, content)
		}
	}
	want := "keep\nnew\n" + sha(bigData(1)) + "  /big/1\n"
	if out := b.ctr(t, "run", "--rm", "--snapshotter", "daxfs", g.ref, "b1", "sh", "-c", "'cat /data/keep /data/replaced; sha256sum /big/1'"); out != want {
		t.Fatalf("container in B printed %q, want %q", out, want)
	}
	// B's container runs on the view A's did: same view, same physical
	// address. Every view B mounted is the region's entry for it. (Which
	// lower chains' views each daemon warms depends on timing.)
	topA, topB := topView(t, g.a), topView(t, b)
	optsA, optsB := "", ""
	for _, m := range g.mounts {
		if m.Target == topA {
			optsA = m.Options
		}
	}
	offsets := map[string]int64{}
	for _, e := range regionEntries(t, b) {
		if e.Kind == "view" {
			offsets[e.Key] = e.Offset
		}
	}
	for _, m := range viewMounts(t, b) {
		if m.Target == topB {
			optsB = m.Options
		}
		off, ok := offsets["sha256:"+filepath.Base(m.Target)]
		if want := fmt.Sprintf("phys=%#x,", guest.SharedBase+off); !ok || !strings.Contains(m.Options, want) {
			t.Fatalf("B mounts view %s as %q: want %s the region's entry for it", m.Target, m.Options, want)
		}
	}
	if topA != topB || optsA == "" || optsA != optsB {
		t.Fatalf("the image's view: A mounts %s as %q, B %s as %q; the same view at the same physical address was expected", topA, optsA, topB, optsB)
	}
}

// topView returns the mount point of n's view of the image's whole chain:
// the view mount holding a file of the top layer.
func topView(t testing.TB, n *node) string {
	t.Helper()
	out := strings.TrimSpace(n.sh(t, `for d in `+daxfsRoot+`/mnt/*; do [ -e $d/data/added ] && echo $d; done; true`))
	if out == "" || strings.Contains(out, "\n") {
		t.Fatalf("guest %s: want one view mount of the image's top chain, found %q", n.Name, out)
	}
	return out
}

// containerTree runs a container of the image on snapshotter in n, which
// walks its own root (one file system: what the image gave it) with the
// agent's tree helper.
func containerTree(t testing.TB, n *node, ref, snapshotter, id string) map[string]testenv.FileInfo {
	t.Helper()
	out := n.ctr(t, "run", "--rm", "--snapshotter", snapshotter, "--mount", "type=bind,src=/kit/bin,dst=/kitbin,options=rbind:ro",
		ref, id, "/kitbin/guest-agent", "tree", "-xdev", "/")
	var tree map[string]testenv.FileInfo
	if err := json.Unmarshal([]byte(out), &tree); err != nil {
		t.Fatalf("tree of %s's root in %s: %v\n%.2000s", snapshotter, n.Name, err, out)
	}
	return tree
}

// testRootsEqualOverlayfs: the roots containers see in A and in B equal,
// path for path, the root containerd's overlayfs snapshotter gives the
// same image, but for the mtimes the daxfs module does not keep (see the
// README). An image holding what the module would drop besides (a device
// node, an xattr) is not mounted by the module in auto mode: A mounts its
// view with FUSE, and its root equals overlayfs's with them. Directory
// link counts are not compared (overlayfs counts 1 for a merged
// directory), as in the host's equivalence tests.
func testRootsEqualOverlayfs(t testing.TB, g *twoGuests) {
	a := g.a
	a.ctr(t, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", g.ref)
	ref := containerTree(t, a, g.ref, "overlayfs", "tree-overlayfs")
	for _, p := range []string{"/data/gone", "/deleted-dir", "/opaque/old1", "/opaque/sub"} {
		if _, ok := ref[p]; ok {
			t.Fatalf("overlayfs reference shows %s, which a whiteout removes", p)
		}
	}
	for _, n := range []*node{a, g.b} {
		got := containerTree(t, n, g.ref, "daxfs", "tree-daxfs")
		if d := testenv.Diff(ref, got, testenv.FieldDirMtime, testenv.FieldDirNlink, testenv.FieldMtime); len(d) > 0 {
			t.Errorf("guest %s: the daxfs root differs from overlayfs's:\n%s", n.Name, strings.Join(d, "\n"))
		}
	}
	if !t.Failed() {
		t.Logf("roots equal overlayfs's (%d paths) in A and B, but for file mtimes", len(ref))
	}

	a.ctr(t, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", g.lossy)
	lossyRef := containerTree(t, a, g.lossy, "overlayfs", "tree-lossy-overlayfs")
	if fi := lossyRef["/links/null"]; fi.Type != "char" || fi.Rdev == 0 {
		t.Fatalf("the overlayfs reference shows /links/null as %s", fi)
	}
	if lossyRef["/links/xattrs"].Xattrs["user.note"] != "hello" {
		t.Fatalf("the overlayfs reference lost the xattr: %v", lossyRef["/links/xattrs"])
	}
	a.ctr(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", g.lossy)
	got := containerTree(t, a, g.lossy, "daxfs", "tree-lossy-daxfs")
	if d := testenv.Diff(lossyRef, got, testenv.FieldDirMtime, testenv.FieldDirNlink); len(d) > 0 {
		t.Errorf("guest A: the root of the image with a device node and an xattr differs from overlayfs's:\n%s", strings.Join(d, "\n"))
	}
	if l := a.daemonLog(t); !strings.Contains(l, "not mounting with the daxfs module, which would drop the image's xattrs and device nodes") {
		t.Errorf("A's daemon did not say why it mounted the view of the image with a device node and an xattr otherwise:\n%s", l)
	}
	out := a.sh(t, `for d in `+daxfsRoot+`/mnt/*; do [ -e $d/links/xattrs ] && grep " $d " /proc/mounts; done; true`)
	if f := strings.Fields(out); len(f) < 3 || f[2] != mounter.FSTypeFUSE {
		t.Errorf("guest A: the view of the image with a device node and an xattr is %q, want a FUSE mount (no DAX block device configured)", out)
	}
	// Gone again before the steps that count views and region entries.
	a.ctr(t, "image", "rm", "--sync", g.lossy)
}

// imageDirs are the top directories of the guest image holding files:
// what a container of it reads when it reads its whole root. (Not `find /
// -xdev`: overlayfs gives a lower's files the lower's device number when
// the layers are on different file systems, so -xdev would skip them.)
const imageDirs = "/big /bin /data /etc /links /opaque"

// pageCacheGrowth runs a container of the image on snapshotter in n with
// the guest's page cache dropped first, reads every file of its root and
// returns the bytes read and the growth of the container cgroup's file
// pages and of the guest's Cached (kB of /proc/meminfo, as bytes).
func pageCacheGrowth(t testing.TB, n *node, ref, snapshotter, id string) (read, cgroupFile, cached int64) {
	n.sh(t, "sync; echo 3 > /proc/sys/vm/drop_caches")
	// The container sees no cgroup namespace of its own here: it reads
	// its cgroup's memory.stat through a read-only bind of the guest's
	// cgroup tree (containerd puts it at /<namespace>/<id>).
	script := `file() { awk '$1 == "file" {print $2}' /hostcg/` + namespace + `/` + id + `/memory.stat; }
cached() { awk '$1 == "Cached:" {print $2 * 1024}' /proc/meminfo; }
f0=$(file); c0=$(cached)
[ -n "$f0" ] || { echo "no file line in the cgroup's memory.stat" >&2; exit 1; }
n=$(find ` + imageDirs + ` -type f -exec cat {} + | wc -c)
f1=$(file); c1=$(cached)
echo $n $((f1 - f0)) $((c1 - c0))`
	out := n.ctr(t, "run", "--rm", "--snapshotter", snapshotter, "--mount", "type=bind,src=/sys/fs/cgroup,dst=/hostcg,options=rbind:ro",
		ref, id, "sh", "-c", shellQuote(script))
	f := strings.Fields(out)
	if len(f) != 3 {
		t.Fatalf("page cache probe printed %q", out)
	}
	v := make([]int64, 3)
	for i := range f {
		x, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			t.Fatalf("page cache probe printed %q", out)
		}
		v[i] = x
	}
	return v[0], v[1], v[2]
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// pageCache is what reading every file of a container's root in B did,
// with each snapshotter.
type pageCache struct {
	daxRead, daxCgroup, daxCached int64
	ovlRead, ovlCgroup, ovlCached int64
}

func (p pageCache) String() string {
	return fmt.Sprintf("guest B, reading every file of a container's root:\n"+
		"  daxfs:     %6.1f MiB read, container cgroup file pages %+7.1f MiB, guest Cached %+7.1f MiB\n"+
		"  overlayfs: %6.1f MiB read, container cgroup file pages %+7.1f MiB, guest Cached %+7.1f MiB",
		mib(p.daxRead), mib(p.daxCgroup), mib(p.daxCached), mib(p.ovlRead), mib(p.ovlCgroup), mib(p.ovlCached))
}

// measurePageCache pulls the image into B's overlayfs snapshotter too and
// measures pageCacheGrowth with both snapshotters.
func measurePageCache(tb testing.TB, g *twoGuests) pageCache {
	b := g.b
	b.ctr(tb, "image", "pull", "--plain-http", "--snapshotter", "overlayfs", g.ref)
	var p pageCache
	p.daxRead, p.daxCgroup, p.daxCached = pageCacheGrowth(tb, b, g.ref, "daxfs", "pc-daxfs")
	p.ovlRead, p.ovlCgroup, p.ovlCached = pageCacheGrowth(tb, b, g.ref, "overlayfs", "pc-overlayfs")
	return p
}

// testPageCache: in B, reading every file of a daxfs root grows the page
// cache by almost nothing; the same read of an overlayfs root grows it by
// about the bytes read.
func testPageCache(t testing.TB, g *twoGuests) {
	p := measurePageCache(t, g)
	t.Log(p)
	if p.daxRead < bigFiles*bigFileLen || p.ovlRead != p.daxRead {
		t.Fatalf("read %d bytes of the daxfs root and %d of the overlayfs root, want the same, at least %d", p.daxRead, p.ovlRead, bigFiles*bigFileLen)
	}
	if p.daxCgroup > p.daxRead/20 {
		t.Errorf("daxfs: the container's page cache grew by %d bytes reading %d: the view is not read from the shared memory directly", p.daxCgroup, p.daxRead)
	}
	if p.ovlCgroup < p.ovlRead/2 {
		t.Errorf("overlayfs: the container's page cache grew by only %d bytes reading %d: the measurement does not see page cache", p.ovlCgroup, p.ovlRead)
	}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// reader starts a container in n that reads files of the image in a
// loop, counting rounds in /run/readers/<id>/n and failed rounds in
// .../fail of the guest (a bind mount: reading them costs no exec in the
// container).
func reader(t testing.TB, n *node, ref, id string) {
	t.Helper()
	n.sh(t, "mkdir -p /run/readers/"+id)
	// A pause between rounds leaves the guest's one CPU to the rest.
	script := `i=0; while :; do cat /big/2 /data/keep /links/hard >/dev/null || echo $i >> /out/fail; i=$((i+1)); echo $i > /out/n.new; mv /out/n.new /out/n; sleep 0.5; done`
	n.ctr(t, "run", "-d", "--snapshotter", "daxfs", "--mount", "type=bind,src=/run/readers/"+id+",dst=/out,options=rbind:rw",
		ref, id, "sh", "-c", shellQuote(script))
}

// rounds returns the reader's round count and failed rounds.
func rounds(t testing.TB, n *node, id string) (int, string) {
	t.Helper()
	out := n.sh(t, `echo "n=$(cat /run/readers/`+id+`/n 2>/dev/null)"; echo "fail=$(cat /run/readers/`+id+`/fail 2>/dev/null | tr "\n" " ")"`)
	var k int
	var fails string
	for line := range strings.SplitSeq(out, "\n") {
		if v, ok := strings.CutPrefix(line, "n="); ok && v != "" {
			var err error
			if k, err = strconv.Atoi(v); err != nil {
				t.Fatalf("reader %s in %s: %q", id, n.Name, out)
			}
		}
		if v, ok := strings.CutPrefix(line, "fail="); ok {
			fails = strings.TrimSpace(v)
		}
	}
	return k, fails
}

// waitRounds waits until reader id has made progress past k.
func waitRounds(t testing.TB, n *node, id string, k int) int {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for {
		got, fails := rounds(t, n, id)
		if fails != "" {
			t.Fatalf("reader %s in %s failed reads in rounds %q", id, n.Name, fails)
		}
		if got > k {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("reader %s in %s made no progress past round %d in 2 minutes", id, n.Name, k)
		}
		time.Sleep(time.Second)
	}
}

// noneMountedAnew fails unless every view mounted in n is one of before,
// the same mount (mount ID, target and options).
func noneMountedAnew(t testing.TB, n *node, before []daxfsMount, who string) {
	t.Helper()
	for _, m := range viewMounts(t, n) {
		if !slices.ContainsFunc(before, func(o daxfsMount) bool { return fmt.Sprint(o) == fmt.Sprint(m) }) {
			t.Fatalf("%s mounted view %v anew; before the restart: %v", who, m, before)
		}
	}
}

func stopContainer(t testing.TB, n *node, id string) {
	t.Helper()
	n.ctr(t, "task", "kill", "-s", "SIGKILL", id)
	n.sh(t, "i=0; while ctr --address "+ctrdSocket+" -n "+namespace+" task ls | grep -q '^"+id+" .*RUNNING'; do sleep 0.5; i=$((i+1)); [ $i -lt 60 ]; done")
	n.ctr(t, "task", "delete", id)
	n.ctr(t, "container", "delete", id)
}

// testKillDaemonInA: while containers in A and B read, A's daemon is
// SIGKILLed and restarted. Neither reader sees an error; the restarted
// daemon adopts its daxfs mounts (none added, none lost) and a new
// container in A runs on them.
func testKillDaemonInA(t testing.TB, g *twoGuests) {
	a, b := g.a, g.b
	reader(t, a, g.ref, "areader")
	reader(t, b, g.ref, "breader")
	ka, kb := waitRounds(t, a, "areader", 0), waitRounds(t, b, "breader", 0)
	before := viewMounts(t, a)

	ka0, kb0 := ka, kb
	killed := time.Now()
	a.sh(t, fmt.Sprintf("kill -KILL %d; i=0; while kill -0 %d 2>/dev/null; do sleep 0.1; i=$((i+1)); [ $i -lt 100 ]; done", a.daxfsPID, a.daxfsPID))
	if _, _, ok := a.try(t, "[ -S "+daxfsSocket+" ] && busybox wget -qO /dev/null http://"+metricsAddr+"/metrics"); ok {
		t.Fatal("A's daemon still serves after SIGKILL")
	}
	// Both go on reading while A's daemon is down.
	ka, kb = waitRounds(t, a, "areader", ka), waitRounds(t, b, "breader", kb)
	logBefore := len(a.daemonLog(t))
	a.startDaxfs(t)
	a.waitContainerdReaches(t)
	down := time.Since(killed)
	restartLog := a.daemonLog(t)[logBefore:]
	// The same mounts (mount IDs and all): adopted, not made again. A
	// view kept only warm (that of an intermediate layer, warmed while
	// TCG's slow unpack had not yet prepared the next layer) has no user
	// once adopted, and the first cleanup after the restart, which the
	// probe's removal starts, may take it off; the readers' view has
	// users and stays (they go on reading below).
	noneMountedAnew(t, a, before, "the restarted daemon")
	for _, m := range before {
		adopted := slices.ContainsFunc(strings.Split(restartLog, "\n"), func(l string) bool {
			return strings.Contains(l, "adopted mounted view") && strings.Contains(l, filepath.Base(m.Target))
		})
		if !adopted {
			t.Fatalf("the restarted daemon did not log adopting view %s:\n%s", filepath.Base(m.Target), restartLog)
		}
	}
	want := "keep\n"
	if out := a.ctr(t, "run", "--rm", "--snapshotter", "daxfs", g.ref, "a2", "cat", "/data/keep"); out != want {
		t.Fatalf("container in A after the restart printed %q", out)
	}
	noneMountedAnew(t, a, before, "a container after the restart")
	ka, kb = waitRounds(t, a, "areader", ka), waitRounds(t, b, "breader", kb)
	t.Logf("A's daemon SIGKILLed and back serving in %s, its %d views adopted; readers without a failed read: in A rounds %d to %d, in B %d to %d",
		down.Round(100*time.Millisecond), len(before), ka0, ka, kb0, kb)
	stopContainer(t, a, "areader")
	stopContainer(t, b, "breader")
}

// regionEntries lists the region's entries as `region ls --json` in n
// shows them.
type regionEntry struct {
	State, Kind, Key string
	Offset           int64
	Refs             []int
}

func regionEntries(t testing.TB, n *node) []regionEntry {
	t.Helper()
	out := n.sh(t, "containerd-daxfs-grpc region ls --backend devdax --path "+devDAX+" --json")
	var es []regionEntry
	if err := json.Unmarshal([]byte(out), &es); err != nil {
		t.Fatalf("region ls in %s: %v\n%s", n.Name, err, out)
	}
	return es
}

// participantID returns the region participant slot of n's daemon.
func participantID(t testing.TB, n *node) int {
	t.Helper()
	out := n.sh(t, "containerd-daxfs-grpc region status --backend devdax --path "+devDAX+" --json")
	var st struct {
		Participants []struct {
			ID    int    `json:"id"`
			Host  string `json:"host"`
			Alive bool   `json:"alive"`
			State string `json:"state"`
		} `json:"participants"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("region status in %s: %v\n%s", n.Name, err, out)
	}
	for _, p := range st.Participants {
		if p.Host == n.Name && p.Alive {
			return p.ID
		}
	}
	t.Fatalf("no live participant of host %s in:\n%s", n.Name, out)
	return -1
}

// layerEntries returns the region's layer entries of the image.
func layerEntries(t testing.TB, n *node, built *testimage.Built) []regionEntry {
	t.Helper()
	keys := map[string]bool{}
	for _, d := range built.DiffIDs {
		k, err := daxmem.KeyFromDigest(d.String())
		if err != nil {
			t.Fatal(err)
		}
		keys[k.String()] = true
	}
	var out []regionEntry
	for _, e := range regionEntries(t, n) {
		if e.Kind == "layer" && keys[e.Key] {
			out = append(out, e)
		}
	}
	return out
}

// removeImage removes every container and the image from n's containerd
// and waits for its garbage collection (the snapshots go, and with them
// the daemon's region references).
func removeImage(t testing.TB, n *node, ref string) {
	t.Helper()
	n.ctr(t, "image", "rm", "--sync", ref)
	// ls prints a header line, then one line per snapshot.
	n.sh(t, `i=0; while [ "$(ctr --address `+ctrdSocket+` -n `+namespace+` snapshots --snapshotter daxfs ls | wc -l)" -gt 1 ]; do sleep 0.5; i=$((i+1)); [ $i -lt 120 ]; done`)
}

// testGCAcrossKernels: A removes the image and collects garbage: the
// region keeps the layers, which B still references. B removes it too,
// and a collection (run in A) frees them.
func testGCAcrossKernels(t testing.TB, g *twoGuests) {
	a, b := g.a, g.b
	idB := participantID(t, b)
	if es := layerEntries(t, a, g.built); len(es) != len(g.built.DiffIDs) {
		t.Fatalf("before removal the region lists %d of the image's %d layers: %v", len(es), len(g.built.DiffIDs), es)
	}
	removeImage(t, a, g.ref)
	a.sh(t, "containerd-daxfs-grpc region gc --backend devdax --path "+devDAX)
	es := layerEntries(t, a, g.built)
	if len(es) != len(g.built.DiffIDs) {
		t.Fatalf("after A removed the image and collected, the region lists %d of %d layers B still uses: %v", len(es), len(g.built.DiffIDs), es)
	}
	for _, e := range es {
		if e.State != "READY" || !slices.Equal(e.Refs, []int{idB}) {
			t.Fatalf("layer %s after A's removal: %s refs %v, want READY referenced by B (%d) only", e.Key, e.State, e.Refs, idB)
		}
	}
	want := "keep\n"
	if out := b.ctr(t, "run", "--rm", "--snapshotter", "daxfs", g.ref, "b2", "cat", "/data/keep"); out != want {
		t.Fatalf("container in B after A's collection printed %q", out)
	}
	removeImage(t, b, g.ref)
	a.sh(t, "containerd-daxfs-grpc region gc --backend devdax --path "+devDAX)
	if es := layerEntries(t, b, g.built); len(es) != 0 {
		t.Fatalf("after both removed the image and A collected, the region still lists its layers: %v", es)
	}
	// Nor anything else of it: views (taken off by each daemon's cleanup
	// once the image's snapshots are gone) and aliases.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		a.sh(t, "containerd-daxfs-grpc region gc --backend devdax --path "+devDAX)
		es := regionEntries(t, a)
		if len(es) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("2 minutes after both removed the image the region still holds %v", es)
		}
		time.Sleep(2 * time.Second)
	}
}

// TestOneGuest boots one guest on a region made on a file with 4 KiB
// alignment, its memory also mapped as persistent memory, and checks what
// device DAX and the daxfs module do with it, then the route for kernels
// without the module.
func TestOneGuest(t *testing.T) {
	requireGuests(t)
	reg := testenv.StartRegistry(t)
	c := newCluster(t, sharedSize)
	c.pmemAlias = true
	regionInit(t, c.shared.Path, "--size", strconv.Itoa(stockRegionSize>>20)+"M")
	// The memory is larger than the region: the rest holds test images.
	if err := os.Truncate(c.shared.Path, sharedSize); err != nil {
		t.Fatal(err)
	}
	n := c.boot(t, reg, "c")[0]
	if !t.Run("Alignment", func(t *testing.T) { testAlignment(t, c, n) }) {
		return
	}
	t.Run("ModuleExec", func(t *testing.T) { testModuleExec(t, c, n) })
	t.Run("StockKernelEROFSDAX", func(t *testing.T) { testStockKernel(t, reg, n) })
}

// testAlignment: a region made on a file without --align is refused by
// the device DAX backend, saying what to do; the same region made with
// `region init --align 2M` and put on the device is accepted, with the
// device's physical address.
func testAlignment(t *testing.T, c *cluster, n *node) {
	status := "containerd-daxfs-grpc region status --backend devdax --path " + devDAX
	_, stderr, ok := n.try(t, status)
	if ok {
		t.Fatal("device DAX accepted a region made on a file with 4 KiB alignment")
	}
	for _, w := range []string{"made with 4K alignment", "region init --align 2M", `region.align = "2MiB"`} {
		if !strings.Contains(stderr, w) {
			t.Fatalf("the refusal does not say %q:\n%s", w, stderr)
		}
	}
	// The daemon refuses it the same way.
	if err := os.WriteFile(filepath.Join(n.share, "daxfs.toml"), []byte(daxfsConfig), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, stderr, ok := n.try(t, "timeout 120 containerd-daxfs-grpc --config /kit/c/daxfs.toml"); ok || !strings.Contains(stderr, "region init --align 2M") {
		t.Fatalf("the daemon started on the 4 KiB aligned region (%v) or did not say why:\n%s", ok, stderr)
	}

	// Made again with --align 2M in a file, and put in place as its
	// metadata pages: accepted.
	aligned := filepath.Join(t.TempDir(), "aligned")
	regionInit(t, aligned, "--align", "2M", "--size", strconv.Itoa(stockRegionSize>>20)+"M")
	r, err := daxmem.Open(t.Context(), daxmem.Options{Path: aligned, NoCreate: true})
	if err != nil {
		t.Fatal(err)
	}
	meta := r.DataOffset()
	r.Close()
	copyAt(t, aligned, 0, meta, c.shared.Path, 0)
	out := n.sh(t, status+" --json")
	var st struct {
		Align    int64   `json:"align"`
		PhysAddr *uint64 `json:"phys_addr"`
		Size     int64   `json:"size"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatal(err)
	}
	if st.Align != 2<<20 || st.PhysAddr == nil || *st.PhysAddr != guest.SharedBase || st.Size != stockRegionSize {
		t.Fatalf("region status on the device: %s", out)
	}
}

// testModuleExec shows why the kit patches the daxfs module: as
// published, a static mount refuses private writable mappings, so a
// program on it cannot be executed (exec maps the data segment that way
// and the process dies of SIGSEGV); with the kit's fix it runs, and a
// write to its private mapping leaves the image unchanged.
func testModuleExec(t *testing.T, c *cluster, n *node) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "src"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := linkOrCopy(testimage.BusyboxPath, filepath.Join(dir, "src", "busybox")); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "image.daxfs")
	if out, err := hostCLI(t, "mkfs", filepath.Join(dir, "src"), img); err != nil {
		t.Fatalf("mkfs: %v\n%s", err, out)
	}
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	// In the shared memory past the region: the guest sees it at that
	// physical address.
	const off = stockRegionSize
	copyAt(t, img, 0, fi.Size(), c.shared.Path, off)
	mount := fmt.Sprintf("mkdir -p /mnt/img && mount -t daxfs -o ro,phys=%#x,size=%d none /mnt/img", guest.SharedBase+off, fi.Size())

	out, _, _ := n.try(t, "umount /mnt/img 2>/dev/null; rmmod daxfs && insmod /lib/modules/$(uname -r)/daxfs-upstream.ko && "+mount+
		" && guest-agent mmapcheck /mnt/img/busybox; /mnt/img/busybox echo ran; echo exit=$?")
	if !strings.Contains(out, "private writable mapping of /mnt/img/busybox: permission denied") || !strings.Contains(out, "exit=139") || strings.Contains(out, "ran\n") {
		t.Fatalf("the published module was expected to refuse a private writable mapping and kill exec with SIGSEGV:\n%s", out)
	}
	t.Logf("published module: %s", strings.TrimSpace(out))
	out = n.sh(t, "umount /mnt/img && rmmod daxfs && modprobe daxfs && "+mount+" && guest-agent mmapcheck /mnt/img/busybox && /mnt/img/busybox echo ran")
	if !strings.Contains(out, "private writable mapping of /mnt/img/busybox: ok, copy on write") || !strings.HasSuffix(out, "ran\n") {
		t.Fatalf("with the kit's module:\n%s", out)
	}
	n.sh(t, "umount /mnt/img")
}

// copyAt writes n bytes of src from srcOff over dst at dstOff, in place
// (dst is mapped by running guests: never truncated or replaced).
func copyAt(t testing.TB, src string, srcOff, n int64, dst string, dstOff int64) {
	t.Helper()
	b := make([]byte, n)
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	if _, err := in.ReadAt(b, srcOff); err != nil {
		t.Fatal(err)
	}
	out, err := os.OpenFile(dst, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := out.WriteAt(b, dstOff); err != nil {
		t.Fatal(err)
	}
}

// stockRegionSize is the region of TestOneGuest: the rest of the shared
// memory holds the image of testModuleExec.
const stockRegionSize = sharedSize - 128<<20

// testStockKernel: the route for kernels without the daxfs module. The
// same memory as the region, mapped as persistent memory (a raw pmem
// namespace: a DAX-capable block device), is the daemon's
// mount.dax_device: auto mode then mounts each view with the kernel's own
// erofs and dax=always, over a device-mapper device that puts the view's
// EROFS metadata (published in the region) in front of the region.
// Containers run from it; reading a whole root adds nothing to the page
// cache, where the product's other mounter for device DAX on such a
// kernel, FUSE (loop devices, which the erofs mounter needs, take no
// character device), adds the bytes read.
func testStockKernel(t *testing.T, reg string, n *node) {
	built := guestImage(t)
	pushImage(t, reg, "guest/layered", "v1", built)
	ref := registryInGuest + "/guest/layered:v1"
	// The legacy persistent memory range (memmap=SIZE!BASE) becomes a raw
	// pmem namespace, DAX capable; its number depends on the regions the
	// kernel registered before it.
	// The daxfs module as published is loaded: auto mode must find out
	// that programs on its mounts cannot run (testModuleExec) and mount
	// with erofs dax=always instead.
	pmem := strings.TrimSpace(n.sh(t, `rmmod daxfs && insmod /lib/modules/$(uname -r)/daxfs-upstream.ko
modprobe -a nd_e820 nd_pmem dm_mod
i=0; while ! ls /dev/pmem* >/dev/null 2>&1 && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
for p in /dev/pmem*; do [ "$(blockdev --getsize64 $p)" = `+strconv.Itoa(sharedSize)+` ] && echo $p; done; true`))
	if !strings.HasPrefix(pmem, "/dev/pmem") || strings.Contains(pmem, "\n") {
		t.Fatalf("want one pmem device of %d bytes over the shared memory, found %q", sharedSize, pmem)
	}
	// The region of the earlier subtests is valid and 2 MiB aligned.
	n.daxfsConfig = daxfsConfig + "dax_device = \"" + pmem + "\"\n"
	n.startProduct(t)
	n.ctr(t, "image", "pull", "--plain-http", "--snapshotter", "daxfs", ref)
	daxRead, daxCgroup, daxCached := pageCacheGrowth(t, n, ref, "daxfs", "pc-erofs-dax")

	top := topView(t, n)
	out := n.sh(t, "grep ' "+top+" ' /proc/mounts")
	if f := strings.Fields(out); len(f) < 4 || f[2] != "erofs" || !strings.HasPrefix(f[0], "/dev/mapper/daxfs-erofs-") || !strings.Contains(f[3], "dax=always") {
		t.Fatalf("the daemon did not mount the image's view with erofs dax=always over its device-mapper device: %q", out)
	}
	want := "keep\nnew\n" + sha(bigData(3)) + "  /big/3\n"
	if got := n.ctr(t, "run", "--rm", "--snapshotter", "daxfs", ref, "stock1", "sh", "-c", "'cat /data/keep /data/replaced; sha256sum /big/3'"); got != want {
		t.Fatalf("container printed %q, want %q", got, want)
	}
	if l := n.daemonLog(t); !strings.Contains(l, "not mounting with the daxfs module") || !strings.Contains(l, "refuses private writable mappings") {
		t.Fatalf("the daemon did not say why it left the published daxfs module alone:\n%s", l)
	}
	if out := n.sh(t, "grep -c ' daxfs ' /proc/mounts || true"); strings.TrimSpace(out) != "0" {
		t.Fatalf("the published daxfs module still has mounts: %s", out)
	}

	// The same view served by the product's FUSE mounter, read the same
	// way through an overlay.
	var off int64 = -1
	for _, e := range regionEntries(t, n) {
		if e.Kind == "view" && e.Key == "sha256:"+filepath.Base(top) {
			off = e.Offset
		}
	}
	if off < 0 {
		t.Fatalf("view %s is not in the region", filepath.Base(top))
	}
	length := stockRegionSize - off
	res := strings.Fields(n.sh(t, fmt.Sprintf(`mkdir -p /mnt/fuse /tmp/ovl/u /tmp/ovl/w /tmp/ovl/m
containerd-daxfs-grpc mount --mode fuse --state /run/stock-fuse --offset %d --length %d `+devDAX+` /mnt/fuse
mount -t overlay ovl -o lowerdir=/mnt/fuse,upperdir=/tmp/ovl/u,workdir=/tmp/ovl/w /tmp/ovl/m
sync; echo 3 > /proc/sys/vm/drop_caches
cached() { awk '$1 == "Cached:" {print $2 * 1024}' /proc/meminfo; }
c0=$(cached)
r=$(chroot /tmp/ovl/m /bin/sh -c 'find `+imageDirs+` -type f -exec cat {} + | wc -c')
c1=$(cached)
umount /tmp/ovl/m
containerd-daxfs-grpc umount --state /run/stock-fuse /mnt/fuse
echo $r $((c1 - c0))`, off, length)))
	if len(res) != 2 {
		t.Fatalf("measurement printed %v", res)
	}
	fuseRead, _ := strconv.ParseInt(res[0], 10, 64)
	fuseCached, _ := strconv.ParseInt(res[1], 10, 64)
	t.Logf("stock kernel (no usable daxfs module), reading every file of the image's root:\n"+
		"  erofs dax=always over pmem (mount.dax_device): %5.1f MiB read, container's cgroup file pages %+6.1f MiB, guest Cached %+6.1f MiB\n"+
		"  FUSE on device DAX (without it):              %5.1f MiB read,                                          guest Cached %+6.1f MiB",
		mib(daxRead), mib(daxCgroup), mib(daxCached), mib(fuseRead), mib(fuseCached))
	if daxRead != fuseRead || daxRead < bigFiles*bigFileLen {
		t.Fatalf("read %d bytes through erofs dax=always and %d through FUSE, want the same, at least %d", daxRead, fuseRead, bigFiles*bigFileLen)
	}
	if fuseCached < fuseRead/2 {
		t.Errorf("FUSE added only %d bytes of page cache reading %d: the measurement does not see page cache", fuseCached, fuseRead)
	}
	// The container's own cgroup: the guest-wide figure moves with
	// whatever else the guest writes meanwhile (logs).
	if daxCgroup > daxRead/20 {
		t.Errorf("erofs with dax=always added %d bytes of page cache to the container's cgroup reading %d", daxCgroup, daxRead)
	}

	// A restarted daemon adopts the mounts and their metadata images.
	n.sh(t, fmt.Sprintf("kill -TERM %d; i=0; while kill -0 %d 2>/dev/null; do sleep 0.1; i=$((i+1)); [ $i -lt 300 ]; done", n.daxfsPID, n.daxfsPID))
	logBefore := len(n.daemonLog(t))
	n.startDaxfs(t)
	n.waitContainerdReaches(t)
	if l := n.daemonLog(t)[logBefore:]; !strings.Contains(l, "adopted mounted view") || !strings.Contains(l, filepath.Base(top)) {
		t.Fatalf("the restarted daemon did not adopt the erofs dax=always view %s:\n%s", top, l)
	}
	if got := n.ctr(t, "run", "--rm", "--snapshotter", "daxfs", ref, "stock2", "sh", "-c", "'cat /data/keep /data/replaced; sha256sum /big/3'"); got != want {
		t.Fatalf("container after the restart printed %q, want %q", got, want)
	}

	// Removing the image takes the views off, with their device-mapper
	// devices and this participant's references to their metadata
	// images: a collection then frees every entry of the region.
	removeImage(t, n, ref)
	if _, out, ok := n.try(t, `i=0; while dmsetup ls | grep -q `+"daxfs-erofs-"+`; do sleep 0.5; i=$((i+1)); [ $i -lt 240 ] || { dmsetup ls >&2; exit 1; }; done`); !ok {
		t.Fatalf("the erofs-dax device-mapper devices outlived the image's views:\n%s", out)
	}
	n.sh(t, "containerd-daxfs-grpc region gc --backend devdax --path "+devDAX)
	if es := regionEntries(t, n); len(es) != 0 {
		t.Fatalf("after the image was removed and collected the region still holds %v", es)
	}
}
