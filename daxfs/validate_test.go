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

func (p imgPos) ext() int { return BaseOffset + int(bsExtOffset.get(p.img[BaseOffset:])) }

func (p imgPos) rec(ino uint32) int { return p.ext() + extHeaderSize + int(ino-1)*extRecordSize }

func TestValidateRejectsCorruption(t *testing.T) {
	good := goodImage(t)
	if err := Validate(good); err != nil {
		t.Fatalf("good image: %v", err)
	}
	im, _ := Open(good)
	p := imgPos{img: good, im: im, t: t}
	// set32(rec, f, v) sets field f of the record at image offset rec.
	set32 := func(rec int, f u32, v uint32) func([]byte) { return func(b []byte) { f.put(b[rec:], v) } }
	set64 := func(rec int, f u64, v uint64) func([]byte) { return func(b []byte) { f.put(b[rec:], v) } }
	set16 := func(rec int, f u16, v uint16) func([]byte) { return func(b []byte) { f.put(b[rec:], v) } }
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
		{"superblock magic", set32(0, sbMagic, 0), "superblock: bad magic"},
		{"superblock version", set32(0, sbVersion, 4), "superblock: version"},
		{"superblock block size", set32(0, sbBlockSize, 512), "superblock: block size"},
		{"superblock base_offset", set64(0, sbBaseOffset, 8192), "base_offset"},
		{"superblock total_size past the bytes", set64(0, sbTotalSize, uint64(len(good))+4096), "total_size"},
		{"superblock base_size past total", set64(0, sbBaseSize, uint64(len(good))), "base_size"},
		{"branch table", set32(0, sbBranchTableEntries, 1), "branch table"},
		{"base magic", set32(B, bsMagic, 1), "base superblock: bad magic"},
		{"base version", set32(B, bsVersion, 6), "base superblock: version"},
		{"base flags", set32(B, bsFlags, 1), "external backing file"},
		{"base block size", set32(B, bsBlockSize, 1024), "base superblock: block size"},
		{"base total_size", set64(B, bsTotalSize, 4096), "differs from base_size"},
		{"root inode", set32(B, bsRootIno, 2), "root inode"},
		{"no inodes", set32(B, bsInodeCount, 0), "no inodes"},
		{"inode count past the image", set32(B, bsInodeCount, 1<<30), "inode table"},
		{"inode table offset", set64(B, bsInodeOff, uint64(len(good))), "inode table"},
		{"data_offset", set64(B, bsDataOff, 1<<40), "data_offset"},
		{"ext version", set32(B, bsExtVersion, 9), "extension header: version"},
		{"ext flags", set32(B, bsExtFlags, 6), "unknown flags"},
		{"ext offset", set64(B, bsExtOffset, 1<<40), "extension block"},
		{"ext block magic", set32(p.ext(), ehMagic, 0), "extension block: bad magic"},
		{"ext record count", set32(p.ext(), ehInodeCount, 3), "records for"},
		{"ext record size", set32(p.ext(), ehRecordSize, 16), "record size"},
		{"ext xattr offset", set64(p.ext(), ehXattrOff, 8), "xattr area"},
		{"ino mismatch", set32(p.inode(a), inIno, 77), "slot holds ino"},
		{"nlink zero", set32(p.inode(a), inNlink, 0), "nlink 0"},
		{"unknown type", set32(p.inode(a), inMode, 0o644), "unknown file type"},
		{"root not a directory", set32(root, inMode, ModeRegular|0o755), "root is not a directory"},
		{"unaligned file data", set64(p.inode(a), inData, 4097), "not 4096-aligned"},
		{"file data past the end", set64(p.inode(a), inSize, 1<<30), "file data"},
		{"directory size", set64(p.inode(etc), inSize, 272), "multiple of 271"},
		{"directory past the end", set64(p.inode(etc), inData, uint64(len(good))), "directory entries"},
		{"directory sizes add up", set64(p.inode(etc), inSize, uint64(len(good))/271*271), "add up"},
		{"symlink empty", set64(p.inode(lnk), inSize, 0), "symlink target length"},
		{"symlink not NUL terminated", func(b []byte) {
			in, _ := im.Inode(lnk)
			b[B+int(in.DataOffset)+1] = 'x'
		}, "NUL terminated"},
		{"symlink with NUL", func(b []byte) {
			in, _ := im.Inode(lnk)
			inSize.put(b[p.inode(lnk):], 2)
			b[B+int(in.DataOffset)+2] = 0
		}, "NUL inside symlink"},
		{"device with size", set64(p.inode(null), inSize, 1), "special file with size"},
		{"name length 0", set16(etcA, deNameLen, 0), "name length"},
		{"name length 256", set16(etcA, deNameLen, 256), "name length"},
		{"slash in name", func(b []byte) { b[etcA+direntName] = '/' }, "'/' or NUL"},
		{"NUL in name", func(b []byte) { b[etcA+direntName] = 0 }, "'/' or NUL"},
		{"dot entry", func(b []byte) { b[etcA+direntName] = '.' }, "no . or .."},
		{"dotdot entry", func(b []byte) { deNameLen.put(b[etcA:], 2); b[etcA+direntName], b[etcA+direntName+1] = '.', '.' }, "no . or .."},
		{"duplicate name", func(b []byte) { b[etcB+direntName] = 'a' }, "duplicate name"},
		{"unsorted entries", func(b []byte) { b[etcA+direntName] = 'c' }, "sorted by name"},
		{"duplicate name, unsorted image", func(b []byte) { bsExtFlags.put(b[B:], 0); b[etcB+direntName] = 'a' }, "duplicate name"},
		{"entry inode 0", set32(etcA, deIno, 0), "entry inode in range"},
		{"entry inode out of range", set32(etcA, deIno, 1000), "entry inode in range"},
		{"entry at an unused slot", func(b []byte) { clear(b[p.inode(bIno) : p.inode(bIno)+InodeSize]) }, "unused slot"},
		{"entry mode differs", set32(etcA, deMode, ModeRegular|0o600), "entry mode = inode mode"},
		{"entry points at root", func(b []byte) {
			deIno.put(b[etcA:], 1)
			deMode.put(b[etcA:], inMode.get(b[root:]))
		}, "reached twice"},
		{"hard-linked directory", func(b []byte) {
			e := p.dirent("/", "empty")
			deIno.put(b[e:], etc)
		}, "reached twice"},
		{"file nlink", set32(p.inode(bIno), inNlink, 2), "nlink counts names"},
		{"directory nlink", set32(root, inNlink, 9), "2 + "},
		{"unreachable inode", func(b []byte) {
			deIno.put(b[etcB:], a)
			deMode.put(b[etcB:], inMode.get(b[p.inode(a):]))
			inNlink.put(b[p.inode(a):], 3)
		}, "not reachable"},
		{"mtime nanoseconds", set32(p.rec(a), erMtimeNsec, 1e9), "mtime nanoseconds"},
		{"rdev on a file", set64(p.rec(a), erRdev, 5), "rdev only for devices"},
		{"xattr run not contiguous", set64(p.rec(bIno), erXattrOff, 1), "xattr runs contiguous"},
		{"xattr count too big", set32(p.rec(bIno), erXattrCount, 9), "xattr"},
		{"xattr name length 0", set16(xattrArea, xaNameLen, 0), "name length 0"},
		{"xattrs unsorted", func(b []byte) { b[xattrArea+xattrHdrSize+5] = 'z' }, "xattrs sorted"},
		{"xattr value past the area", set32(xattrArea, xaValueLen, 1<<16), "xattr"},
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
	inData.put(b[p.inode(a):], 4097)
	err := Validate(b)
	if err == nil || !strings.Contains(err.Error(), "/etc/") || !strings.Contains(err.Error(), "4096-aligned") {
		t.Fatalf("error %v does not name the path and rule", err)
	}
	b = append([]byte(nil), good...)
	e := p.dirent("/etc", "b")
	deMode.put(b[e:], 0)
	if err := Validate(b); err == nil || !strings.Contains(err.Error(), "/etc/b") {
		t.Fatalf("error %v does not name /etc/b", err)
	}
}
