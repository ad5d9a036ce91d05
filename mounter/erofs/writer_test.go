package erofs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

type entry struct {
	h    daxfs.Header
	data []byte
}

// buildImage writes a DAXFS image of entries and returns its bytes.
func buildImage(t testing.TB, entries []entry) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "image")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	for _, e := range entries {
		h := e.h
		h.Size = int64(len(e.data))
		if err := w.Add(&h, bytes.NewReader(e.data)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := w.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestWriteErrors(t *testing.T) {
	file := func(p string, data string) entry {
		return entry{h: daxfs.Header{Path: p, Mode: daxfs.ModeRegular | 0o644}, data: []byte(data)}
	}
	base := []entry{file("dir/a", "aaaa"), file("b", "bb")}
	withXattr := func(name string, v []byte) []entry {
		e := file("dir/x", "x")
		e.h.Xattrs = map[string][]byte{name: v}
		return append(base, e)
	}
	// shift moves the data of path by delta bytes in the inode table.
	shift := func(path string, delta uint64) func(*testing.T, []byte) {
		return func(t *testing.T, img []byte) {
			im, err := daxfs.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			in, err := im.LookupPath(path)
			if err != nil {
				t.Fatal(err)
			}
			b := img[daxfs.BaseOffset:]
			off := binary.LittleEndian.Uint64(b[24:]) + uint64(in.Ino-1)*daxfs.InodeSize + 24
			binary.LittleEndian.PutUint64(b[off:], in.DataOffset+delta)
		}
	}
	for _, tc := range []struct {
		name    string
		entries []entry
		mutate  func(*testing.T, []byte)
		opts    func(size int64) Options
		want    error
		mention []string
	}{
		{name: "unaligned data", entries: base, mutate: shift("dir/a", 512), want: ErrUnaligned, mention: []string{"/dir/a"}},
		{name: "unknown xattr prefix", entries: withXattr("foo.bar", []byte("v")), want: ErrUnsupported, mention: []string{"/dir/x", "foo.bar"}},
		{name: "empty xattr suffix", entries: withXattr("user.", []byte("v")), want: ErrUnsupported, mention: []string{"/dir/x"}},
		{name: "xattr value too big", entries: withXattr("user.big", make([]byte, 65536)), want: ErrUnsupported, mention: []string{"/dir/x", "user.big"}},
		{name: "device number too big", entries: append(base, entry{h: daxfs.Header{Path: "dev", Mode: daxfs.ModeChar | 0o600, Rdev: unix.Mkdev(4096, 1)}}), want: ErrUnsupported, mention: []string{"/dev", "4096:1"}},
		{name: "data past the image", entries: base, mutate: shift("b", 1<<20), opts: func(size int64) Options { return Options{DataOffset: 8192, DataSize: 8192 + size + 2<<20} }, want: ErrInvalid, mention: []string{"/b", "past the image"}},
		{name: "data past the device", entries: base, opts: func(size int64) Options { return Options{DataOffset: 0, DataSize: 4096} }, want: ErrInvalid, mention: []string{"past the data device"}},
		{name: "unaligned image offset", entries: base, opts: func(size int64) Options { return Options{DataOffset: 100, DataSize: 1 << 20} }, want: ErrInvalid},
		{name: "negative image offset", entries: base, opts: func(size int64) Options { return Options{DataOffset: -4096, DataSize: 1 << 20} }, want: ErrInvalid},
		{name: "no device size", entries: base, opts: func(size int64) Options { return Options{} }, want: ErrInvalid},
		{name: "device too large", entries: base, opts: func(size int64) Options { return Options{DataSize: 1 << 44} }, want: ErrUnsupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := buildImage(t, tc.entries)
			if tc.mutate != nil {
				tc.mutate(t, img)
			}
			im, err := daxfs.Open(img)
			if err != nil {
				t.Fatal(err)
			}
			opts := Options{DataOffset: 8192, DataSize: 8192 + int64(len(img))}
			if tc.opts != nil {
				opts = tc.opts(int64(len(img)))
			}
			var out bytes.Buffer
			n, err := Write(&out, im, opts)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Write = %v, want %v", err, tc.want)
			}
			for _, m := range tc.mention {
				if !strings.Contains(err.Error(), m) {
					t.Errorf("error %q does not mention %q", err, m)
				}
			}
			if n != 0 || out.Len() != 0 {
				t.Errorf("a failed Write wrote %d bytes (returned %d)", out.Len(), n)
			}
		})
	}
}

// TestWriteDeterministic: the same image and placement give the same
// bytes; another placement changes the chunk addresses and the uuid.
func TestWriteDeterministic(t *testing.T) {
	img := buildImage(t, []entry{{h: daxfs.Header{Path: "f", Mode: daxfs.ModeRegular | 0o644}, data: []byte("data")}})
	im, err := daxfs.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	write := func(off int64) []byte {
		var b bytes.Buffer
		if _, err := Write(&b, im, Options{DataOffset: off, DataSize: 1 << 30}); err != nil {
			t.Fatal(err)
		}
		return b.Bytes()
	}
	a, b, c := write(4096), write(4096), write(8192)
	if !bytes.Equal(a, b) {
		t.Error("two writes of the same image differ")
	}
	if bytes.Equal(a, c) || bytes.Equal(a[superOff+48:superOff+64], c[superOff+48:superOff+64]) {
		t.Error("images at different offsets have the same bytes or uuid")
	}
	if le.Uint32(a[superOff:]) != superMagic || len(a)%blockSize != 0 {
		t.Errorf("no superblock magic, or %d bytes", len(a))
	}
}

func TestEncodeDev(t *testing.T) {
	for _, tc := range []struct{ major, minor uint32 }{{0, 0}, {1, 3}, {8, 17}, {259, 0}, {511, 300000}, {4095, 1<<20 - 1}} {
		got, err := encodeDev(unix.Mkdev(tc.major, tc.minor))
		if err != nil {
			t.Fatal(err)
		}
		// The kernel's new_decode_dev.
		major := (got & 0xfff00) >> 8
		minor := (got & 0xff) | ((got >> 12) & 0xfff00)
		if major != tc.major || minor != tc.minor {
			t.Errorf("encodeDev(%d:%d) decodes to %d:%d", tc.major, tc.minor, major, minor)
		}
	}
	for _, bad := range []uint64{unix.Mkdev(4096, 0), unix.Mkdev(0, 1<<20)} {
		if _, err := encodeDev(bad); !errors.Is(err, ErrUnsupported) {
			t.Errorf("encodeDev(%d:%d) = %v, want ErrUnsupported", unix.Major(bad), unix.Minor(bad), err)
		}
	}
}

func TestEncodeXattrs(t *testing.T) {
	got, err := encodeXattrs([]daxfs.Xattr{
		{Name: "security.capability", Value: []byte{1, 2, 3}},
		{Name: "system.posix_acl_access", Value: []byte{9}},
		{Name: "system.posix_acl_default", Value: nil},
		{Name: "trusted.t", Value: []byte("tt")},
		{Name: "user.u", Value: []byte("v")},
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []byte{
		10, 6, 3, 0, 'c', 'a', 'p', 'a', 'b', 'i', 'l', 'i', 't', 'y', 1, 2, 3, 0, 0, 0,
		0, 2, 1, 0, 9, 0, 0, 0,
		0, 3, 0, 0,
		1, 4, 2, 0, 't', 't', 't', 0,
		1, 1, 1, 0, 'u', 'v', 0, 0,
	}
	if !bytes.Equal(got, want) {
		t.Errorf("encodeXattrs =\n%v\nwant\n%v", got, want)
	}
	for _, bad := range []string{"system.posix_acl_accessX", "system.other", "lustre.x", "user", "security."} {
		if _, err := encodeXattrs([]daxfs.Xattr{{Name: bad}}); !errors.Is(err, ErrUnsupported) {
			t.Errorf("xattr %q: %v, want ErrUnsupported", bad, err)
		}
	}
}

// FuzzWrite: Write never panics on an image daxfs.Open accepts, however
// corrupt (cycles, dangling entries, bad sizes), and what it writes has a
// superblock and whole blocks.
func FuzzWrite(f *testing.F) {
	f.Add(buildImage(f, []entry{
		{h: daxfs.Header{Path: "d/f", Mode: daxfs.ModeRegular | 0o644, Xattrs: map[string][]byte{"user.a": []byte("1")}}, data: []byte("hello")},
		{h: daxfs.Header{Path: "d/l", Mode: daxfs.ModeSymlink | 0o777, Linkname: "f"}},
		{h: daxfs.Header{Path: "c", Mode: daxfs.ModeChar | 0o600, Rdev: unix.Mkdev(1, 3)}},
		{h: daxfs.Header{Path: "e", Mode: daxfs.ModeDir | 0o755}},
	}))
	f.Fuzz(func(t *testing.T, img []byte) {
		im, err := daxfs.Open(img)
		if err != nil {
			return
		}
		var out bytes.Buffer
		n, err := Write(&out, im, Options{DataOffset: 4096, DataSize: 4096 + alignUp(int64(len(img)), blockSize)})
		if err != nil {
			if n != 0 || out.Len() != 0 {
				t.Fatalf("failed Write wrote %d bytes", out.Len())
			}
			return
		}
		b := out.Bytes()
		if int64(len(b)) != n || n%blockSize != 0 || le.Uint32(b[superOff:]) != superMagic {
			t.Fatalf("Write returned %d, wrote %d bytes, magic %#x", n, len(b), le.Uint32(b[superOff:]))
		}
	})
}
