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
	for d := 0; d < dirs; d++ {
		for i := 0; i < perDir; i++ {
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
