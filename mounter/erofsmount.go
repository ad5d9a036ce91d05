package mounter

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
	"unsafe"

	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/erofs"
)

// EROFSFSType is the file system type of erofs mounts in mountinfo.
const EROFSFSType = "erofs"

// erofsMounter mounts DAXFS images with the kernel's erofs, where the
// daxfs module is absent: for each mount it writes a small EROFS metadata
// image (package erofs) whose files point at the DAXFS image's data in the
// region file, attaches that image and the region file to loop devices,
// and mounts erofs on them with the region as erofs's extra device. File
// data is never copied into a second image; the kernel reads it from the
// region file. Against FUSE this gives kernel-speed metadata and reads
// (erofs caches in large folios, FUSE here in 4 KiB pages) and mounts that
// need no serving process: they outlive every daemon by construction.
//
// Both loop devices are set to autoclear, so they detach by themselves
// once the mount (and any overlay still using it) is gone; Unmount is a
// lazy detach, as for the other kinds.
type erofsMounter struct {
	// dir holds the metadata images between writing one and attaching
	// it to its loop device (then it is unlinked: the loop device keeps
	// it). Mounted recognises our mounts by it (metadataDevIn): their
	// metadata loop device's backing file lies in dir.
	dir      string
	validate bool
}

// erofsDirName is the default directory, under the FUSE state directory,
// of the metadata images.
const erofsDirName = "erofs"

// newEROFS returns the erofs mounter with its metadata images in dir. It
// fails, with errdefs.ErrNotImplemented, unless
// /proc/filesystems lists erofs and loop devices work: it mounts a tiny
// image once to find out (a container without loop devices, or a kernel
// without erofs, gets the FUSE mounter in auto mode).
func newEROFS(ctx context.Context, dir string, validate bool) (*erofsMounter, error) {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return nil, err
	}
	if ok, err := hasFilesystem(b, EROFSFSType); err != nil || !ok {
		return nil, fmt.Errorf("%w: erofs is not in /proc/filesystems", errdefs.ErrNotImplemented)
	}
	if _, err := os.Stat("/dev/loop-control"); err != nil {
		return nil, fmt.Errorf("%w: no loop devices: %v", errdefs.ErrNotImplemented, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	// The kernel names a loop device's backing file by its resolved
	// path; Mounted compares against that.
	dir, err = resolve(dir)
	if err != nil {
		return nil, err
	}
	m := &erofsMounter{dir: dir, validate: validate}
	// Named metadata images (where O_TMPFILE is not supported) left by a
	// process that died between writing and attaching one are garbage;
	// attached ones are unlinked, and a minute covers one being attached
	// by a concurrent process.
	if old, err := filepath.Glob(filepath.Join(m.dir, "meta-*.erofs")); err == nil {
		for _, p := range old {
			if st, err := os.Stat(p); err == nil && time.Since(st.ModTime()) > time.Minute {
				_ = os.Remove(p)
			}
		}
	}
	if err := m.probe(ctx); err != nil {
		return nil, fmt.Errorf("%w: erofs over loop devices does not work here: %v", errdefs.ErrNotImplemented, err)
	}
	return m, nil
}

// probe mounts and unmounts a one-file image.
func (m *erofsMounter) probe(ctx context.Context) error {
	tmp, err := os.MkdirTemp(m.dir, "probe-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	img := filepath.Join(tmp, "image")
	f, err := os.Create(img)
	if err != nil {
		return err
	}
	w := daxfs.NewWriter(f, daxfs.WriterOptions{})
	const hello = "hello\n"
	if err := w.Add(&daxfs.Header{Path: "probe", Mode: daxfs.ModeRegular | 0o644, Size: int64(len(hello))}, strings.NewReader(hello)); err != nil {
		f.Close()
		return err
	}
	if _, err := w.Close(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	dir := filepath.Join(tmp, "mnt")
	if err := os.Mkdir(dir, 0o700); err != nil {
		return err
	}
	if err := m.Mount(ctx, Source{Path: img}, dir); err != nil {
		return err
	}
	got, rerr := os.ReadFile(filepath.Join(dir, "probe"))
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount probe: %w", err)
	}
	if rerr != nil {
		return rerr
	}
	if string(got) != hello {
		return fmt.Errorf("probe file reads %q, want %q", got, hello)
	}
	return nil
}

func (m *erofsMounter) Mount(ctx context.Context, src Source, target string) error {
	target, err := absTarget(target)
	if err != nil {
		return err
	}
	start := time.Now()
	meta, dataSize, err := m.writeMeta(src)
	if err != nil {
		return err
	}
	defer meta.Close()
	written := time.Since(start)
	metaDev, err := mount.SetupLoop(meta.path, mount.LoopParams{Readonly: true, Autoclear: true})
	if err != nil {
		return fmt.Errorf("image %s: loop device for its erofs metadata: %w", src, err)
	}
	defer metaDev.Close()
	dataDev, err := mount.SetupLoop(src.Path, mount.LoopParams{Readonly: true, Autoclear: true})
	if err != nil {
		return fmt.Errorf("image %s: loop device for %s: %w", src, src.Path, err)
	}
	defer dataDev.Close()
	// The loop device must cover every block the metadata points at.
	if n, err := blockDevSize(dataDev); err != nil || n < dataSize {
		return fmt.Errorf("image %s: loop device %s has %d bytes of %d (%v)", src, dataDev.Name(), n, dataSize, err)
	}
	attached := time.Since(start)
	data := "device=" + dataDev.Name()
	if err := unix.Mount(metaDev.Name(), target, EROFSFSType, unix.MS_RDONLY, data); err != nil {
		return fmt.Errorf("mount -t erofs -o ro,%s %s %s (image %s): %w", data, metaDev.Name(), target, src, err)
	}
	// Closing both descriptors (deferred) leaves the mount the only
	// user of the loop devices: they detach when it goes.
	log.G(ctx).WithField("image", src.String()).WithField("target", target).WithField("meta", metaDev.Name()).WithField("data", dataDev.Name()).
		WithField("metadata", written).WithField("loops", attached-written).WithField("total", time.Since(start)).Debug("mounted with erofs")
	return nil
}

// metaFile is a written metadata image: an unnamed file in m.dir
// (O_TMPFILE) reachable as /proc/self/fd/N until Close, or, where the file
// system has no O_TMPFILE, a named one that Close removes (the loop device
// keeps the inode either way).
type metaFile struct {
	f     *os.File
	path  string
	named bool
}

func (mf *metaFile) Close() {
	mf.f.Close()
	if mf.named {
		os.Remove(mf.path)
	}
}

// writeMeta writes the EROFS metadata image for src into m.dir and returns
// it and the size the data device must have.
func (m *erofsMounter) writeMeta(src Source) (*metaFile, int64, error) {
	f, err := os.Open(src.Path)
	if err != nil {
		return nil, 0, fmt.Errorf("image %s: %w", src, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, 0, err
	}
	length := src.Length
	if length == 0 {
		length = st.Size() - src.Offset
	}
	if src.Offset < 0 || length <= 0 || src.Offset+length > st.Size() {
		return nil, 0, fmt.Errorf("image %s: %w: window outside the %d-byte file", src, errdefs.ErrInvalidArgument, st.Size())
	}
	page := int64(os.Getpagesize())
	if src.Offset%page != 0 {
		return nil, 0, fmt.Errorf("image %s: %w: offset not page aligned", src, errdefs.ErrInvalidArgument)
	}
	b, err := unix.Mmap(int(f.Fd()), src.Offset, int(length), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, 0, fmt.Errorf("image %s: mmap: %w", src, err)
	}
	defer unix.Munmap(b)
	// Loop devices count whole 512-byte sectors; erofs reads 4 KiB
	// blocks. File data ends on a page of the image, so the data device
	// needs the file's size rounded down to the page, at most.
	dataSize := st.Size() / page * page
	meta, err := metadataImage(src, b, dataSize, m.validate)
	if err != nil {
		return nil, 0, err
	}
	mf, err := m.newMetaFile()
	if err != nil {
		return nil, 0, err
	}
	if _, err := mf.f.Write(meta); err != nil {
		mf.Close()
		return nil, 0, fmt.Errorf("writing the erofs metadata of %s: %w", src, err)
	}
	return mf, dataSize, nil
}

// metadataImage builds the EROFS metadata image of the DAXFS image b (the
// window of src): its regular files are chunks of a data device of
// dataSize bytes holding the image at src.Offset. With validate, b is
// validated whole first.
func metadataImage(src Source, b []byte, dataSize int64, validate bool) ([]byte, error) {
	if validate {
		if err := daxfs.Validate(b); err != nil {
			return nil, fmt.Errorf("image %s: %w: %w", src, errdefs.ErrDataLoss, err)
		}
	}
	img, err := daxfs.Open(b)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", src, err)
	}
	var buf bytes.Buffer
	if _, err := erofs.Write(&buf, img, erofs.Options{DataOffset: src.Offset, DataSize: dataSize}); err != nil {
		return nil, fmt.Errorf("image %s: %w", src, err)
	}
	return buf.Bytes(), nil
}

func (m *erofsMounter) newMetaFile() (*metaFile, error) {
	fd, err := unix.Open(m.dir, unix.O_RDWR|unix.O_TMPFILE|unix.O_CLOEXEC, 0o600)
	if err == nil {
		f := os.NewFile(uintptr(fd), m.dir)
		return &metaFile{f: f, path: fmt.Sprintf("/proc/self/fd/%d", fd)}, nil
	}
	if err != unix.EOPNOTSUPP && err != unix.EISDIR && err != unix.EINVAL {
		return nil, fmt.Errorf("creating an erofs metadata file in %s: %w", m.dir, err)
	}
	f, err := os.CreateTemp(m.dir, "meta-*.erofs")
	if err != nil {
		return nil, err
	}
	return &metaFile{f: f, path: f.Name(), named: true}, nil
}

// blockDevSize is the size of the block device open as f (BLKGETSIZE64).
func blockDevSize(f *os.File) (int64, error) {
	var n uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n))); e != 0 {
		return 0, e
	}
	return int64(n), nil
}

// metadataDevIn reports whether loop device dev is backed by a metadata
// image of dir: an erofs mount of ours. The image was deleted once
// attached, so the kernel shows it "(deleted)".
func metadataDevIn(dev, dir string) bool {
	name, ok := strings.CutPrefix(dev, "/dev/")
	if !ok || !strings.HasPrefix(name, "loop") {
		return false
	}
	b, err := os.ReadFile(filepath.Join("/sys/block", name, "loop", "backing_file"))
	if err != nil {
		return false
	}
	backing := strings.TrimSuffix(strings.TrimSpace(string(b)), " (deleted)")
	return filepath.Dir(backing) == dir
}
