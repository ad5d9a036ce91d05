package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/containerd/log"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
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

// metricsRegistry holds what /metrics serves: the Go runtime's and the
// process's metrics, and the given collectors (the snapshotter's counters,
// the region's gauges).
func metricsRegistry(cs ...prometheus.Collector) (*prometheus.Registry, error) {
	reg := prometheus.NewRegistry()
	cs = append(cs, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering metrics: %w", err)
		}
	}
	return reg, nil
}

// serveMetrics serves reg's metrics at /metrics on address until ctx ends.
func serveMetrics(ctx context.Context, address string, reg *prometheus.Registry) (net.Addr, error) {
	address = metricsListenAddress(address)
	l, err := net.Listen("tcp", address)
	if err != nil {
		return nil, fmt.Errorf("metrics listener on %s: %w", address, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{ErrorLog: metricsErrorLog{ctx}}))
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
	return l.Addr(), nil
}

// metricsErrorLog logs what promhttp could not gather.
type metricsErrorLog struct{ ctx context.Context }

func (l metricsErrorLog) Println(v ...any) { log.G(l.ctx).Warn(fmt.Sprint(v...)) }

// regionCollector exports the region's gauges, read when scraped.
type regionCollector struct{ region *daxmem.Region }

// regionGauges are the region's gauges by name, with what they measure.
var regionGauges = []struct {
	name, help string
	value      func(st daxmem.Stats) float64
}{
	{"daxfs_region_size_bytes", "Size of the region's data area.", func(st daxmem.Stats) float64 { return float64(st.DataSize) }},
	{"daxfs_region_used_bytes", "Bytes of the data area held by images.", func(st daxmem.Stats) float64 { return float64(st.Used) }},
	{"daxfs_region_free_bytes", "Free bytes of the data area.", func(st daxmem.Stats) float64 { return float64(st.Free) }},
	{"daxfs_region_largest_free_bytes", "Largest free extent.", func(st daxmem.Stats) float64 { return float64(st.LargestFree) }},
	{"daxfs_region_images_ready", "READY images in the region.", func(st daxmem.Stats) float64 { return float64(st.Ready) }},
	{"daxfs_region_images_writing", "Images being written.", func(st daxmem.Stats) float64 { return float64(st.Writing) }},
	{"daxfs_region_index_slots", "Index slots of the region.", func(st daxmem.Stats) float64 { return float64(st.EntrySlots) }},
	{"daxfs_region_participants_alive", "Participants with a fresh heartbeat.", func(st daxmem.Stats) float64 {
		alive := 0
		for _, p := range st.Participants {
			if p.Alive {
				alive++
			}
		}
		return float64(alive)
	}},
}

func gaugeDesc(name, help string) *prometheus.Desc { return prometheus.NewDesc(name, help, nil, nil) }

// Describe implements prometheus.Collector.
func (c regionCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, g := range regionGauges {
		ch <- gaugeDesc(g.name, g.help)
	}
}

// Collect implements prometheus.Collector.
func (c regionCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.region.Stats()
	for _, g := range regionGauges {
		ch <- prometheus.MustNewConstMetric(gaugeDesc(g.name, g.help), prometheus.GaugeValue, g.value(st))
	}
}
