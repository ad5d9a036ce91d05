package mounter

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

const sampleFilesystems = `nodev	sysfs
nodev	tmpfs
nodev	proc
	ext3
	ext4
nodev	overlay
	fuseblk
nodev	fuse
nodev	daxfs
	vfat
`

func TestParseFilesystems(t *testing.T) {
	for _, tc := range []struct {
		name, contents string
		want           bool
	}{
		{"listed nodev", sampleFilesystems, true},
		{"listed block", "\text4\n\tdaxfs\n", true},
		{"absent", "nodev\tsysfs\n\text4\nnodev\tfuse\n", false},
		{"prefix only", "nodev\tdaxfs2\nnodev\tmydaxfs\n", false},
		{"empty", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := hasFilesystem([]byte(tc.contents), KernelFSType)
			if err != nil || got != tc.want {
				t.Errorf("hasFilesystem = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	fss, _ := ParseFilesystems(strings.NewReader(sampleFilesystems))
	if len(fss) != 10 || fss[3] != "ext3" || fss[8] != "daxfs" {
		t.Errorf("ParseFilesystems = %q", fss)
	}
}

func TestKernelMountData(t *testing.T) {
	for _, tc := range []struct {
		name    string
		src     Source
		want    string
		errKind func(error) bool
	}{
		{"window", Source{Path: "/dev/dax0.0", Offset: 1 << 21, Length: 8 << 20, PhysAddr: 0x1_0020_0000, HasPhys: true}, "phys=0x100200000,size=8388608", nil},
		{"small", Source{Length: 4096, PhysAddr: 0x80000000, HasPhys: true}, "phys=0x80000000,size=4096", nil},
		{"no phys", Source{Path: "/dev/shm/region", Length: 4096}, "", errdefs.IsNotImplemented},
		{"no length", Source{PhysAddr: 0x1000, HasPhys: true}, "", errdefs.IsInvalidArgument},
		{"unaligned", Source{Length: 4096, PhysAddr: 0x1001, HasPhys: true}, "", errdefs.IsInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := KernelMountData(tc.src)
			if tc.errKind != nil {
				if err == nil || !tc.errKind(err) {
					t.Errorf("KernelMountData = %q, %v; want an error of the right kind", got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("KernelMountData = %q, %v; want %q", got, err, tc.want)
			}
		})
	}
	if KernelMountFlags != 1 { // MS_RDONLY only
		t.Errorf("kernel mount flags %#x, want MS_RDONLY", KernelMountFlags)
	}
}

func FuzzParseFilesystems(f *testing.F) {
	f.Add(sampleFilesystems)
	f.Fuzz(func(t *testing.T, s string) {
		fss, err := ParseFilesystems(strings.NewReader(s))
		if err != nil {
			return
		}
		for _, fs := range fss {
			if fs == "" || strings.ContainsAny(fs, " \t\n") {
				t.Errorf("bad name %q", fs)
			}
		}
	})
}

// TestKernelExecCheck: the first mount holding a non-empty regular file
// decides whether the module can run programs; mounts without one (empty
// files, directories only) decide nothing; a module found unable is not
// used again.
func TestKernelExecCheck(t *testing.T) {
	ctx := t.Context()
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "a", "b"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "a", "empty"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := firstRegularFile(dir, 100); got != "" {
		t.Fatalf("firstRegularFile found %q among empty files", got)
	}
	k := &kernelMounter{}
	if err := k.checkExec(ctx, dir); err != nil || k.execSeen {
		t.Fatalf("a mount without a regular file decided (%v, seen %v)", err, k.execSeen)
	}
	prog := filepath.Join(dir, "a", "b", "prog")
	if err := os.WriteFile(prog, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	if got := firstRegularFile(dir, 100); got != prog {
		t.Fatalf("firstRegularFile = %q, want %q", got, prog)
	}
	if got := firstRegularFile(dir, 2); got != "" {
		t.Fatalf("firstRegularFile looked past its limit: %q", got)
	}
	// A file system that maps privately and writably (this one): usable.
	if err := k.checkExec(ctx, dir); err != nil || !k.execSeen || !k.execOK || !k.usable() {
		t.Fatalf("checkExec on a file system allowing private writable mappings: %v (seen %v, ok %v)", err, k.execSeen, k.execOK)
	}
	// One found unable: refused from then on, as NotImplemented.
	k = &kernelMounter{execSeen: true}
	if k.usable() {
		t.Fatal("a module found unable to run programs is still usable")
	}
	err := k.Mount(ctx, Source{HasPhys: true, PhysAddr: 1 << 32, Length: 1 << 20}, dir)
	if !errors.Is(err, ErrModuleNoExec) || !errdefs.IsNotImplemented(err) {
		t.Fatalf("Mount with an unusable module: %v", err)
	}
}

// TestImageLosses: the images auto mode keeps from the daxfs module are
// those with xattrs or device nodes, read through the source window.
func TestImageLosses(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name  string
		build func(root string) error
		want  string
	}{
		{"plain", func(root string) error { return os.WriteFile(filepath.Join(root, "f"), []byte("x"), 0o644) }, ""},
		{"xattr", func(root string) error {
			f := filepath.Join(root, "f")
			if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
				return err
			}
			return unix.Setxattr(f, "user.k", []byte("v"), 0)
		}, "xattrs"},
		{"device", func(root string) error {
			return unix.Mknod(filepath.Join(root, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
		}, "device nodes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			root := filepath.Join(dir, tc.name)
			if err := os.Mkdir(root, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := tc.build(root); err != nil {
				t.Fatal(err)
			}
			img := root + ".daxfs"
			if err := mtest.ImageFromDir(root, img); err != nil {
				t.Fatal(err)
			}
			lost, err := imageLosses(Source{Path: img})
			if err != nil || strings.Join(lost, ",") != tc.want {
				t.Fatalf("imageLosses = %q, %v; want %q", lost, err, tc.want)
			}
		})
	}
}
