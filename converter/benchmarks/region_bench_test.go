package benchmarks

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/converter/gunzip"
	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// BenchmarkLayerIntoRegion: what our differ does with a layer blob, on
// the gzip compressed Debian rootfs: convert it into a fresh extent of a
// file-backed region in /dev/shm, then validate and publish it. It
// compares writing the image through the region file (pwrite, the
// differ's way on file backends) with storing through the mapping after
// reserving each range (the way for device DAX and hugetlbfs). Each
// iteration uses a new region, so every page is new to tmpfs, as for a
// layer pulled for the first time.
//
//	go test -run '^$' -bench LayerIntoRegion -benchtime 5x -v ./converter/benchmarks
func BenchmarkLayerIntoRegion(b *testing.B) {
	work := b.TempDir()
	gzPath := gzipDebianLayer(b, work)
	blobSize := size(b, gzPath)
	warm(b, gzPath)
	ways := []struct {
		name   string
		window func(*daxmem.Claim) *daxfs.Window
	}{
		{"pwrite", func(c *daxmem.Claim) *daxfs.Window { return daxfs.NewFileWindow(c.Bytes(), c.WriterAt(), c.Reserve) }},
		{"mapping", func(c *daxmem.Claim) *daxfs.Window { return daxfs.NewReservingWindow(c.Bytes(), c.Reserve) }},
	}
	type total struct{ convert, publish time.Duration }
	totals := make([]total, len(ways))
	var imageSize int64
	ctx := context.Background()
	for i := 0; i < b.N; i++ {
		// Alternate the ways so that drift in the machine's speed hits
		// both alike.
		for j, way := range ways {
			path := filepath.Join("/dev/shm", fmt.Sprintf("daxfs-bench-region-%d", os.Getpid()))
			os.Remove(path)
			r, err := daxmem.Create(ctx, daxmem.Options{Path: path, Size: 1 << 30, Entries: 16})
			if err != nil {
				b.Fatal(err)
			}
			// A failed iteration must not leave 200 MB in /dev/shm.
			b.Cleanup(func() { r.Close(); os.Remove(path) })
			if _, err := r.Join(ctx, daxmem.ParticipantInfo{Host: "bench", PID: os.Getpid()}, filepath.Join(work, "participant")); err != nil {
				b.Fatal(err)
			}
			c, err := r.Claim(ctx, daxmem.KindLayer, daxmem.Key{1}, blobSize*8, daxmem.ClaimOptions{Deferred: true})
			if err != nil {
				b.Fatal(err)
			}
			blob, err := os.Open(gzPath)
			if err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			res, err := converter.ConvertLayer(ctx, blob, way.window(c), converter.LayerOptions{})
			if err != nil {
				b.Fatal(err)
			}
			converted := time.Now()
			if err := daxfs.Validate(c.Bytes()[:res.Size]); err != nil {
				b.Fatal(err)
			}
			if _, err := c.Publish(ctx, res.Size); err != nil {
				b.Fatal(err)
			}
			totals[j].convert += converted.Sub(start)
			totals[j].publish += time.Since(converted)
			imageSize = res.Size
			blob.Close()
			r.Close()
			os.Remove(path)
		}
	}
	var tab strings.Builder
	fmt.Fprintf(&tab, "\ngzip Debian layer (%.0f MB blob, %.0f MB image, gzip=%s), mean of %d:\n", float64(blobSize)/1e6, float64(imageSize)/1e6, gunzip.Implementation, b.N)
	fmt.Fprintf(&tab, "%-8s %10s %18s %10s\n", "write", "convert", "validate+publish", "total")
	for j, way := range ways {
		n := time.Duration(b.N)
		c, p := totals[j].convert/n, totals[j].publish/n
		fmt.Fprintf(&tab, "%-8s %10s %18s %10s\n", way.name, c.Round(time.Millisecond), p.Round(time.Millisecond), (c + p).Round(time.Millisecond))
		b.ReportMetric(float64(c+p)/1e6, way.name+"-ms")
	}
	b.Log(tab.String())
}
