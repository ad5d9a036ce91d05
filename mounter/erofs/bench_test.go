package erofs

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// BenchmarkWrite measures building the EROFS metadata of a view-style
// image of 50,000 files in 500 directories (about a large container
// image), which the mounter does before every erofs mount. The files'
// data lies outside the image (a sparse window), as in a view.
func BenchmarkWrite(b *testing.B) {
	const dirs, perDir = 500, 100
	p := filepath.Join(b.TempDir(), "image")
	f, err := os.Create(p)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	for d := range dirs {
		for i := range perDir {
			h := &daxfs.Header{Path: fmt.Sprintf("usr/lib/d%03d/file-%03d.so", d, i), Mode: daxfs.ModeRegular | 0o644, Size: 10000,
				Xattrs: map[string][]byte{"security.selinux": []byte("system_u:object_r:lib_t:s0")}}
			if err := w.AddExternal(h, 0, uint64(d*perDir+i)*3*4096); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Add(&daxfs.Header{Path: fmt.Sprintf("usr/lib/d%03d/link", d), Mode: daxfs.ModeSymlink | 0o777, Linkname: "file-000.so"}, nil); err != nil {
			b.Fatal(err)
		}
	}
	n, err := w.Layout()
	if err != nil {
		b.Fatal(err)
	}
	base := uint64(n+4095) &^ 4095
	window := base + 4096 + dirs*perDir*3*4096
	if err := w.SetExternalBases([]uint64{base}, window); err != nil {
		b.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		b.Fatal(err)
	}
	if err := f.Truncate(int64(window)); err != nil {
		b.Fatal(err)
	}
	win, err := unix.Mmap(int(f.Fd()), 0, int(window), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(win)
	im, err := daxfs.Open(win)
	if err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	var size int64
	for i := 0; i < b.N; i++ {
		if size, err = Write(io.Discard, im, Options{DataOffset: 1 << 20, DataSize: 1<<20 + int64(window)}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(size), "image-bytes")
	b.ReportMetric(float64(n), "daxfs-meta-bytes")
}

// BenchmarkWarmRead reads a 256 MiB file sequentially through an erofs
// mount of a DAXFS image (chunk-based file on the region's loop device),
// with the page cache warm, and, for reference, the same bytes from the
// region file itself (tmpfs) and from a copy on the root file system.
func BenchmarkWarmRead(b *testing.B) {
	const size = 256 << 20
	dir := shmDir(b)
	img := filepath.Join(dir, "image.daxfs")
	f, err := os.Create(img)
	if err != nil {
		b.Fatal(err)
	}
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	data := make([]byte, size)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := w.Add(&daxfs.Header{Path: "big", Mode: daxfs.ModeRegular | 0o644, Size: size}, bytesReader(data)); err != nil {
		b.Fatal(err)
	}
	if _, err := w.Close(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	raw, err := os.ReadFile(img)
	if err != nil {
		b.Fatal(err)
	}
	os.Remove(img)
	r := placeImage(b, dir, raw, 4*blockSize, 0)
	mnt := mountErofs(b, writeMeta(b, dir, r), r.path)
	disk := filepath.Join(b.TempDir(), "big")
	if err := os.WriteFile(disk, data, 0o644); err != nil {
		b.Fatal(err)
	}
	buf := make([]byte, 1<<20)
	read := func(b *testing.B, p string, off int64) {
		f, err := os.Open(p)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		for i := 0; i <= b.N; i++ { // one warming pass first
			if i == 1 {
				b.ResetTimer()
			}
			for o := int64(0); o < size; o += int64(len(buf)) {
				if _, err := f.ReadAt(buf, off+o); err != nil {
					b.Fatal(err)
				}
			}
		}
		b.SetBytes(size)
	}
	im, _ := daxfs.Open(mustRead(b, r))
	in, _ := im.LookupPath("big")
	b.Run("erofs", func(b *testing.B) { read(b, filepath.Join(mnt, "big"), 0) })
	b.Run("region-tmpfs", func(b *testing.B) { read(b, r.path, r.off+daxfs.BaseOffset+int64(in.DataOffset)) })
	b.Run("rootfs-file", func(b *testing.B) { read(b, disk, 0) })
}

func bytesReader(b []byte) io.Reader { return &sliceReader{b} }

type sliceReader struct{ b []byte }

func (s *sliceReader) Read(p []byte) (int, error) {
	if len(s.b) == 0 {
		return 0, io.EOF
	}
	n := copy(p, s.b)
	s.b = s.b[n:]
	return n, nil
}

func mustRead(b *testing.B, r region) []byte {
	raw, err := os.ReadFile(r.path)
	if err != nil {
		b.Fatal(err)
	}
	return raw[r.off:]
}
