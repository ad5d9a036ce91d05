package daxmem

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestAlignOption: a region made on a file for device DAX records the
// device's 2 MiB alignment (its size rounded up to it), opens again as a
// file, and bad alignments are refused before anything is created.
func TestAlignOption(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	path := filepath.Join(dir, "region")
	r, err := Create(ctx, Options{Path: path, Size: 5 << 20, Align: 2 << 20, Entries: 64, Participants: 4})
	if err != nil {
		t.Fatal(err)
	}
	if st := r.Stats(); st.Align != 2<<20 || st.Size != 6<<20 {
		t.Fatalf("align %d size %d, want 2 MiB and 6 MiB", st.Align, st.Size)
	}
	r.Close()
	if fi, err := os.Stat(path); err != nil || fi.Size() != 6<<20 {
		t.Fatalf("region file: %v %v", fi, err)
	}
	r, err = Open(ctx, Options{Path: path, NoCreate: true})
	if err != nil {
		t.Fatalf("reopening a 2 MiB aligned region as a file: %v", err)
	}
	if r.Stats().Align != 2<<20 {
		t.Fatalf("reopened align %d", r.Stats().Align)
	}
	r.Close()

	for _, bad := range []int64{1024, 3 << 20, 2 << 30} {
		p := filepath.Join(dir, "bad")
		if _, err := Create(ctx, Options{Path: p, Size: 8 << 20, Align: bad}); !errors.Is(err, ErrInvalidSize) {
			t.Errorf("align %d: %v, want ErrInvalidSize", bad, err)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("align %d left %s behind", bad, p)
		}
	}
	// Default: the backend's own alignment.
	r, err = Create(ctx, Options{Path: filepath.Join(dir, "plain"), Size: 5 << 20, Entries: 64, Participants: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if st := r.Stats(); st.Align != pageSize || st.Size != 5<<20 {
		t.Fatalf("default align %d size %d", st.Align, st.Size)
	}
}

// TestCheckAlign: the refusal of a region the backend cannot map says
// what to do (the init flag and the config key), and is an AlignError.
func TestCheckAlign(t *testing.T) {
	for _, tc := range []struct {
		region, backend int64
		ok              bool
	}{
		{4096, 4096, true},
		{2 << 20, 4096, true},
		{2 << 20, 2 << 20, true},
		{1 << 30, 2 << 20, true},
		{4096, 2 << 20, false},
		{2 << 20, 1 << 30, false},
	} {
		err := checkAlign("/dev/dax0.0", tc.region, &backend{name: BackendDevDAX, align: tc.backend})
		if tc.ok != (err == nil) {
			t.Errorf("region %d on backend %d: %v", tc.region, tc.backend, err)
			continue
		}
		if err == nil {
			continue
		}
		var ae *AlignError
		if !errors.As(err, &ae) || !errors.Is(err, ErrInvalidSize) {
			t.Errorf("%v is not an AlignError", err)
		}
		need := sizeName(tc.backend)
		for _, want := range []string{"/dev/dax0.0", "made with " + sizeName(tc.region), "region init --align " + need, `region.align = "` + need + `iB"`} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q lacks %q", err, want)
			}
		}
	}
}

// TestDevDAXOpenIgnoresCreateSize: opening a device DAX region maps the
// whole device whatever size is configured for creating regions (the
// daemon's default is 8 GiB): a smaller device gets as far as reading its
// header (here all zero: /dev/zero stands in for the device).
func TestDevDAXOpenIgnoresCreateSize(t *testing.T) {
	var st unix.Stat_t
	if err := unix.Stat("/dev/zero", &st); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	writeSysfs(t, root, int(unix.Major(st.Rdev)), int(unix.Minor(st.Rdev)), map[string]string{
		"size": "16777216\n", "align": "2097152\n", "resource": "0x240000000\n",
	})
	_, err := Open(context.Background(), Options{Backend: BackendDevDAX, Path: "/dev/zero", SysRoot: root, Size: 8 << 30})
	if !errors.Is(err, ErrBadHeader) || !strings.Contains(err.Error(), "not initialised") {
		t.Fatalf("Open of an uninitialised 16 MiB device with an 8 GiB size: %v, want the all-zero header refused", err)
	}
}
