package snapshotter

import (
	"fmt"
	"io"
	"sync/atomic"
	"time"
)

// Metrics counts what the snapshotter did since it started. Every field is
// safe for concurrent use.
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

// WritePrometheus writes the counters in the Prometheus text format.
func (m *Metrics) WritePrometheus(w io.Writer) error {
	for _, c := range []struct {
		name, help string
		v          float64
	}{
		{"daxfs_layers_converted_total", "Layer images converted by this participant.", float64(m.LayersConverted.Load())},
		{"daxfs_layers_applied_total", "Layer blobs our differ streamed into the region.", float64(m.LayersApplied.Load())},
		{"daxfs_layers_shared_total", "Layer blobs our differ streamed whose image the region held under another diffID: stored once.", float64(m.LayersShared.Load())},
		{"daxfs_layer_bytes_total", "Bytes of layer images converted by this participant.", float64(m.LayerBytes.Load())},
		{"daxfs_convert_seconds_total", "Time spent converting layers.", time.Duration(m.ConvertNanos.Load()).Seconds()},
		{"daxfs_convert_failures_total", "Layer conversions that failed.", float64(m.ConvertFailures.Load())},
		{"daxfs_region_hits_total", "Layers found in the region at unpack: nothing downloaded or converted.", float64(m.RegionHits.Load())},
		{"daxfs_views_built_total", "Views written by this participant.", float64(m.ViewsBuilt.Load())},
		{"daxfs_views_mounted_total", "View mounts made by this participant.", float64(m.ViewsMounted.Load())},
		{"daxfs_blobs_local_total", "Layer blobs read from the files of containerd's content store.", float64(m.BlobsLocal.Load())},
		{"daxfs_blobs_remote_total", "Layer blobs read through containerd's content API.", float64(m.BlobsRemote.Load())},
		{"daxfs_views_warmed_total", "Views mounted ahead of their first container, after an unpack.", float64(m.ViewsWarmed.Load())},
		{"daxfs_views_unmounted_total", "Views unmounted by Cleanup once no snapshot used them.", float64(m.ViewsUnmounted.Load())},
	} {
		if _, err := fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s counter\n%s %g\n", c.name, c.help, c.name, c.name, c.v); err != nil {
			return err
		}
	}
	return nil
}
