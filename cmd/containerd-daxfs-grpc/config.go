package main

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// defaultConfigPath is read when --config is not given; a missing file
// means "all defaults".
const defaultConfigPath = "/etc/containerd-daxfs/config.toml"

// Config is the daemon's configuration file. Every key is optional.
type Config struct {
	Root              string `toml:"root"`
	Address           string `toml:"address"`
	ContainerdAddress string `toml:"containerd_address"`
	// ContainerdRoot is containerd's root directory: layer blobs are read
	// from its content store's files when they are there (faster than
	// containerd's content API). Empty: always use the API.
	ContainerdRoot string `toml:"containerd_root"`
	// SocketGroup is the group (name or number) that, besides root, may
	// use the socket (mode 0660). Empty: root only.
	SocketGroup string `toml:"socket_group"`
	LogLevel    string `toml:"log_level"`
	// MetricsAddress is a TCP address for /metrics; a port alone
	// (":9100") listens on loopback only.
	MetricsAddress string `toml:"metrics_address"`

	Region RegionConfig `toml:"region"`
	Mount  MountConfig  `toml:"mount"`
	GC     GCConfig     `toml:"gc"`
	Limits LimitsConfig `toml:"limits"`
}

// LimitsConfig bounds what one layer may hold (converter.Limits).
type LimitsConfig struct {
	MaxEntries int `toml:"max_entries"`
	MaxPathLen int `toml:"max_path_len"`
	MaxDepth   int `toml:"max_depth"`
}

// RegionConfig selects the shared memory region.
type RegionConfig struct {
	Backend string `toml:"backend"` // file, hugetlbfs, devdax, fsdax
	Path    string `toml:"path"`
	Size    Size   `toml:"size"`
	// Entries is the number of index slots (images) the region holds.
	Entries int `toml:"entries"`
	// Participants is the number of participant slots.
	Participants int `toml:"participants"`
	// MaxLayerSize bounds one layer image.
	MaxLayerSize Size `toml:"max_layer_size"`
	// Align is the alignment a region this daemon creates records ("0":
	// the backend's). A region on a file that device DAX maps too (a file
	// shared as guest memory) needs the device's, "2MiB".
	Align Size `toml:"align"`
	// ViewArea is the part of a new region kept for views (0: an eighth).
	ViewArea Size `toml:"view_area"`
}

// MountConfig selects how views are mounted.
type MountConfig struct {
	Mode     string `toml:"mode"`     // auto, kernel, erofs-dax, erofs, fuse
	Validate *bool  `toml:"validate"` // validate images before mounting them
	// DAXDevice is a DAX-capable block device (pmem, CXL) holding the
	// region from its byte 0: on kernels without the daxfs module, views
	// are then mounted by the kernel's erofs with dax=always.
	DAXDevice string `toml:"dax_device"`
	// WarmViews mounts the view of a freshly unpacked image ahead of its
	// first container and keeps it mounted this long unused ("0": off).
	WarmViews Duration `toml:"warm_views"`
}

// GCConfig schedules region garbage collection.
type GCConfig struct {
	Interval Duration `toml:"interval"`
	// ReapAfter keeps a silent participant's references (and so the
	// images its host's mounts may still read) this long after its last
	// heartbeat.
	ReapAfter Duration `toml:"reap_after"`
}

// DefaultConfig is what the daemon runs with when nothing is configured:
// a file-backed region under /dev/shm.
func DefaultConfig() Config {
	t := true
	return Config{
		Root:              "/var/lib/containerd-daxfs",
		Address:           "/run/containerd-daxfs/containerd-daxfs-grpc.sock",
		ContainerdAddress: "/run/containerd/containerd.sock",
		ContainerdRoot:    "/var/lib/containerd",
		LogLevel:          "info",
		Region: RegionConfig{
			Backend:      "file",
			Path:         "/dev/shm/containerd-daxfs/region",
			Size:         daxmem.DefaultSize,
			Entries:      4096,
			Participants: 64,
		},
		Mount: MountConfig{Mode: "auto", Validate: &t, WarmViews: Duration(10 * time.Minute)},
		GC:    GCConfig{Interval: Duration(10 * time.Minute), ReapAfter: Duration(time.Hour)},
		Limits: LimitsConfig{
			MaxEntries: converter.DefaultMaxEntries,
			MaxPathLen: converter.DefaultMaxPathLen,
			MaxDepth:   converter.DefaultMaxDepth,
		},
	}
}

// LoadConfig reads path over the defaults. A missing file at the default
// path is not an error; a missing file that was asked for is.
func LoadConfig(path string, explicit bool) (Config, error) {
	cfg := DefaultConfig()
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) && !explicit {
		return cfg, nil
	}
	if err != nil {
		return cfg, fmt.Errorf("reading config: %w", err)
	}
	dec := toml.NewDecoder(strings.NewReader(string(b)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&cfg); err != nil {
		if sm, ok := errors.AsType[*toml.StrictMissingError](err); ok {
			return cfg, fmt.Errorf("config %s: %s", path, sm.String())
		}
		if de, ok := errors.AsType[*toml.DecodeError](err); ok {
			row, col := de.Position()
			return cfg, fmt.Errorf("config %s:%d:%d: %v", path, row, col, de)
		}
		return cfg, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, cfg.check()
}

func (c Config) check() error {
	switch c.Region.Backend {
	case "file", "hugetlbfs", "devdax", "fsdax":
	default:
		return fmt.Errorf("config: region.backend %q: want file, hugetlbfs, devdax or fsdax", c.Region.Backend)
	}
	switch c.Mount.Mode {
	case "auto", "fuse", "kernel", "erofs", "erofs-dax":
	default:
		return fmt.Errorf("config: mount.mode %q: want auto, kernel, erofs-dax, erofs or fuse", c.Mount.Mode)
	}
	if c.Mount.Mode == "erofs-dax" && c.Mount.DAXDevice == "" {
		return errors.New("config: mount.mode erofs-dax needs mount.dax_device")
	}
	if c.Root == "" || c.Address == "" || c.Region.Path == "" {
		return errors.New("config: root, address and region.path must not be empty")
	}
	if c.Region.Size <= 0 && c.Region.Backend != "devdax" {
		return errors.New("config: region.size must be positive")
	}
	if c.Region.Size < 0 || c.Region.MaxLayerSize < 0 {
		return errors.New("config: region.size and region.max_layer_size must not be negative")
	}
	if a := int64(c.Region.Align); a != 0 && (a < 4096 || a&(a-1) != 0 || a > 1<<30) {
		return fmt.Errorf("config: region.align %d: want 0 or a power of two from 4KiB to 1GiB", a)
	}
	for _, l := range []struct {
		key string
		v   int
	}{{"limits.max_entries", c.Limits.MaxEntries}, {"limits.max_path_len", c.Limits.MaxPathLen}, {"limits.max_depth", c.Limits.MaxDepth}} {
		if l.v <= 0 {
			return fmt.Errorf("config: %s must be positive, not %d", l.key, l.v)
		}
	}
	return nil
}

// Size is a byte count written as a number or a string with a unit
// ("512MiB", "8G"): daxmem.ParseSize, binary units. go-toml sets integers
// directly; strings go through UnmarshalText.
type Size int64

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := daxmem.ParseSize(string(b))
	*s = Size(v)
	return err
}

// Duration is a time.Duration written as "10m", "1h30m".
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("duration %q: %w", b, err)
	}
	*d = Duration(v)
	return nil
}
