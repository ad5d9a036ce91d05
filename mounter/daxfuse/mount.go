package daxfuse

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// FSType is the file system type our mounts show in /proc/self/mountinfo.
const FSType = "fuse.daxfs"

// MountFlags are the mount(2) flags of a DAXFS FUSE mount: read-only, and
// neither nodev (device nodes in images must work through overlayfs) nor
// nosuid (setuid binaries in images must work).
const MountFlags = unix.MS_RDONLY

// MountData returns the mount(2) data string for a connection on /dev/fuse
// descriptor fd: allow_other so containers of any uid can read,
// default_permissions so the kernel checks modes itself.
func MountData(fd int) string {
	return strings.Join([]string{
		fmt.Sprintf("fd=%d", fd),
		"rootmode=40000",
		fmt.Sprintf("user_id=%d", os.Geteuid()),
		fmt.Sprintf("group_id=%d", os.Getegid()),
		"allow_other",
		"default_permissions",
		fmt.Sprintf("max_read=%d", maxWrite),
	}, ",")
}

// Mount opens /dev/fuse and mounts a new FUSE connection on target
// (a directory) directly with mount(2), without fusermount. The caller
// must answer the INIT request (ReadInit, NewConn) before anything else
// can use the mount. fsname is shown as the mount source.
//
// It returns the /dev/fuse descriptor (close-on-exec), owned by the caller.
func Mount(target, fsname string) (int, error) {
	if !filepath.IsAbs(target) {
		return -1, fmt.Errorf("mount target %q: not an absolute path", target)
	}
	st, err := os.Stat(target)
	if errors.Is(err, unix.ENOTCONN) {
		// A dead FUSE mount (its server and the descriptor holder both
		// died): take it off the directory and mount afresh.
		if uerr := unix.Unmount(target, unix.MNT_DETACH); uerr == nil {
			st, err = os.Stat(target)
		}
	}
	if err != nil {
		return -1, fmt.Errorf("mount target: %w", err)
	}
	if !st.IsDir() {
		return -1, fmt.Errorf("mount target %q: not a directory", target)
	}
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	if fsname == "" {
		fsname = "daxfs"
	}
	// The source is shown in mountinfo, where commas and spaces would
	// confuse parsers.
	fsname = strings.NewReplacer(",", "_", " ", "_").Replace(fsname)
	if err := unix.Mount(fsname, target, FSType, MountFlags, MountData(fd)); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("mount %s on %s: %w", FSType, target, err)
	}
	return fd, nil
}

// Window is a read-only MAP_SHARED mapping of length bytes of a file from
// offset: an image file or an extent of the shared region.
type Window struct {
	mapping []byte // whole mapping, from the page-aligned start
	Bytes   []byte // the window itself
}

// MapWindow maps [offset, offset+length) of path read-only and shared.
// length 0 means "to the end of the file".
func MapWindow(path string, offset, length int64) (*Window, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("open image source: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("stat image source %s: %w", path, err)
	}
	if offset < 0 || length < 0 {
		return nil, fmt.Errorf("image source %s: negative offset or length", path)
	}
	size, align := st.Size(), int64(os.Getpagesize())
	if !st.Mode().IsRegular() {
		// A device (device DAX): its size and the granule its mappings
		// must be made of (2 MiB by default) come from sysfs; without
		// sysfs, trust the caller and map whole pages.
		size = offset + length
		if dev, ok := charDevice(f); ok {
			if a, ok := devDAXAttr(dev, "align"); ok && a > align && a&(a-1) == 0 {
				align = a
			}
			if n, ok := devDAXAttr(dev, "size"); ok {
				size = n
			}
		}
	}
	if length == 0 {
		length = size - offset
	}
	if length <= 0 || offset+length > size {
		return nil, fmt.Errorf("image source %s: window %d+%d outside the file (%d bytes)", path, offset, length, size)
	}
	start, end := mapBounds(offset, length, align, size, st.Mode().IsRegular())
	m, err := unix.Mmap(int(f.Fd()), start, int(end-start), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map image source %s at %d+%d (mapping %d+%d): %w", path, offset, length, start, end-start, err)
	}
	return &Window{mapping: m, Bytes: m[offset-start : offset-start+length]}, nil
}

// mapBounds returns the range to map for the window [offset,
// offset+length): its start rounded down to align and, for a device,
// whose mappings must be whole granules, its end rounded up to align
// (never past the device's size).
func mapBounds(offset, length, align, size int64, regular bool) (start, end int64) {
	start = offset &^ (align - 1)
	end = offset + length
	if !regular {
		end = min((end+align-1)&^(align-1), size)
	}
	return start, end
}

// charDevice returns the device number of the character device open as f.
func charDevice(f *os.File) (uint64, bool) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFCHR {
		return 0, false
	}
	return st.Rdev, true
}

// devDAXAttr reads a number from /sys/dev/char/MAJ:MIN/name (device
// DAX's size and align).
func devDAXAttr(dev uint64, name string) (int64, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/char/%d:%d/%s", unix.Major(dev), unix.Minor(dev), name))
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return n, err == nil && n > 0
}

// Close unmaps the window. Nothing may use Bytes afterwards.
func (w *Window) Close() error {
	if w.mapping == nil {
		return nil
	}
	err := unix.Munmap(w.mapping)
	w.mapping, w.Bytes = nil, nil
	return err
}

// pollHackName is the name go-fuse's protocol layer answers specially in
// the root directory so that a poll on it can be refused (see DisablePoll).
const pollHackName = ".go-fuse-epoll-hack"

// DisablePoll makes the kernel learn, once per connection, that the file
// system does not implement FUSE_POLL. Without it, a process that serves
// a mount and also opens files on it can deadlock: Go registers every
// opened file with its epoll instance, the kernel then sends FUSE_POLL
// while holding that instance's lock, and the reader goroutine waiting in
// the same epoll can never receive it. Call it once the Conn is serving.
func DisablePoll(target string) error {
	fd, err := unix.Open(filepath.Join(target, pollHackName), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("disable FUSE poll on %s: %w", target, err)
	}
	defer unix.Close(fd)
	_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
	return nil
}

// ReadAheadKB is the readahead window Tune sets: large sequential reads
// become several 1 MiB FUSE requests in flight at once (measured: cold
// sequential reads 0.47x of overlay-on-disk with 1 MiB, 0.7x with 4 MiB).
const ReadAheadKB = 4096

// Tune sets the mount's readahead window (the kernel starts FUSE mounts
// at the smaller of its default and what INIT said). Best effort.
func Tune(target string) error {
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil {
		return err
	}
	p := fmt.Sprintf("/sys/class/bdi/%d:%d/read_ahead_kb", unix.Major(st.Dev), unix.Minor(st.Dev))
	if err := os.WriteFile(p, []byte(fmt.Sprint(ReadAheadKB)), 0o644); err != nil {
		return fmt.Errorf("set readahead of %s: %w", target, err)
	}
	return nil
}
