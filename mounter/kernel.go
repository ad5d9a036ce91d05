package mounter

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
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
type kernelMounter struct{}

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

func (kernelMounter) Mount(ctx context.Context, src Source, target string) error {
	data, err := KernelMountData(src)
	if err != nil {
		return err
	}
	target, err = absTarget(target)
	if err != nil {
		return err
	}
	if err := unix.Mount("none", target, KernelFSType, KernelMountFlags, data); err != nil {
		return fmt.Errorf("mount -t daxfs -o %s none %s: %w", data, target, err)
	}
	return nil
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
