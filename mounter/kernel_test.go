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

func TestParseMountinfo(t *testing.T) {
	const sample = `22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
41 26 0:38 / /var/lib/containerd-daxfs/mnt/sha256:abc ro,relatime - fuse.daxfs /dev/shm/containerd-daxfs/region ro,user_id=0,group_id=0,default_permissions,allow_other,max_read=131072
50 26 0:40 / /mnt/with\040space ro - daxfs none ro,phys=0x100000000,size=8388608
51 26 0:41 / /mnt/x rw master:1 shared:2 - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
`
	ms, err := ParseMountinfo(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 4 {
		t.Fatalf("%d entries", len(ms))
	}
	if ms[1].FSType != FSTypeFUSE || ms[1].MountPoint != "/var/lib/containerd-daxfs/mnt/sha256:abc" || ms[1].Source != "/dev/shm/containerd-daxfs/region" {
		t.Errorf("fuse entry = %+v", ms[1])
	}
	if ms[2].MountPoint != "/mnt/with space" || ms[2].FSType != "daxfs" || !strings.Contains(ms[2].SuperOptions, "phys=0x100000000") {
		t.Errorf("kernel entry = %+v", ms[2])
	}
	if ms[3].FSType != "overlay" || ms[3].MountPoint != "/mnt/x" {
		t.Errorf("entry with optional fields = %+v", ms[3])
	}
	for _, bad := range []string{"1 2 3\n", "1 2 0:1 / /x rw - \n", "no separator here at all\n"} {
		if _, err := ParseMountinfo(strings.NewReader(bad)); err == nil {
			t.Errorf("ParseMountinfo(%q) accepted a malformed line", bad)
		}
	}
}

func FuzzParseMountinfo(f *testing.F) {
	f.Add("41 26 0:38 / /a\\040b ro - fuse.daxfs src ro,max_read=1\n")
	f.Add("1 2 3\n")
	f.Add("\\")
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := ParseMountinfo(strings.NewReader(s))
		if err == nil {
			for _, m := range ms {
				if m.FSType == "" {
					t.Errorf("entry without a type: %+v", m)
				}
			}
		}
	})
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
