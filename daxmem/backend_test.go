package daxmem

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func writeSysfs(t *testing.T, root string, major, minor int, files map[string]string) {
	t.Helper()
	dir := filepath.Join(root, "dev", "char", itoa(major)+":"+itoa(minor))
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, v := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(v), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func itoa(i int) string { return strconv.Itoa(i) }

func TestReadDevDAXSysfs(t *testing.T) {
	cases := []struct {
		name    string
		files   map[string]string
		want    devDAXInfo
		wantErr string
	}{
		{"full", map[string]string{"size": "17179869184\n", "align": "2097152\n", "resource": "0x1080000000\n"},
			devDAXInfo{size: 16 << 30, align: 2 << 20, phys: 0x1080000000, physKnown: true}, ""},
		{"1G align", map[string]string{"size": "4294967296", "align": "1073741824", "resource": "0x100000000"},
			devDAXInfo{size: 4 << 30, align: 1 << 30, phys: 0x100000000, physKnown: true}, ""},
		{"old kernel: no align, no resource", map[string]string{"size": "1073741824"},
			devDAXInfo{size: 1 << 30, align: 2 << 20}, ""},
		{"no size", map[string]string{"align": "2097152"}, devDAXInfo{}, "no usable size"},
		{"garbage size", map[string]string{"size": "lots"}, devDAXInfo{}, "lots"},
		{"odd align", map[string]string{"size": "1073741824", "align": "3000"}, devDAXInfo{}, "power of two"},
		{"unaligned base", map[string]string{"size": "1073741824", "align": "2097152", "resource": "0x1000"}, devDAXInfo{}, "not aligned"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			root := t.TempDir()
			writeSysfs(t, root, 252, i, tc.files)
			got, err := readDevDAXSysfs(root, 252, uint32(i))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("got %+v %v, want %+v", got, err, tc.want)
			}
		})
	}
}

func TestDevDAXMapSize(t *testing.T) {
	info := devDAXInfo{size: 10<<20 + 4096, align: 2 << 20}
	cases := []struct {
		want, got int64
		err       bool
	}{
		{0, 10 << 20, false},      // whole device, rounded down to the alignment
		{5 << 20, 4 << 20, false}, // rounded down
		{2 << 20, 2 << 20, false},
		{1 << 20, 0, true},  // less than one aligned mapping
		{64 << 20, 0, true}, // bigger than the device
	}
	for _, c := range cases {
		got, err := devDAXMapSize(c.want, info)
		if (err != nil) != c.err || got != c.got {
			t.Errorf("devDAXMapSize(%d) = %d, %v; want %d (err %v)", c.want, got, err, c.got, c.err)
		}
		if err == nil && got%info.align != 0 {
			t.Errorf("map size %d not a multiple of the alignment", got)
		}
	}
}

func TestFSDAXFlagChoice(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "fsdax")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.Truncate(1 << 20)
	for _, tc := range []struct {
		name      string
		refuse    error // what the fake kernel answers to MAP_SYNC
		wantSync  bool
		wantTries []int
		wantErr   bool
	}{
		{"dax filesystem", nil, true, []int{unix.MAP_SHARED_VALIDATE | unix.MAP_SYNC}, false},
		{"not dax: EOPNOTSUPP", unix.EOPNOTSUPP, false, []int{unix.MAP_SHARED_VALIDATE | unix.MAP_SYNC, unix.MAP_SHARED}, false},
		{"old kernel: EINVAL", unix.EINVAL, false, []int{unix.MAP_SHARED_VALIDATE | unix.MAP_SYNC, unix.MAP_SHARED}, false},
		{"other error is not retried", unix.ENOMEM, false, []int{unix.MAP_SHARED_VALIDATE | unix.MAP_SYNC}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tries []int
			fake := func(fd int, off int64, n int, prot, flags int) ([]byte, error) {
				tries = append(tries, flags)
				if flags&unix.MAP_SYNC != 0 && tc.refuse != nil {
					return nil, tc.refuse
				}
				return make([]byte, n), nil
			}
			b := &backend{name: BackendFSDAX, path: f.Name(), f: f, align: pageSize}
			_, err := b.mapBackend(1<<20, fake)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err %v", err)
			}
			if b.mapSync != tc.wantSync || len(tries) != len(tc.wantTries) {
				t.Fatalf("mapSync %v tries %x, want %v %x", b.mapSync, tries, tc.wantSync, tc.wantTries)
			}
			for i := range tries {
				if tries[i] != tc.wantTries[i] {
					t.Fatalf("tries %x, want %x", tries, tc.wantTries)
				}
			}
		})
	}
	for _, name := range []string{BackendFile, BackendHugetlbfs, BackendDevDAX} {
		if fl := mapFlags(name); len(fl) != 1 || fl[0] != unix.MAP_SHARED {
			t.Errorf("%s maps with %x, want MAP_SHARED only", name, fl)
		}
	}
}

// TestFSDAXOnPlainFilesystem runs the real fsdax backend on a filesystem
// without DAX: the kernel refuses MAP_SYNC and we fall back to MAP_SHARED.
func TestFSDAXOnPlainFilesystem(t *testing.T) {
	o := testOpts(t, 4<<20)
	o.Backend = BackendFSDAX
	r := mustCreate(t, o)
	if r.be.mapSync {
		t.Skip("this temp directory is on a DAX filesystem")
	}
	if !strings.Contains(r.Stats().Durability, "MAP_SYNC refused") {
		t.Fatalf("durability %q", r.Stats().Durability)
	}
	mustJoin(t, r)
	publish(t, r, KindLayer, key("fsdax"), 4096, 4096, ClaimOptions{})
	if err := r.Verify(KindLayer, key("fsdax")); err != nil {
		t.Fatal(err)
	}
}

func TestBackendRefusals(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	// hugetlbfs wants a hugetlbfs mount.
	if _, err := Create(ctx, Options{Backend: BackendHugetlbfs, Path: filepath.Join(dir, "h"), Size: 4 << 20}); err == nil || !strings.Contains(err.Error(), "not on a hugetlbfs mount") {
		t.Fatalf("hugetlbfs on tmp: %v", err)
	}
	// devdax wants a character device.
	plain := filepath.Join(dir, "plain")
	os.WriteFile(plain, make([]byte, 8192), 0o600)
	if _, err := Open(ctx, Options{Backend: BackendDevDAX, Path: plain}); err == nil || !strings.Contains(err.Error(), "not a character device") {
		t.Fatalf("devdax on a file: %v", err)
	}
	// /dev/null is a character device but sysfs has no DAX size for it.
	if _, err := Open(ctx, Options{Backend: BackendDevDAX, Path: "/dev/null", SysRoot: t.TempDir()}); err == nil || !strings.Contains(err.Error(), "no usable size") {
		t.Fatalf("devdax on /dev/null: %v", err)
	}
	if _, err := Open(ctx, Options{Backend: "nvram", Path: plain}); err == nil || !strings.Contains(err.Error(), "unknown region backend") {
		t.Fatalf("unknown backend: %v", err)
	}
	if _, err := Create(ctx, Options{Backend: BackendFSDAX}); err == nil {
		t.Fatal("fsdax without a path accepted")
	}
	if _, err := Create(ctx, Options{Path: filepath.Join(dir, "p"), Participants: 65}); err == nil {
		t.Fatal("65 participants accepted")
	}
	// A file is not a valid region just because it exists.
	if _, err := Open(ctx, Options{Path: plain}); !errors.Is(err, ErrBadHeader) {
		t.Fatalf("open of a zero file: %v", err)
	}
}

// TestClaimReservesBacking checks the file backend backs a claimed extent
// with memory (so the writer cannot SIGBUS on a full tmpfs) and gives the
// unused tail back at publish.
func TestClaimReservesBacking(t *testing.T) {
	ctx := context.Background()
	r := mustCreate(t, testOpts(t, 16<<20))
	mustJoin(t, r)
	blocks := func() int64 {
		var st unix.Stat_t
		if err := unix.Fstat(int(r.be.f.Fd()), &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	before := blocks()
	c, err := r.Claim(ctx, KindLayer, key("big"), 8<<20, ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := blocks() - before; got < 8<<20 {
		t.Fatalf("claim of 8 MiB backed %d bytes", got)
	}
	if _, err := c.Publish(ctx, 4096); err != nil {
		t.Fatal(err)
	}
	if got := blocks() - before; got > 1<<20 {
		t.Fatalf("after publishing 4 KiB, %d bytes still allocated", got)
	}
}

// TestDevDAXOverFakeDevice runs the device DAX backend end to end on
// /dev/zero (a character device that supports MAP_SHARED) with a sysfs
// tree describing it as a 16 MiB DAX device at physical 0x2_4000_0000:
// the mapping must be 2 MiB aligned, the size and physical base come from
// sysfs, and the region works.
func TestDevDAXOverFakeDevice(t *testing.T) {
	var st unix.Stat_t
	if err := unix.Stat("/dev/zero", &st); err != nil {
		t.Fatal(err)
	}
	root := t.TempDir()
	writeSysfs(t, root, int(unix.Major(st.Rdev)), int(unix.Minor(st.Rdev)), map[string]string{
		"size": "16777216\n", "align": "2097152\n", "resource": "0x240000000\n",
	})
	ctx := context.Background()
	r, err := Create(ctx, Options{Backend: BackendDevDAX, Path: "/dev/zero", SysRoot: root, Entries: 64, Participants: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if phys, ok := r.PhysAddr(); !ok || phys != 0x240000000 {
		t.Fatalf("PhysAddr %#x %v", phys, ok)
	}
	if r.Size() != 16<<20 {
		t.Fatalf("size %d, want the whole device", r.Size())
	}
	if uintptrOf(r.full)%(2<<20) != 0 {
		t.Fatalf("mapping at %#x is not 2 MiB aligned", uintptrOf(r.full))
	}
	mustJoin(t, r)
	e := publish(t, r, KindLayer, key("dax"), 100000, 100000, ClaimOptions{})
	if err := r.Verify(KindLayer, key("dax")); err != nil {
		t.Fatal(err)
	}
	if phys, _ := r.PhysAddr(); phys+uint64(e.Offset) != 0x240000000+uint64(e.Offset) || e.Offset%pageSize != 0 {
		t.Fatalf("image at %d", e.Offset)
	}
	// A size larger than the device is refused; a smaller one is rounded
	// down to the alignment.
	if _, err := Create(ctx, Options{Backend: BackendDevDAX, Path: "/dev/zero", SysRoot: root, Size: 32 << 20}); err == nil {
		t.Fatal("region larger than the device accepted")
	}
	r2, err := Create(ctx, Options{Backend: BackendDevDAX, Path: "/dev/zero", SysRoot: root, Size: 5 << 20, Entries: 64, Participants: 4})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	if r2.Size() != 4<<20 {
		t.Fatalf("size %d, want 5 MiB rounded down to 4 MiB", r2.Size())
	}
}

// TestHugetlbfsBackend mounts a private hugetlbfs and creates a region on
// it. With huge pages reserved on the machine the region works and its
// size is rounded up to whole huge pages; without, Create fails cleanly
// (the kernel refuses the mapping) and leaves no file behind.
func TestHugetlbfsBackend(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting hugetlbfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("none", dir, "hugetlbfs", 0, "mode=0700"); err != nil {
		t.Skipf("cannot mount hugetlbfs: %v", err)
	}
	defer unix.Unmount(dir, unix.MNT_DETACH)
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	huge := int64(st.Bsize)
	ctx := context.Background()
	path := filepath.Join(dir, "region")
	r, err := Create(ctx, Options{Backend: BackendHugetlbfs, Path: path, Size: huge + 4096, Entries: 64, Participants: 4})
	freePages := func() int64 {
		b, _ := os.ReadFile("/proc/meminfo")
		for l := range strings.SplitSeq(string(b), "\n") {
			if f := strings.Fields(l); len(f) == 2 && f[0] == "HugePages_Free:" {
				n, _ := strconv.ParseInt(f[1], 10, 64)
				return n
			}
		}
		return 0
	}
	if err != nil {
		if freePages() >= 2 {
			t.Fatalf("create on hugetlbfs with free huge pages: %v", err)
		}
		if !strings.Contains(err.Error(), "hugetlbfs backend") || !strings.Contains(err.Error(), path) {
			t.Fatalf("error does not name the backend and path: %v", err)
		}
		if ents, _ := os.ReadDir(dir); len(ents) != 0 {
			t.Fatalf("failed create left %v behind", ents)
		}
		t.Logf("no huge pages reserved here: Create failed cleanly: %v", err)
		return
	}
	defer r.Close()
	if r.Size() != 2*huge || r.g.align != huge {
		t.Fatalf("size %d align %d, want %d rounded to huge pages", r.Size(), r.g.align, huge+4096)
	}
	mustJoin(t, r)
	publish(t, r, KindLayer, key("huge"), 8192, 8192, ClaimOptions{})
	if err := r.Verify(KindLayer, key("huge")); err != nil {
		t.Fatal(err)
	}
}
