package erofs

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/internal/mtest"
)

// shmDir is a fresh directory in /dev/shm (where the region lives in
// production), removed at the end of the test.
func shmDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("/dev/shm", "erofs-test-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// region is a DAXFS image placed inside a bigger file, as in the shared
// region: the image's byte 0 at off.
type region struct {
	path string
	off  int64
	size int64
	img  []byte
}

// placeImage writes img at off into a new region file of at least size
// bytes (rounded up to cover the image and to 4096).
func placeImage(t testing.TB, dir string, img []byte, off, size int64) region {
	t.Helper()
	p := filepath.Join(dir, "region")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(img, off); err != nil {
		t.Fatal(err)
	}
	size = max(size, off+int64(len(img)))
	size = (size + blockSize - 1) &^ (blockSize - 1)
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return region{path: p, off: off, size: size, img: img}
}

// writeMeta writes the EROFS image of the region's DAXFS image to a file.
func writeMeta(t testing.TB, dir string, r region) string {
	t.Helper()
	im, err := daxfs.Open(r.img)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "meta.erofs")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := Write(f, im, Options{DataOffset: r.off, DataSize: r.size})
	if err != nil {
		t.Fatalf("Write: %v", err)
	}
	if fi, _ := f.Stat(); fi.Size() != n || n%blockSize != 0 {
		t.Fatalf("Write returned %d, file has %d bytes", n, fi.Size())
	}
	return p
}

// attachLoop attaches file read-only to a free loop device; cleanup
// detaches it.
func attachLoop(t testing.TB, file string) string {
	t.Helper()
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", file).CombinedOutput()
	if err != nil {
		t.Fatalf("losetup %s: %v: %s", file, err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup -d %s: %v: %s", dev, err, out)
		}
	})
	return dev
}

// mountErofs mounts the metadata image with the region as its extra
// device and returns the mount point; cleanup unmounts (before the loop
// devices are detached).
func mountErofs(t testing.TB, meta, data string) string {
	t.Helper()
	dataDev := attachLoop(t, data)
	metaDev := attachLoop(t, meta)
	mnt := filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount(metaDev, mnt, "erofs", unix.MS_RDONLY, "device="+dataDev); err != nil {
		t.Fatalf("mount erofs %s (device=%s) on %s: %v\n%s", metaDev, dataDev, mnt, err, dmesgTail())
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	return mnt
}

func dmesgTail() string {
	out, _ := exec.Command("dmesg").Output()
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	return "dmesg:\n" + strings.Join(lines[max(0, len(lines)-8):], "\n")
}

// treeSetup builds the conformance tree, its DAXFS image placed at a
// nonzero offset of a region, the EROFS image, and mounts it.
type treeSetup struct {
	src, mnt, meta string
	r              region
}

func mountTree(t *testing.T, write func(testing.TB, string)) treeSetup {
	t.Helper()
	testenv.RequireRoot(t)
	dir := shmDir(t)
	src := filepath.Join(t.TempDir(), "src")
	write(t, src)
	imgPath := filepath.Join(dir, "image.daxfs")
	if err := mtest.ImageFromDir(src, imgPath); err != nil {
		t.Fatal(err)
	}
	img, err := os.ReadFile(imgPath)
	if err != nil {
		t.Fatal(err)
	}
	os.Remove(imgPath)
	// 3 blocks of something else before the image, 5 after.
	r := placeImage(t, dir, img, 3*blockSize, 3*blockSize+int64(len(img))+5*blockSize)
	meta := writeMeta(t, dir, r)
	return treeSetup{src: src, mnt: mountErofs(t, meta, r.path), meta: meta, r: r}
}

func TestSmoke(t *testing.T) {
	s := mountTree(t, mtest.WriteTree)
	want, err := testenv.Snapshot(s.src)
	if err != nil {
		t.Fatal(err)
	}
	got, err := testenv.Snapshot(s.mnt)
	if err != nil {
		t.Fatal(err)
	}
	if d := testenv.Diff(want, got); len(d) > 0 {
		t.Errorf("mounted tree differs from the source:\n%s", strings.Join(d, "\n"))
	}
	_ = bytes.Equal
	_ = fmt.Sprint
}
