package daxfs

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// goodImage is a small image with every kind of node, hard links, xattrs
// and an extension block.
func goodImage(t testing.TB) []byte {
	return buildImage(t, WriterOptions{}, func(w *Writer) {
		for _, e := range []struct {
			h    Header
			data string
		}{
			{Header{Path: "etc", Mode: ModeDir | 0o755, Xattrs: map[string][]byte{"user.b": []byte("2"), "user.a": []byte("1")}}, ""},
			{Header{Path: "etc/a", Mode: ModeRegular | 0o644, ModTime: time.Unix(5, 6)}, "hello"},
			{Header{Path: "etc/b", Mode: ModeRegular | 0o600, Xattrs: map[string][]byte{"security.capability": {1, 2}}}, "world!"},
			{Header{Path: "etc/l", Mode: ModeSymlink | 0o777, Linkname: "a"}, ""},
			{Header{Path: "dev/null", Mode: ModeChar | 0o666, Rdev: 0x103}, ""},
			{Header{Path: "dev/fifo", Mode: ModeFIFO | 0o644}, ""},
			{Header{Path: "empty", Mode: ModeDir | 0o755}, ""},
		} {
			if e.h.Mode&ModeTypeMask == ModeRegular {
				e.h.Size = int64(len(e.data))
			}
			if err := w.Add(&e.h, strings.NewReader(e.data)); err != nil {
				t.Fatal(err)
			}
		}
		if err := w.Link("etc/hl", "etc/a", nil); err != nil {
			t.Fatal(err)
		}
	})
}

type imgPos struct {
	img []byte
	im  *Image
	t   testing.TB
}

func (p imgPos) ino(path string) uint32 {
	in, err := p.im.LookupPath(path)
	if err != nil {
		p.t.Fatalf("%s: %v", path, err)
	}
	return in.Ino
}

// inode returns the image offset of inode ino's slot.
func (p imgPos) inode(ino uint32) int { return BaseOffset + int(p.im.inodeOff) + int(ino-1)*InodeSize }

// dirent returns the image offset of entry name in directory path dir.
func (p imgPos) dirent(dir, name string) int {
	d := p.ino(dir)
	in, _ := p.im.Inode(d)
	ents, _ := p.im.ReadDir(d)
	for i, e := range ents {
		if e.Name == name {
			return BaseOffset + int(in.DataOffset) + i*DirentStride
		}
	}
	p.t.Fatalf("%s/%s not found", dir, name)
	return 0
}

func (p imgPos) ext() int { return BaseOffset + int(le.Uint64(p.img[BaseOffset+64:])) }

func (p imgPos) rec(ino uint32) int { return p.ext() + extHeaderSize + int(ino-1)*extRecordSize }

func TestValidateRejectsCorruption(t *testing.T) {
	good := goodImage(t)
	if err := Validate(good); err != nil {
		t.Fatalf("good image: %v", err)
	}
	im, _ := Open(good)
	p := imgPos{img: good, im: im, t: t}
	u32 := func(off int, v uint32) func([]byte) { return func(b []byte) { le.PutUint32(b[off:], v) } }
	u64 := func(off int, v uint64) func([]byte) { return func(b []byte) { le.PutUint64(b[off:], v) } }
	u16 := func(off int, v uint16) func([]byte) { return func(b []byte) { le.PutUint16(b[off:], v) } }
	B := BaseOffset
	root := p.inode(1)
	a, bIno, lnk, null, etc := p.ino("/etc/a"), p.ino("/etc/b"), p.ino("/etc/l"), p.ino("/dev/null"), p.ino("/etc")
	etcA, etcB := p.dirent("/etc", "a"), p.dirent("/etc", "b")
	xattrArea := p.ext() + extHeaderSize + int(im.count)*extRecordSize

	tests := []struct {
		name   string
		mutate func([]byte)
		rule   string // a piece of the error message naming the rule
	}{
		{"superblock magic", u32(0, 0), "superblock: bad magic"},
		{"superblock version", u32(4, 4), "superblock: version"},
		{"superblock block size", u32(12, 512), "superblock: block size"},
		{"superblock base_offset", u64(24, 8192), "base_offset"},
		{"superblock total_size past the bytes", u64(16, uint64(len(good))+4096), "total_size"},
		{"superblock base_size past total", u64(32, uint64(len(good))), "base_size"},
		{"branch table", u32(48, 1), "branch table"},
		{"base magic", u32(B, 1), "base superblock: bad magic"},
		{"base version", u32(B+4, 6), "base superblock: version"},
		{"base flags", u32(B+8, 1), "external backing file"},
		{"base block size", u32(B+12, 1024), "base superblock: block size"},
		{"base total_size", u64(B+16, 4096), "differs from base_size"},
		{"root inode", u32(B+36, 2), "root inode"},
		{"no inodes", u32(B+32, 0), "no inodes"},
		{"inode count past the image", u32(B+32, 1<<30), "inode table"},
		{"inode table offset", u64(B+24, uint64(len(good))), "inode table"},
		{"data_offset", u64(B+40, 1<<40), "data_offset"},
		{"ext version", u32(B+52, 9), "extension header: version"},
		{"ext flags", u32(B+56, 6), "unknown flags"},
		{"ext offset", u64(B+64, 1<<40), "extension block"},
		{"ext block magic", u32(p.ext(), 0), "extension block: bad magic"},
		{"ext record count", u32(p.ext()+8, 3), "records for"},
		{"ext record size", u32(p.ext()+12, 16), "record size"},
		{"ext xattr offset", u64(p.ext()+16, 8), "xattr area"},
		{"ino mismatch", u32(p.inode(a), 77), "slot holds ino"},
		{"nlink zero", u32(p.inode(a)+32, 0), "nlink 0"},
		{"unknown type", u32(p.inode(a)+4, 0o644), "unknown file type"},
		{"root not a directory", u32(root+4, ModeRegular|0o755), "root is not a directory"},
		{"unaligned file data", u64(p.inode(a)+24, 4097), "not 4096-aligned"},
		{"file data past the end", u64(p.inode(a)+16, 1<<30), "file data"},
		{"directory size", u64(p.inode(etc)+16, 272), "multiple of 271"},
		{"directory past the end", u64(p.inode(etc)+24, uint64(len(good))), "directory entries"},
		{"directory sizes add up", u64(p.inode(etc)+16, uint64(len(good))/271*271), "add up"},
		{"symlink empty", u64(p.inode(lnk)+16, 0), "symlink target length"},
		{"symlink not NUL terminated", func(b []byte) {
			in, _ := im.Inode(lnk)
			b[B+int(in.DataOffset)+1] = 'x'
		}, "NUL terminated"},
		{"symlink with NUL", func(b []byte) {
			in, _ := im.Inode(lnk)
			le.PutUint64(b[p.inode(lnk)+16:], 2)
			b[B+int(in.DataOffset)+2] = 0
		}, "NUL inside symlink"},
		{"device with size", u64(p.inode(null)+16, 1), "special file with size"},
		{"name length 0", u16(etcA+8, 0), "name length"},
		{"name length 256", u16(etcA+8, 256), "name length"},
		{"slash in name", func(b []byte) { b[etcA+16] = '/' }, "'/' or NUL"},
		{"NUL in name", func(b []byte) { b[etcA+16] = 0 }, "'/' or NUL"},
		{"dot entry", func(b []byte) { b[etcA+16] = '.' }, "no . or .."},
		{"dotdot entry", func(b []byte) { le.PutUint16(b[etcA+8:], 2); b[etcA+16], b[etcA+17] = '.', '.' }, "no . or .."},
		{"duplicate name", func(b []byte) { b[etcB+16] = 'a' }, "duplicate name"},
		{"unsorted entries", func(b []byte) { b[etcA+16] = 'c' }, "sorted by name"},
		{"duplicate name, unsorted image", func(b []byte) { le.PutUint32(b[B+56:], 0); b[etcB+16] = 'a' }, "duplicate name"},
		{"entry inode 0", u32(etcA, 0), "entry inode in range"},
		{"entry inode out of range", u32(etcA, 1000), "entry inode in range"},
		{"entry at an unused slot", func(b []byte) { clear(b[p.inode(bIno) : p.inode(bIno)+InodeSize]) }, "unused slot"},
		{"entry mode differs", u32(etcA+4, ModeRegular|0o600), "entry mode = inode mode"},
		{"entry points at root", func(b []byte) {
			le.PutUint32(b[etcA:], 1)
			le.PutUint32(b[etcA+4:], le.Uint32(b[root+4:]))
		}, "reached twice"},
		{"hard-linked directory", func(b []byte) {
			e := p.dirent("/", "empty")
			le.PutUint32(b[e:], etc)
		}, "reached twice"},
		{"file nlink", u32(p.inode(bIno)+32, 2), "nlink counts names"},
		{"directory nlink", u32(root+32, 9), "2 + "},
		{"unreachable inode", func(b []byte) {
			le.PutUint32(b[etcB:], a)
			le.PutUint32(b[etcB+4:], le.Uint32(b[p.inode(a)+4:]))
			le.PutUint32(b[p.inode(a)+32:], 3)
		}, "not reachable"},
		{"mtime nanoseconds", u32(p.rec(a)+8, 1e9), "mtime nanoseconds"},
		{"rdev on a file", u64(p.rec(a)+16, 5), "rdev only for devices"},
		{"xattr run not contiguous", u64(p.rec(bIno)+24, 1), "xattr runs contiguous"},
		{"xattr count too big", u32(p.rec(bIno)+12, 9), "xattr"},
		{"xattr name length 0", u16(xattrArea, 0), "name length 0"},
		{"xattrs unsorted", func(b []byte) { b[xattrArea+8+5] = 'z' }, "xattrs sorted"},
		{"xattr value past the area", u32(xattrArea+4, 1<<16), "xattr"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := append([]byte(nil), good...)
			tc.mutate(b)
			err := Validate(b)
			if err == nil {
				t.Fatal("corruption accepted")
			}
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error %v does not wrap ErrCorrupt", err)
			}
			if !strings.Contains(err.Error(), tc.rule) {
				t.Fatalf("error %q does not name the rule %q", err, tc.rule)
			}
			exercise(b) // accessors must not panic on it either
		})
	}
}

// exercise calls every accessor over every inode; it must never panic.
func exercise(b []byte) {
	im, err := Open(b)
	if err != nil {
		return
	}
	im.InodeCount()
	im.TotalSize()
	im.HasExtension()
	for ino := uint32(0); ino <= im.InodeCount()+1; ino++ {
		im.Inode(ino)
		im.ModTime(ino)
		im.Rdev(ino)
		im.Xattrs(ino)
		im.Readlink(ino)
		im.Data(ino)
		if n, err := im.DirentCount(ino); err == nil {
			for i := -1; i <= n && i < 5000; i++ {
				if d, err := im.DirentAt(ino, i); err == nil {
					im.Lookup(ino, d.Name)
				}
			}
			im.ReadDir(ino)
			im.Lookup(ino, "a")
		}
	}
	im.LookupPath("/etc/a")
	im.Tree()
}

func TestValidateShortInputs(t *testing.T) {
	good := goodImage(t)
	for _, n := range []int{0, 1, 4095, 4096, 8191, 8192, len(good) - 4096, len(good) - 1} {
		if err := Validate(good[:n]); !errors.Is(err, ErrCorrupt) {
			t.Fatalf("truncated to %d bytes: %v", n, err)
		}
		exercise(good[:n])
	}
}

func TestUpstreamUnusedSlots(t *testing.T) {
	im, err := Open(readFixture(t, "static.daxfs"))
	if err != nil {
		t.Fatal(err)
	}
	if im.Sorted() || im.HasExtension() {
		t.Fatal("upstream image claims our extension")
	}
	for _, ino := range []uint32{180, 181} {
		if _, err := im.Inode(ino); !errors.Is(err, ErrNotExist) {
			t.Fatalf("unused slot %d: %v", ino, err)
		}
	}
	if in := mustLookup(t, im, "/usr/lib"); in.Size != 151*271 {
		t.Fatalf("/usr/lib size %d", in.Size)
	}
	if in := mustLookup(t, im, "/usr/bin/hl1"); in.Nlink != 3 || in != mustLookup(t, im, "/etc/hl3") {
		t.Fatal("hard links do not share an inode")
	}
	if _, ok := im.ModTime(1); ok {
		t.Fatal("ModTime without an extension block")
	}
	exercise(im.Bytes())
}

func TestValidateErrorNamesPath(t *testing.T) {
	good := goodImage(t)
	im, _ := Open(good)
	p := imgPos{img: good, im: im, t: t}
	a := p.ino("/etc/a")
	b := append([]byte(nil), good...)
	le.PutUint64(b[p.inode(a)+24:], 4097)
	err := Validate(b)
	if err == nil || !strings.Contains(err.Error(), "/etc/") || !strings.Contains(err.Error(), "4096-aligned") {
		t.Fatalf("error %v does not name the path and rule", err)
	}
	b = append([]byte(nil), good...)
	e := p.dirent("/etc", "b")
	le.PutUint32(b[e+4:], 0)
	if err := Validate(b); err == nil || !strings.Contains(err.Error(), "/etc/b") {
		t.Fatalf("error %v does not name /etc/b", err)
	}
}
