package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containerd/log"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/snapshotter"
)

// metricsListenAddress gives an address without a host ("9100" or ":9100")
// the loopback host: metrics leave the machine only where the operator
// names an interface ("0.0.0.0:9100").
func metricsListenAddress(address string) string {
	host, port, err := net.SplitHostPort(address)
	if err != nil {
		host, port = "", address // a port alone
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}

// serveMetrics serves /metrics in the Prometheus text format on address
// until ctx ends: the snapshotter's counters and the region's gauges.
func serveMetrics(ctx context.Context, address string, sn *snapshotter.Snapshotter, region *daxmem.Region) error {
	address = metricsListenAddress(address)
	l, err := net.Listen("tcp", address)
	if err != nil {
		return fmt.Errorf("metrics listener on %s: %w", address, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		var buf bytes.Buffer
		if err := writeMetrics(&buf, sn, region); err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		_, _ = w.Write(buf.Bytes())
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		_ = srv.Close()
	}()
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.G(ctx).WithError(err).Error("metrics server")
		}
	}()
	log.G(ctx).WithField("address", l.Addr().String()).Info("serving metrics")
	return nil
}

func writeMetrics(buf *bytes.Buffer, sn *snapshotter.Snapshotter, region *daxmem.Region) error {
	if err := sn.Metrics().WritePrometheus(buf); err != nil {
		return err
	}
	st := region.Stats()
	alive := 0
	for _, p := range st.Participants {
		if p.Alive {
			alive++
		}
	}
	for _, g := range []struct {
		name, help string
		v          float64
	}{
		{"daxfs_region_size_bytes", "Size of the region's data area.", float64(st.DataSize)},
		{"daxfs_region_used_bytes", "Bytes of the data area held by images.", float64(st.Used)},
		{"daxfs_region_free_bytes", "Free bytes of the data area.", float64(st.Free)},
		{"daxfs_region_largest_free_bytes", "Largest free extent.", float64(st.LargestFree)},
		{"daxfs_region_images_ready", "READY images in the region.", float64(st.Ready)},
		{"daxfs_region_images_writing", "Images being written.", float64(st.Writing)},
		{"daxfs_region_index_slots", "Index slots of the region.", float64(st.EntrySlots)},
		{"daxfs_region_participants_alive", "Participants with a fresh heartbeat.", float64(alive)},
	} {
		fmt.Fprintf(buf, "# HELP %s %s\n# TYPE %s gauge\n%s %g\n", g.name, g.help, g.name, g.name, g.v)
	}
	return nil
}
