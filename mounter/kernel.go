package mounter

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/daxfuse"
)

// KernelFSType is the kernel module's file system type.
const KernelFSType = "daxfs"

// ParseFilesystems returns the file system types listed in
// /proc/filesystems contents ("nodev\tname" or "\tname" lines).
func ParseFilesystems(r io.Reader) ([]string, error) {
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		switch {
		case len(f) == 1:
			out = append(out, f[0])
		case len(f) == 2 && f[0] == "nodev":
			out = append(out, f[1])
		}
	}
	return out, sc.Err()
}

// KernelAvailable reports whether /proc/filesystems lists daxfs.
func KernelAvailable() (bool, error) {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return false, err
	}
	return hasFilesystem(b, KernelFSType)
}

func hasFilesystem(procFilesystems []byte, name string) (bool, error) {
	fss, err := ParseFilesystems(bytes.NewReader(procFilesystems))
	if err != nil {
		return false, err
	}
	return slices.Contains(fss, name), nil
}

// KernelMountData returns the mount(2) data for the kernel module:
// "phys=0x...,size=N", the physical address and size of the image window.
func KernelMountData(src Source) (string, error) {
	if !src.HasPhys {
		return "", fmt.Errorf("image %s: %w: the kernel mounter needs the physical address of the image", src, errdefs.ErrNotImplemented)
	}
	if src.Length <= 0 {
		return "", fmt.Errorf("image %s: %w: the kernel mounter needs the window length", src, errdefs.ErrInvalidArgument)
	}
	if src.PhysAddr%uint64(os.Getpagesize()) != 0 {
		return "", fmt.Errorf("image %s: %w: physical address %#x is not page aligned", src, errdefs.ErrInvalidArgument, src.PhysAddr)
	}
	return "phys=0x" + strconv.FormatUint(src.PhysAddr, 16) + ",size=" + strconv.FormatInt(src.Length, 10), nil
}

// KernelMountFlags are the kernel mount's flags: read-only.
const KernelMountFlags = unix.MS_RDONLY

// kernelMounter mounts with the daxfs module.
type kernelMounter struct {
	// mu guards execOK: whether the module lets a program on its mounts
	// run (known after the first mount holding a regular file).
	mu       sync.Mutex
	execOK   bool
	execSeen bool
}

// ErrModuleNoExec says the loaded daxfs module refuses private writable
// mappings of a static image: exec maps a program's data segment that
// way, so every program on such a mount dies of SIGSEGV. The module as
// published at aa9c212 does it; auto mode then mounts with something else.
var ErrModuleNoExec = errors.New("the loaded daxfs module refuses private writable mappings of static images, so no program on its mounts can run (exec dies of SIGSEGV): load a module that allows them (only shared writable mappings must be refused) or use another mount mode")

// newKernel returns the kernel daxfs mounter, or an error when the module
// is not loaded.
func newKernel() (*kernelMounter, error) {
	ok, err := KernelAvailable()
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("%w: %v", errdefs.ErrNotImplemented, errNoKernel)
	}
	return &kernelMounter{}, nil
}

func (k *kernelMounter) Mount(ctx context.Context, src Source, target string) error {
	data, err := KernelMountData(src)
	if err != nil {
		return err
	}
	target, err = absTarget(target)
	if err != nil {
		return err
	}
	if !k.usable() {
		return fmt.Errorf("image %s: %w: %w", src, errdefs.ErrNotImplemented, ErrModuleNoExec)
	}
	if err := unix.Mount("none", target, KernelFSType, KernelMountFlags, data); err != nil {
		return fmt.Errorf("mount -t daxfs -o %s none %s: %w", data, target, err)
	}
	if err := k.checkExec(ctx, target); err != nil {
		_ = detach(target)
		return fmt.Errorf("image %s: %w", src, err)
	}
	return nil
}

func (k *kernelMounter) usable() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return !k.execSeen || k.execOK
}

// checkExec finds out, on the first mount that holds a regular file,
// whether the module lets programs on its mounts run: it maps the file
// privately and writably, as exec maps a data segment. A module that
// refuses is not used again (ErrModuleNoExec, errdefs.ErrNotImplemented).
func (k *kernelMounter) checkExec(ctx context.Context, target string) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.execSeen {
		if k.execOK {
			return nil
		}
		return fmt.Errorf("%w: %w", errdefs.ErrNotImplemented, ErrModuleNoExec)
	}
	file := firstRegularFile(target, 4096)
	if file == "" {
		return nil // nothing to map: the next mount tells
	}
	err := mapPrivateWritable(file)
	switch {
	case err == nil:
		k.execSeen, k.execOK = true, true
		return nil
	case errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM):
		k.execSeen = true
		log.G(ctx).WithError(err).WithField("file", file).Warn("not mounting with the daxfs module: " + ErrModuleNoExec.Error())
		return fmt.Errorf("%w: %w", errdefs.ErrNotImplemented, ErrModuleNoExec)
	}
	// Another failure says nothing about the module; try again later.
	log.G(ctx).WithError(err).WithField("file", file).Debug("checking the daxfs module's private mappings")
	return nil
}

// imageLosses maps the image at src and names what the daxfs module would
// not show of it (daxfs.Image.KernelLosses).
func imageLosses(src Source) ([]string, error) {
	w, err := daxfuse.MapWindow(src.Path, src.Offset, src.Length)
	if err != nil {
		return nil, err
	}
	defer w.Close()
	im, err := daxfs.Open(w.Bytes)
	if err != nil {
		return nil, err
	}
	return im.KernelLosses(), nil
}

// firstRegularFile returns a non-empty regular file below dir, looking at
// no more than limit entries; "" when there is none.
func firstRegularFile(dir string, limit int) string {
	found, seen := "", 0
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if seen++; seen > limit {
			return fs.SkipAll
		}
		if err != nil || !d.Type().IsRegular() {
			return nil
		}
		if fi, err := d.Info(); err == nil && fi.Size() > 0 {
			found = p
			return fs.SkipAll
		}
		return nil
	})
	return found
}

// mapPrivateWritable maps the first page of file MAP_PRIVATE with
// PROT_WRITE, as exec maps a program's data, and unmaps it.
func mapPrivateWritable(file string) error {
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	b, err := unix.Mmap(int(f.Fd()), 0, os.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		return fmt.Errorf("mmap(MAP_PRIVATE, PROT_WRITE) of %s: %w", file, err)
	}
	return unix.Munmap(b)
}

// kernelSource reads the window of a daxfs module mount back from its
// super block options.
func kernelSource(m *mountinfo.Info) Source {
	src := Source{Path: m.Source}
	for o := range strings.SplitSeq(m.VFSOptions, ",") {
		k, v, _ := strings.Cut(o, "=")
		switch k {
		case "phys":
			if p, err := strconv.ParseUint(strings.TrimPrefix(v, "0x"), 16, 64); err == nil {
				src.PhysAddr, src.HasPhys = p, true
			}
		case "size":
			if n, err := strconv.ParseInt(v, 0, 64); err == nil {
				src.Length = n
			}
		}
	}
	return src
}
