package overlay

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/containerd/containerd/v2/core/mount"
)

func TestContainerOptions(t *testing.T) {
	for _, tc := range []struct {
		name    string
		lowers  []string
		opts    Options
		want    []string
		wantErr bool
	}{
		{"plain", []string{"/l"}, Options{}, []string{"lowerdir=/l", "upperdir=/u", "workdir=/w"}, false},
		{"index off", []string{"/l"}, Options{IndexOff: true}, []string{"index=off", "lowerdir=/l", "upperdir=/u", "workdir=/w"}, false},
		{"userxattr and extra", []string{"/a", "/b"}, Options{UserXattr: true, Extra: []string{"volatile"}},
			[]string{"userxattr", "volatile", "lowerdir=/a:/b", "upperdir=/u", "workdir=/w"}, false},
		{"no lower", nil, Options{}, nil, true},
		{"relative", []string{"l"}, Options{}, nil, true},
		{"colon", []string{"/a:b"}, Options{}, nil, true},
		{"comma", []string{"/a,b"}, Options{}, nil, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Container(tc.lowers, "/u", "/w", tc.opts)
			if tc.wantErr {
				if err == nil {
					t.Fatalf("Container(%v) = %v, want error", tc.lowers, m)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m.Type != "overlay" || m.Source != "overlay" || !reflect.DeepEqual(m.Options, tc.want) {
				t.Fatalf("got %+v, want options %v", m, tc.want)
			}
			if up, ok := UpperDir([]mount.Mount{m}); !ok || up != "/u" {
				t.Fatalf("UpperDir = %q %v", up, ok)
			}
			if lo, ok := LowerDirs([]mount.Mount{m}); !ok || !reflect.DeepEqual(lo, tc.lowers) {
				t.Fatalf("LowerDirs = %v %v", lo, ok)
			}
		})
	}
}

func TestReadOnlyBind(t *testing.T) {
	m, err := ReadOnlyBind("/x")
	if err != nil {
		t.Fatal(err)
	}
	if !m.ReadOnly() || m.Type != "bind" {
		t.Fatalf("ReadOnlyBind = %+v: containerd must see it read-only", m)
	}
	if _, ok := UpperDir([]mount.Mount{m}); ok {
		t.Fatal("a bind mount has no upperdir")
	}
}

func TestHasFilesystem(t *testing.T) {
	procfs := []byte("nodev\tsysfs\nnodev\ttmpfs\n\text4\nnodev\toverlay\nfuseblk\n")
	for name, want := range map[string]bool{"overlay": true, "ext4": true, "fuseblk": true, "daxfs": false, "over": false} {
		if got := hasFilesystem(procfs, name); got != want {
			t.Errorf("hasFilesystem(%q) = %v, want %v", name, got, want)
		}
	}
}

// TestContainerMountWorks performs the mount the options describe with the
// real kernel overlayfs and checks copy-up and whiteouts land in the upper.
func TestContainerMountWorks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts overlayfs and must run as root")
	}
	dir := t.TempDir()
	lower, upper, work, target := filepath.Join(dir, "lower"), filepath.Join(dir, "upper"), filepath.Join(dir, "work"), filepath.Join(dir, "root")
	for _, d := range []string{lower, upper, work, target} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(lower, "a"), []byte("lower"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(lower, "b"), []byte("gone"), 0o644); err != nil {
		t.Fatal(err)
	}
	m, err := Container([]string{lower}, upper, work, DefaultOptions())
	if err != nil {
		t.Fatal(err)
	}
	if err := mount.All([]mount.Mount{m}, target); err != nil {
		t.Fatalf("mounting %+v: %v", m, err)
	}
	t.Cleanup(func() { _ = mount.UnmountAll(target, 0) })
	if b, err := os.ReadFile(filepath.Join(target, "a")); err != nil || string(b) != "lower" {
		t.Fatalf("read through overlay: %q %v", b, err)
	}
	if err := os.WriteFile(filepath.Join(target, "a"), []byte("upper"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(filepath.Join(target, "b")); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(filepath.Join(upper, "a")); string(b) != "upper" {
		t.Fatalf("copy-up did not reach the upper: %q", b)
	}
	if b, _ := os.ReadFile(filepath.Join(lower, "a")); string(b) != "lower" {
		t.Fatalf("lower changed: %q", b)
	}
	fi, err := os.Lstat(filepath.Join(upper, "b"))
	if err != nil || fi.Mode()&os.ModeCharDevice == 0 {
		t.Fatalf("whiteout for b in upper: %v %v", fi, err)
	}
}
