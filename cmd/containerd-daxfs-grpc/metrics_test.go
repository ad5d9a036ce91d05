package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/snapshotter"
)

// TestMetrics: /metrics serves the snapshotter's counters and the
// region's gauges under the names the README and the end-to-end tests
// use, with their values, beside the Go runtime's and the process's
// metrics, in a text format a Prometheus parser and the tests' own
// scraper (one "name value" per line) both read.
func TestMetrics(t *testing.T) {
	ctx := t.Context()
	region, err := daxmem.Create(ctx, daxmem.Options{Path: filepath.Join(t.TempDir(), "region"), Size: 16 << 20, Entries: 64})
	if err != nil {
		t.Fatal(err)
	}
	defer region.Close()
	if _, err := region.Join(ctx, daxmem.ParticipantInfo{Host: "metrics-test"}, ""); err != nil {
		t.Fatal(err)
	}
	var m snapshotter.Metrics
	m.LayersApplied.Add(3)
	m.ViewsWarmed.Add(2)
	m.ConvertNanos.Add(int64(1500 * time.Millisecond))
	reg, err := metricsRegistry(&m, regionCollector{region})
	if err != nil {
		t.Fatal(err)
	}
	addr, err := serveMetrics(ctx, "127.0.0.1:0", reg)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Get(fmt.Sprintf("http://%s/metrics", addr))
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s %v", resp.Status, err)
	}

	p := expfmt.NewTextParser(model.UTF8Validation)
	families, err := p.TextToMetricFamilies(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v\n%s", err, body)
	}
	value := func(name string) (float64, bool) {
		f, ok := families[name]
		if !ok || len(f.Metric) != 1 {
			return 0, false
		}
		if c := f.Metric[0].Counter; c != nil {
			return c.GetValue(), true
		}
		if g := f.Metric[0].Gauge; g != nil {
			return g.GetValue(), true
		}
		return 0, false
	}
	st := region.Stats()
	for name, want := range map[string]float64{
		"daxfs_layers_converted_total": 0, "daxfs_layers_applied_total": 3, "daxfs_layers_shared_total": 0,
		"daxfs_layer_bytes_total": 0, "daxfs_convert_seconds_total": 1.5, "daxfs_convert_failures_total": 0,
		"daxfs_region_hits_total": 0, "daxfs_views_built_total": 0, "daxfs_views_mounted_total": 0,
		"daxfs_views_unmounted_total": 0, "daxfs_views_warmed_total": 2,
		"daxfs_blobs_local_total": 0, "daxfs_blobs_remote_total": 0,
		"daxfs_region_size_bytes": float64(st.DataSize), "daxfs_region_free_bytes": float64(st.Free),
		"daxfs_region_used_bytes": 0, "daxfs_region_largest_free_bytes": float64(st.LargestFree),
		"daxfs_region_images_ready": 0, "daxfs_region_images_writing": 0, "daxfs_region_index_slots": 64,
		"daxfs_region_participants_alive": 1,
	} {
		if got, ok := value(name); !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", name, got, ok, want)
		}
	}
	for _, name := range []string{"go_goroutines", "go_memstats_alloc_bytes", "process_cpu_seconds_total", "process_resident_memory_bytes"} {
		if _, ok := families[name]; !ok {
			t.Errorf("no %s: the Go and process collectors are missing", name)
		}
	}
	// tests/daemon_test.go scrapes with fmt.Sscanf(line, "%s %g").
	sc := bufio.NewScanner(bytes.NewReader(body))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		var name string
		var v float64
		if _, err := fmt.Sscanf(line, "%s %g", &name, &v); err != nil {
			t.Errorf("line %q does not scan as name and value: %v", line, err)
		}
	}
}
