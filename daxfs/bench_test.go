package daxfs

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"testing"
	"time"
)

// benchImage builds an image of n small files spread over directories.
func benchImage(b *testing.B, n int) ([]byte, []string) {
	var paths []string
	img := buildImage(b, WriterOptions{}, func(w *Writer) {
		data := make([]byte, 100)
		for i := range n {
			p := fmt.Sprintf("usr/share/d%03d/file-%06d.txt", i%200, i)
			paths = append(paths, "/"+p)
			if err := w.Add(&Header{Path: p, Mode: ModeRegular | 0o644, Size: 100, ModTime: time.Unix(int64(i), 0)}, bytes.NewReader(data)); err != nil {
				b.Fatal(err)
			}
		}
	})
	return img, paths
}

// BenchmarkWriter: 20,000 files of 100 bytes (a Debian rootfs has about
// as many entries) written into memory; reports ns and allocations per
// entry.
func BenchmarkWriter(b *testing.B) {
	const n = 20000
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("usr/share/d%03d/file-%06d.txt", i%200, i)
	}
	data := make([]byte, 100)
	out := NewWindow(prefaulted(4096 * (n + 2000)))
	var r bytes.Reader
	h := Header{Mode: ModeRegular | 0o644, Size: 100}
	b.ReportAllocs()
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		w := NewWriter(out, WriterOptions{})
		for i := range n {
			h.Path = names[i]
			r.Reset(data)
			if err := w.Add(&h, &r); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/entry")
}

func BenchmarkValidate(b *testing.B) {
	img, _ := benchImage(b, 20000)
	b.SetBytes(int64(len(img)))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := Validate(img); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkLookup(b *testing.B) {
	img, paths := benchImage(b, 20000)
	im, err := Open(img)
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := im.LookupPath(paths[i%len(paths)]); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkWriterMemory adds 500,000 empty files (the largest images we
// expect) and reports the Writer's heap per entry before Close.
func BenchmarkWriterMemory(b *testing.B) {
	const n = 500000
	h := Header{Mode: ModeRegular | 0o644}
	for it := 0; it < b.N; it++ {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		var f memFile
		w := NewWriter(&f, WriterOptions{})
		for i := range n {
			h.Path = fmt.Sprintf("usr/lib/d%04d/file-%07d.so", i%1000, i)
			if err := w.Add(&h, nil); err != nil {
				b.Fatal(err)
			}
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/n, "heapB/entry")
		runtime.KeepAlive(w)
	}
}

// rootfsTar finds the debootstrap rootfs tar that scripts cache under the
// module root's .cache (built once, never downloaded by a test).
func rootfsTar(b *testing.B) []byte {
	dir, _ := os.Getwd()
	for ; dir != "/"; dir = filepath.Dir(dir) {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			break
		}
	}
	data, err := os.ReadFile(filepath.Join(dir, ".cache/rootfs/debian-bookworm-minbase.tar"))
	if err != nil {
		b.Skipf("no cached rootfs tar: %v", err)
	}
	return data
}

// BenchmarkWriterRootfsTar converts the cached Debian minbase rootfs tar
// (about 6,800 entries, 200 MB) from memory into a Window: the converter's
// hot path without decompression.
func BenchmarkWriterRootfsTar(b *testing.B) {
	data := rootfsTar(b)
	out := NewWindow(prefaulted(2 * len(data)))
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	b.ResetTimer()
	var entries int
	for it := 0; it < b.N; it++ {
		w := NewWriter(out, WriterOptions{})
		tr := tar.NewReader(bytes.NewReader(data))
		entries = 0
		for {
			h, err := tr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				b.Fatal(err)
			}
			entries++
			if h.Typeflag == tar.TypeLink {
				if err := w.Link(h.Name, h.Linkname, nil); err != nil {
					b.Fatal(err)
				}
				continue
			}
			hd := &Header{Path: h.Name, Mode: tarMode(h), UID: uint32(h.Uid), GID: uint32(h.Gid), Size: h.Size,
				Linkname: h.Linkname, ModTime: h.ModTime, Rdev: uint64(h.Devmajor)<<8 | uint64(h.Devminor)}
			if err := w.Add(hd, tr); err != nil {
				b.Fatal(err)
			}
		}
		n, err := w.Close()
		if err != nil {
			b.Fatal(err)
		}
		if it == 0 {
			if err := Validate(out.Bytes()[:n]); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*entries), "ns/entry")
}

// BenchmarkWriterView builds a 20,000-entry view: metadata only, every
// file external (what the snapshotter does per container chain).
func BenchmarkWriterView(b *testing.B) {
	const n = 20000
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("usr/share/d%03d/file-%06d.txt", i/100, i)
	}
	out := NewWindow(prefaulted(16 << 20))
	h := Header{Mode: ModeRegular | 0o644, Size: 100}
	b.ReportAllocs()
	b.ResetTimer()
	for it := 0; it < b.N; it++ {
		w := NewWriter(out, WriterOptions{})
		for i := range n {
			h.Path = names[i]
			if err := w.AddExternal(&h, 0, uint64(i+1)*BlockSize); err != nil {
				b.Fatal(err)
			}
		}
		size, err := w.Layout()
		if err != nil {
			b.Fatal(err)
		}
		window := uint64(size) + (n+2)*BlockSize
		if err := w.SetExternalBases([]uint64{uint64(size)}, window); err != nil {
			b.Fatal(err)
		}
		if _, err := w.Close(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*n), "ns/entry")
}

// prefaulted returns a buffer whose pages are already mapped, so that the
// first iteration does not pay for page faults the others do not see (they
// are very expensive in a VM).
func prefaulted(n int) []byte {
	b := make([]byte, n)
	for i := 0; i < n; i += 4096 {
		b[i] = 1
	}
	return b
}
