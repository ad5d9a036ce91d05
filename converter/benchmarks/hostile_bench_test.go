package benchmarks

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
)

// Hostile shapes from the hostile-layers issue: the cost of converting
// them must be linear in entries and path bytes. Each reports entries/s,
// path bytes/s and the heap the conversion held at its peak.

// deepLayer is one file under depth-1 directories named "a", listed by
// its path alone (the directories are implicit).
func deepLayer(tb testing.TB, depth int) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: strings.Repeat("a/", depth-1) + "f", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1, Format: tar.FormatPAX}); err != nil {
		tb.Fatal(err)
	}
	tw.Write([]byte("x"))
	tw.Close()
	return buf.Bytes()
}

// wideLayer is n empty files in one directory.
func wideLayer(tb testing.TB, n int) []byte {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	tw.WriteHeader(&tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755})
	for i := range n {
		if err := tw.WriteHeader(&tar.Header{Name: fmt.Sprintf("d/file-%07d", i), Typeflag: tar.TypeReg, Mode: 0o644}); err != nil {
			tb.Fatal(err)
		}
	}
	tw.Close()
	return buf.Bytes()
}

func benchConvert(b *testing.B, blob []byte, limits converter.Limits, pathBytes int) {
	out, err := os.CreateTemp(b.TempDir(), "img")
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	var best time.Duration = 1 << 62
	var res converter.LayerResult
	var peak uint64
	for i := 0; i < b.N; i++ {
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)
		stop := sampleHeap(&peak)
		start := time.Now()
		res, err = converter.ConvertLayer(context.Background(), bytes.NewReader(blob), out, converter.LayerOptions{Limits: limits})
		d := time.Since(start)
		stop()
		if err != nil {
			b.Fatal(err)
		}
		best = min(best, d)
		peak -= min(peak, before.HeapAlloc)
	}
	b.ReportMetric(float64(best)/1e6, "ms")
	b.ReportMetric(float64(res.Entries)/best.Seconds(), "entries/s")
	b.ReportMetric(float64(pathBytes)/best.Seconds()/1e6, "path-MB/s")
	b.ReportMetric(float64(peak)/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(res.Size)/(1<<20), "image-MiB")
}

// sampleHeap records the largest HeapAlloc seen until stop is called.
func sampleHeap(peak *uint64) (stop func()) {
	*peak = 0
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(5 * time.Millisecond)
		defer t.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			*peak = max(*peak, m.HeapAlloc)
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() { close(done); <-finished }
}

// BenchmarkHostileDeepPath: one entry 100,000 directories deep (200 KB of
// path), with the path limits raised to let it in.
func BenchmarkHostileDeepPath(b *testing.B) {
	const depth = 100_000
	benchConvert(b, deepLayer(b, depth), converter.Limits{MaxDepth: depth, MaxPathLen: 2 * depth}, 2*depth)
}

// BenchmarkHostileWideDir: 1,000,000 entries in one directory (the
// default entry limit is 2,000,000).
func BenchmarkHostileWideDir(b *testing.B) {
	const n = 1_000_000
	benchConvert(b, wideLayer(b, n), converter.Limits{}, n*len("d/file-0000000"))
}
