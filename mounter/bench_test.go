package mounter

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

const benchFileSize = 512 << 20

// BenchmarkOverlayLower compares, in one run and on the same tree (the
// Debian rootfs plus a 512 MiB file), an overlay whose lower is that tree
// on the local disk with overlays whose lower is the tree's DAXFS image
// (in /dev/shm, as the region is) mounted by each mounter that works here:
// erofs (the default without the daxfs module) and FUSE (fuse-serve).
// It measures sequential reads of the large file and a metadata walk
// (find -printf of every path's stat), each cold (after dropping caches)
// and warm. Run with
//
//	go test -run '^$' -bench OverlayLower -benchtime 5x ./mounter
//
// It prints a table with the ratios to the disk.
func BenchmarkOverlayLower(b *testing.B) {
	testenv.RequireRoot(b)
	base := testenv.DebianRootfs(b)
	t := &testing.T{}
	_ = t
	work, err := os.MkdirTemp("/var/tmp", "daxfs-bench-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(work)
	tree := filepath.Join(work, "tree")
	if out, err := exec.Command("cp", "-a", base, tree).CombinedOutput(); err != nil {
		b.Fatalf("copy rootfs: %v: %s", err, out)
	}
	big := filepath.Join(tree, "bigfile")
	f, err := os.Create(big)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.CopyN(f, rand.Reader, benchFileSize); err != nil {
		b.Fatal(err)
	}
	f.Close()
	shm, err := os.MkdirTemp("/dev/shm", "daxfs-bench-")
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(shm)
	img := filepath.Join(shm, "image.daxfs")
	start := time.Now()
	if err := mtest.ImageFromDir(tree, img); err != nil {
		b.Fatal(err)
	}
	b.Logf("image of %s built in %v", tree, time.Since(start).Round(time.Millisecond))

	b.Setenv(roleEnv, "1")
	state, _ := os.MkdirTemp("", "mounter-bench-")
	defer os.RemoveAll(state)
	exe, _ := os.Executable()
	ctx := context.Background()
	fo := FUSEOptions{StateDir: state, Binary: exe}
	defer fusesrv.NewClient(state, nil).Quit(context.Background())
	lowers := map[string]string{}
	for _, kind := range []string{"erofs", "fuse"} {
		m, err := New(ctx, kind, fo)
		if err != nil {
			b.Fatalf("%s mounter: %v", kind, err)
		}
		mnt := filepath.Join(work, kind+"-lower")
		os.Mkdir(mnt, 0o755)
		if err := m.Mount(ctx, Source{Path: img}, mnt); err != nil {
			b.Fatal(err)
		}
		defer m.Unmount(context.Background(), mnt)
		lowers[kind] = mnt
	}

	overlay := func(name, lower string) string {
		d := filepath.Join(work, name)
		for _, s := range []string{"upper", "work", "merged"} {
			os.MkdirAll(filepath.Join(d, s), 0o755)
		}
		merged := filepath.Join(d, "merged")
		opts := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", lower, d, d)
		if err := unix.Mount("overlay", merged, "overlay", 0, opts); err != nil {
			b.Fatal(err)
		}
		return merged
	}
	kinds := []string{"disk", "erofs", "fuse"}
	roots := map[string]string{"disk": overlay("ovl-disk", tree), "erofs": overlay("ovl-erofs", lowers["erofs"]), "fuse": overlay("ovl-fuse", lowers["fuse"])}
	defer func() {
		for _, r := range roots {
			unix.Unmount(r, 0)
		}
	}()

	dropCaches := func(b *testing.B) {
		unix.Sync()
		if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0o200); err != nil {
			b.Fatal(err)
		}
	}
	readAll := func(b *testing.B, p string) {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		buf := make([]byte, 1<<20)
		n := 0
		for {
			k, err := f.Read(buf)
			n += k
			if err == io.EOF {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
		}
		if n != benchFileSize {
			b.Fatalf("read %d bytes", n)
		}
	}
	var paths int
	walk := func(b *testing.B, root string) {
		out, err := exec.Command("find", root, "-printf", "%p %y %m %U %G %s %T@ %n\n").Output()
		if err != nil {
			b.Fatalf("find: %v", err)
		}
		paths = strings.Count(string(out), "\n")
	}
	results := map[string]float64{}
	for _, op := range []string{"read-cold", "read-warm", "walk-cold", "walk-warm"} {
		for _, kind := range kinds {
			root := roots[kind]
			b.Run(op+"/"+kind, func(b *testing.B) {
				cold := strings.HasSuffix(op, "cold")
				isRead := strings.HasPrefix(op, "read")
				do := func() {
					if isRead {
						readAll(b, filepath.Join(root, "bigfile"))
					} else {
						walk(b, root)
					}
				}
				if !cold {
					do() // warm up
				}
				var total time.Duration
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if cold {
						b.StopTimer()
						dropCaches(b)
						b.StartTimer()
					}
					s := time.Now()
					do()
					total += time.Since(s)
				}
				ns := float64(total.Nanoseconds()) / float64(b.N)
				results[op+"/"+kind] = ns
				if isRead {
					b.ReportMetric(float64(benchFileSize)/(ns/1e9)/(1<<20), "MiB/s")
				} else {
					b.ReportMetric(float64(paths)/(ns/1e9), "paths/s")
				}
			})
		}
	}
	var sb strings.Builder
	fmt.Fprintf(&sb, "\n%-10s %-7s %16s %8s %8s\n", "op", "lower", "throughput", "ratio", "target")
	targets := map[string]string{"read-cold": ">=0.5", "read-warm": ">=0.9", "walk-cold": "-", "walk-warm": ">=0.8"}
	for _, op := range []string{"read-cold", "read-warm", "walk-cold", "walk-warm"} {
		d := results[op+"/disk"]
		unit, scale := "MiB/s", float64(benchFileSize)/(1<<20)
		if strings.HasPrefix(op, "walk") {
			unit, scale = "paths/s", float64(paths)
		}
		for _, kind := range kinds {
			x := results[op+"/"+kind]
			if d == 0 || x == 0 {
				continue
			}
			ratio, target := fmt.Sprintf("%.2f", d/x), targets[op]
			if kind == "disk" {
				ratio, target = "1", ""
			}
			fmt.Fprintf(&sb, "%-10s %-7s %8.0f %-7s %8s %8s\n", op, kind, scale/(x/1e9), unit, ratio, target)
		}
	}
	fmt.Fprintf(&sb, "(ratio = throughput / disk throughput; lowers: the tree on the local disk, its DAXFS image mounted with erofs and with FUSE; %d paths walked; %d MiB file)\n", paths, benchFileSize>>20)
	b.Log(sb.String())
	fmt.Print(sb.String())
}
