package snapshotter

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics counts what the snapshotter did since it started. Every field is
// safe for concurrent use. It is a prometheus.Collector of its counters.
type Metrics struct {
	// LayersConverted counts layer images our differ or a commit wrote.
	LayersConverted atomic.Int64
	// LayersApplied counts those our differ streamed from a blob (the
	// normal pull path; the rest came from an upper directory).
	LayersApplied atomic.Int64
	// LayersShared counts the layers our differ streamed whose image was
	// in the region already under another diffID (a tar layer and its
	// pre-converted form): stored once.
	LayersShared atomic.Int64
	// LayerBytes counts the bytes of those images.
	LayerBytes atomic.Int64
	// ConvertNanos is the time spent converting layers.
	ConvertNanos atomic.Int64
	// ConvertFailures counts conversions that ended in an error.
	ConvertFailures atomic.Int64
	// RegionHits counts extraction snapshots staged from the region:
	// layers neither downloaded nor converted.
	RegionHits atomic.Int64
	// ViewsBuilt counts views this participant wrote; ViewsMounted the
	// mounts it made.
	ViewsBuilt     atomic.Int64
	ViewsMounted   atomic.Int64
	ViewsUnmounted atomic.Int64
	// ViewsWarmed counts views mounted ahead of their first container.
	ViewsWarmed atomic.Int64
	// BlobsLocal counts layer blobs the differ read from containerd's
	// content store files; BlobsRemote those read through its API.
	BlobsLocal  atomic.Int64
	BlobsRemote atomic.Int64
}

// Metrics returns the snapshotter's counters.
func (s *Snapshotter) Metrics() *Metrics { return &s.metrics }

func (m *Metrics) converted(bytes int64, d time.Duration, err error) {
	if err != nil {
		m.ConvertFailures.Add(1)
		return
	}
	m.LayersConverted.Add(1)
	m.LayerBytes.Add(bytes)
	m.ConvertNanos.Add(int64(d))
}

// counters lists the Prometheus counters Collect exports, by name: the
// names are an interface (dashboards and the tests scrape them).
func (m *Metrics) counters() []counter {
	return []counter{
		{"daxfs_layers_converted_total", "Layer images converted by this participant.", &m.LayersConverted, 1},
		{"daxfs_layers_applied_total", "Layer blobs our differ streamed into the region.", &m.LayersApplied, 1},
		{"daxfs_layers_shared_total", "Layer blobs our differ streamed whose image the region held under another diffID: stored once.", &m.LayersShared, 1},
		{"daxfs_layer_bytes_total", "Bytes of layer images converted by this participant.", &m.LayerBytes, 1},
		{"daxfs_convert_seconds_total", "Time spent converting layers.", &m.ConvertNanos, 1 / float64(time.Second)},
		{"daxfs_convert_failures_total", "Layer conversions that failed.", &m.ConvertFailures, 1},
		{"daxfs_region_hits_total", "Layers found in the region at unpack: nothing downloaded or converted.", &m.RegionHits, 1},
		{"daxfs_views_built_total", "Views written by this participant.", &m.ViewsBuilt, 1},
		{"daxfs_views_mounted_total", "View mounts made by this participant.", &m.ViewsMounted, 1},
		{"daxfs_blobs_local_total", "Layer blobs read from the files of containerd's content store.", &m.BlobsLocal, 1},
		{"daxfs_blobs_remote_total", "Layer blobs read through containerd's content API.", &m.BlobsRemote, 1},
		{"daxfs_views_warmed_total", "Views mounted ahead of their first container, after an unpack.", &m.ViewsWarmed, 1},
		{"daxfs_views_unmounted_total", "Views unmounted by Cleanup once no snapshot used them.", &m.ViewsUnmounted, 1},
	}
}

// counter is one exported counter: a field of Metrics, scaled.
type counter struct {
	name, help string
	v          *atomic.Int64
	scale      float64
}

func (c counter) desc() *prometheus.Desc { return prometheus.NewDesc(c.name, c.help, nil, nil) }

// Describe implements prometheus.Collector.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.counters() {
		ch <- c.desc()
	}
}

// Collect implements prometheus.Collector: the counters as they are now.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.counters() {
		ch <- prometheus.MustNewConstMetric(c.desc(), prometheus.CounterValue, float64(c.v.Load())*c.scale)
	}
}
