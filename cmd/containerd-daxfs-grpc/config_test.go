package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestLoadConfig(t *testing.T) {
	dir := t.TempDir()
	write := func(s string) string {
		p := filepath.Join(dir, "config.toml")
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}

	cfg, err := LoadConfig(filepath.Join(dir, "absent.toml"), false)
	if err != nil || cfg.Region.Path != "/dev/shm/containerd-daxfs/region" || cfg.Mount.Mode != "auto" {
		t.Fatalf("defaults: %+v %v", cfg, err)
	}
	if _, err := LoadConfig(filepath.Join(dir, "absent.toml"), true); err == nil {
		t.Fatal("an explicitly named missing config must be an error")
	}

	cfg, err = LoadConfig(write(`
root = "/tmp/r"
[region]
size = "1GiB"
entries = 128
[mount]
mode = "fuse"
warm_views = "0"
[gc]
interval = "30s"
reap_after = "2h"
`), true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Root != "/tmp/r" || cfg.Region.Size != 1<<30 || cfg.Region.Entries != 128 || cfg.Mount.Mode != "fuse" ||
		time.Duration(cfg.GC.Interval) != 30*time.Second || time.Duration(cfg.GC.ReapAfter) != 2*time.Hour || cfg.Mount.WarmViews != 0 || cfg.Region.Backend != "file" {
		t.Fatalf("parsed config: %+v", cfg)
	}
	if cfg, err = LoadConfig(write("[region]\nsize = 1048576\n"), true); err != nil || cfg.Region.Size != 1<<20 {
		t.Fatalf("integer size: %+v %v", cfg.Region, err)
	}
	// One parser for every size: the config's "1G" is region init's.
	if cfg, err = LoadConfig(write("[region]\nsize = \"1G\"\nmax_layer_size = \"512m\"\n"), true); err != nil ||
		cfg.Region.Size != 1<<30 || cfg.Region.MaxLayerSize != 512<<20 {
		t.Fatalf("sizes with units: %+v %v", cfg.Region, err)
	}
	if cfg, err = LoadConfig(write("[region]\nalign = \"2MiB\"\n"), true); err != nil || cfg.Region.Align != 2<<20 {
		t.Fatalf("region.align: %+v %v", cfg.Region, err)
	}

	for _, tc := range []struct{ body, want string }{
		{"rooot = 1\n", "rooot"},
		{"[region]\nbackend = \"nvme\"\n", "region.backend"},
		{"[mount]\nmode = \"magic\"\n", "mount.mode"},
		{"[region]\nsize = \"lots\"\n", "lots"},
		{"[gc]\ninterval = \"soon\"\n", "soon"},
		{"root = \n", "config"},
		{"[region]\nmax_layer_size = -5\n", "negative"},
		{"[region]\nalign = \"3MiB\"\n", "region.align"},
		{"[region]\nalign = 512\n", "region.align"},
		{"[mount]\nmode = \"erofs-dax\"\n", "mount.dax_device"},
		{"[limits]\nmax_entries = 0\n", "limits.max_entries"},
		{"[limits]\nmax_path_len = -1\n", "limits.max_path_len"},
		{"[limits]\nmax_depht = 3\n", "max_depht"},
	} {
		_, err := LoadConfig(write(tc.body), true)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want one mentioning %q", tc.body, err, tc.want)
		}
	}
}

// TestExampleConfig: config.toml.example parses to exactly the defaults,
// so the file documents what the daemon does.
func TestExampleConfig(t *testing.T) {
	cfg, err := LoadConfig(filepath.Join("..", "..", "config.toml.example"), true)
	if err != nil {
		t.Fatal(err)
	}
	def := DefaultConfig()
	if cfg.Limits != def.Limits || cfg.Region.ViewArea != def.Region.ViewArea || cfg.SocketGroup != def.SocketGroup ||
		cfg.Region.Size != def.Region.Size || cfg.Mount.Mode != def.Mount.Mode {
		t.Fatalf("the example config is not the defaults:\n%+v\n%+v", cfg, def)
	}
}

// FuzzLoadConfig: any file content gives a config or an error, never a
// panic, and an accepted config passes its own checks.
func FuzzLoadConfig(f *testing.F) {
	f.Add("root = \"/r\"\n[region]\nsize = \"1GiB\"\n")
	f.Add("[region]\nsize = 4096\nbackend = \"devdax\"\n[gc]\ninterval = \"1m\"\n")
	f.Add("[mount]\nmode = \"fuse\"\nvalidate = false\n")
	f.Add("[region]\nmax_layer_size = \"18446744073709551615\"\n")
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, body string) {
		p := filepath.Join(dir, "c.toml")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		cfg, err := LoadConfig(p, true)
		if err != nil {
			return
		}
		if err := cfg.check(); err != nil {
			t.Fatalf("LoadConfig accepted a config its check rejects: %v", err)
		}
		if cfg.Region.Size < 0 || cfg.Region.MaxLayerSize < 0 {
			t.Fatalf("negative size accepted: %+v", cfg.Region)
		}
	})
}
