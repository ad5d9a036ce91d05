package mounter

import (
	"strings"
	"testing"

	"github.com/containerd/errdefs"
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
