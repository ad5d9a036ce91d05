package mountinfo

import (
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	const sample = `22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
41 26 0:38 / /var/lib/containerd-daxfs/mnt/sha256:abc ro,relatime - fuse.daxfs /dev/shm/containerd-daxfs/region ro,user_id=0,group_id=0,default_permissions,allow_other,max_read=131072
50 26 0:40 / /mnt/with\040space ro - daxfs none ro,phys=0x100000000,size=8388608
51 26 0:41 / /mnt/x rw master:1 shared:2 - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
`
	ms, err := Parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 4 {
		t.Fatalf("%d entries", len(ms))
	}
	if ms[1].FSType != "fuse.daxfs" || ms[1].MountPoint != "/var/lib/containerd-daxfs/mnt/sha256:abc" || ms[1].Source != "/dev/shm/containerd-daxfs/region" {
		t.Errorf("fuse entry = %+v", ms[1])
	}
	if ms[2].MountPoint != "/mnt/with space" || ms[2].FSType != "daxfs" || !strings.Contains(ms[2].SuperOptions, "phys=0x100000000") {
		t.Errorf("kernel entry = %+v", ms[2])
	}
	if ms[3].FSType != "overlay" || ms[3].MountPoint != "/mnt/x" {
		t.Errorf("entry with optional fields = %+v", ms[3])
	}
	for _, bad := range []string{"1 2 3\n", "1 2 0:1 / /x rw - \n", "no separator here at all\n"} {
		if _, err := Parse(strings.NewReader(bad)); err == nil {
			t.Errorf("Parse(%q) accepted a malformed line", bad)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add("41 26 0:38 / /a\\040b ro - fuse.daxfs src ro,max_read=1\n")
	f.Add("1 2 3\n")
	f.Add("\\")
	f.Fuzz(func(t *testing.T, s string) {
		ms, err := Parse(strings.NewReader(s))
		if err == nil {
			for _, m := range ms {
				if m.FSType == "" {
					t.Errorf("entry without a type: %+v", m)
				}
			}
		}
	})
}

func TestUnescapeOctal(t *testing.T) {
	for in, want := range map[string]string{
		`/a/b`:             "/a/b",
		`/with\040space`:   "/with space",
		`/tab\011x\134y`:   "/tab\tx\\y",
		`/trailing\`:       `/trailing\`,
		`/short\04`:        `/short\04`,
		`/not\999octal`:    `/not\999octal`,
		`/x\012newline\04`: "/x\nnewline\\04",
	} {
		if got := unescapeOctal(in); got != want {
			t.Errorf("unescapeOctal(%q) = %q, want %q", in, got, want)
		}
	}
}

func FuzzUnescapeOctal(f *testing.F) {
	f.Add(`/with\040space`)
	f.Fuzz(func(t *testing.T, s string) {
		if got := unescapeOctal(s); len(got) > len(s) {
			t.Fatalf("unescaping grew %q to %q", s, got)
		}
	})
}
