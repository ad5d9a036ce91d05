package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	snapshotsapi "github.com/containerd/containerd/api/services/snapshots/v1"
	"github.com/containerd/containerd/v2/contrib/diffservice"
	"github.com/containerd/containerd/v2/contrib/snapshotservice"
	"github.com/containerd/containerd/v2/core/content"
	contentproxy "github.com/containerd/containerd/v2/core/content/proxy"
	"github.com/containerd/log"
	"github.com/urfave/cli/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	contentapi "github.com/containerd/containerd/api/services/content/v1"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/converter/gunzip"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
	"github.com/containerd-daxfs/containerd-daxfs/snapshotter"
)

// serveFlags are the daemon's flags; they override the config file. On
// the root command (the daemon is the default) they are its own, not its
// sub-commands'.
func serveFlags(root bool) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "config", Value: defaultConfigPath, Usage: "configuration file", Local: root},
		&cli.StringFlag{Name: "root", Usage: "state directory (overrides root)", Local: root},
		&cli.StringFlag{Name: "address", Usage: "unix socket to serve on (overrides address)", Local: root},
		&cli.StringFlag{Name: "containerd-address", Usage: "containerd's socket (overrides containerd_address)", Local: root},
		&cli.StringFlag{Name: "log-level", Usage: "log level (overrides log_level)", Local: root},
		&cli.StringFlag{Name: "region-path", Usage: "region file or device (overrides region.path)", Local: root},
		&cli.StringFlag{Name: "region-size", Usage: "region size when creating it, e.g. 8G: binary units (overrides region.size)", Local: root},
		&cli.StringFlag{Name: "mount-mode", Usage: "auto, kernel, erofs-dax, erofs or fuse (overrides mount.mode)", Local: root},
	}
}

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:   "serve",
		Usage:  "run the snapshotter daemon (the default command)",
		Flags:  serveFlags(false),
		Action: runServe,
	}
}

// runServe runs the daemon: it joins the region, serves the snapshots and
// diff services on one unix socket, collects garbage periodically, and
// stops cleanly on SIGTERM or SIGINT (mounted views stay mounted: they are
// served by the separate fuse-serve process and adopted at the next start).
func runServe(ctx context.Context, cmd *cli.Command) error {
	if cmd.Args().Present() {
		return usage("unknown command %q", cmd.Args().First())
	}
	cfg, err := LoadConfig(cmd.String("config"), cmd.IsSet("config"))
	if err != nil {
		return err
	}
	for _, o := range []struct {
		flag string
		dst  *string
	}{
		{"root", &cfg.Root}, {"address", &cfg.Address}, {"containerd-address", &cfg.ContainerdAddress},
		{"log-level", &cfg.LogLevel}, {"region-path", &cfg.Region.Path}, {"mount-mode", &cfg.Mount.Mode},
	} {
		if v := cmd.String(o.flag); v != "" {
			*o.dst = v
		}
	}
	if v := cmd.String("region-size"); v != "" {
		n, err := daxmem.ParseSize(v)
		if err != nil {
			return usage("--region-size: %v", err)
		}
		cfg.Region.Size = Size(n)
	}
	if err := cfg.check(); err != nil {
		return err
	}
	if err := log.SetLevel(cfg.LogLevel); err != nil {
		return fmt.Errorf("log level %q: %w", cfg.LogLevel, err)
	}
	if err := log.SetFormat(log.TextFormat); err != nil {
		return err
	}
	return serve(ctx, cfg)
}

func serve(ctx context.Context, cfg Config) error {
	logger := log.G(ctx).WithField("root", cfg.Root)
	if err := os.MkdirAll(cfg.Root, 0o700); err != nil {
		return err
	}

	region, err := daxmem.Open(ctx, daxmem.Options{
		Backend:      cfg.Region.Backend,
		Path:         cfg.Region.Path,
		Size:         int64(cfg.Region.Size),
		Entries:      cfg.Region.Entries,
		Participants: cfg.Region.Participants,
		Align:        int64(cfg.Region.Align),
		ViewArea:     int64(cfg.Region.ViewArea),
	})
	if err != nil {
		return fmt.Errorf("opening region %s: %w", cfg.Region.Path, err)
	}
	defer region.Close()
	host, _ := os.Hostname()
	bootID, _ := os.ReadFile("/proc/sys/kernel/random/boot_id")
	id, err := region.Join(ctx, daxmem.ParticipantInfo{Host: host, BootID: string(bootID), PID: os.Getpid()}, filepath.Join(cfg.Root, "participant"))
	if err != nil {
		return fmt.Errorf("joining region %s: %w", cfg.Region.Path, err)
	}
	logger.WithField("region", region.Path()).WithField("participant", id).Info("joined region")

	self, err := os.Executable()
	if err != nil {
		return err
	}
	validate := cfg.Mount.Validate == nil || *cfg.Mount.Validate
	fo := mounter.FUSEOptions{
		StateDir: filepath.Join(cfg.Root, "fuse"),
		EROFSDir: filepath.Join(cfg.Root, "erofs"),
		Binary:   self,
		Validate: validate,
	}
	if cfg.Mount.DAXDevice != "" {
		fo.DAX = &mounter.DAXOptions{Device: cfg.Mount.DAXDevice, Region: region}
	}
	mnt, err := mounter.New(ctx, cfg.Mount.Mode, fo)
	if err != nil {
		return fmt.Errorf("starting the %s mounter: %w", cfg.Mount.Mode, err)
	}

	cc := &containerdContent{address: cfg.ContainerdAddress}
	defer cc.Close()
	sn, err := snapshotter.New(ctx, snapshotter.Config{
		Content:      cc.Provider,
		Root:         cfg.Root,
		Region:       region,
		Mounter:      mnt,
		Overlay:      overlay.DefaultOptions(),
		MaxLayerSize: int64(cfg.Region.MaxLayerSize),
		Limits: converter.Limits{
			MaxEntries: cfg.Limits.MaxEntries,
			MaxPathLen: cfg.Limits.MaxPathLen,
			MaxDepth:   cfg.Limits.MaxDepth,
		},
		WarmViews: time.Duration(cfg.Mount.WarmViews),
	})
	if err != nil {
		return err
	}
	defer sn.Close()

	blobs := ""
	if cfg.ContainerdRoot != "" {
		blobs = filepath.Join(cfg.ContainerdRoot, "io.containerd.content.v1.content")
	}
	differ := snapshotter.NewDiffer(sn, cc.Provider, snapshotter.DifferOptions{ContentRoot: blobs})

	srv := grpc.NewServer()
	snapshotsapi.RegisterSnapshotsServer(srv, snapshotservice.FromSnapshotter(sn))
	diffapi.RegisterDiffServer(srv, diffservice.FromApplierAndComparer(differ, differ))

	l, err := listenSocket(cfg.Address, cfg.SocketGroup)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.Address)

	gcCtx, stopGC := context.WithCancel(ctx)
	defer stopGC()
	go collectGarbage(gcCtx, region, time.Duration(cfg.GC.Interval), time.Duration(cfg.GC.ReapAfter))
	if cfg.MetricsAddress != "" {
		reg, err := metricsRegistry(sn.Metrics(), regionCollector{region})
		if err != nil {
			return err
		}
		if _, err := serveMetrics(gcCtx, cfg.MetricsAddress, reg); err != nil {
			return err
		}
	}

	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	logger.WithField("address", cfg.Address).WithField("gzip", gunzip.Implementation).Info("serving snapshots and diff services")
	select {
	case err := <-errc:
		return fmt.Errorf("serving on %s: %w", cfg.Address, err)
	case <-ctx.Done():
	}
	logger.Info("stopping")
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	return nil
}

// collectGarbage reclaims unreferenced images and dead participants' claims
// every interval.
func collectGarbage(ctx context.Context, region *daxmem.Region, interval, reapAfter time.Duration) {
	if interval <= 0 {
		return
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		st, err := region.GC(ctx, daxmem.GCOptions{MinAge: interval, ReapAfter: reapAfter})
		if err != nil {
			log.G(ctx).WithError(err).Warn("region garbage collection")
			continue
		}
		log.G(ctx).WithField("stats", fmt.Sprintf("%+v", st)).Debug("region garbage collection")
	}
}

// containerdContent dials containerd's content store on first use: the
// daemon starts before containerd (which dials us), so it cannot connect
// at start.
type containerdContent struct {
	address string

	mu    sync.Mutex
	conn  *grpc.ClientConn
	store content.Store
}

func (c *containerdContent) Provider(ctx context.Context) (content.Provider, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.store != nil {
		return c.store, nil
	}
	conn, err := grpc.NewClient("unix://"+c.address, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dialing containerd at %s: %w", c.address, err)
	}
	c.conn = conn
	c.store = contentproxy.NewContentStore(contentapi.NewContentClient(conn))
	return c.store, nil
}

func (c *containerdContent) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.Close()
	}
}
