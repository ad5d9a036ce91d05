package mounter

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// DAXOptions configure the erofs-dax mounter: the kernel's own erofs
// reading the region in place with dax=always, for kernels without the
// daxfs module. erofs turns DAX off unless every device it reads supports
// it, the one holding its metadata included, so the metadata image of
// each view is published in the region too (as an entry of its own,
// content addressed, shared by every participant like the views), and
// each mount is of a device-mapper device that puts that image in front
// of the region: erofs, mounted without device=, finds the data device
// right after its metadata, where the image's device slot says it is.
type DAXOptions struct {
	// Device is a DAX-capable block device whose bytes are the region's
	// from byte 0: a pmem or CXL namespace (fsdax or raw mode) over the
	// memory the region's device DAX instance maps, or an alias of it.
	Device string
	// Region is the region the views are in.
	Region *daxmem.Region
}

// daxDMPrefix starts the names of our device-mapper devices; the hex
// key of the metadata image in the region follows.
const daxDMPrefix = "daxfs-erofs-"

type erofsDAXMounter struct {
	dev      string
	devSize  int64
	region   *daxmem.Region
	validate bool
}

// newEROFSDAX returns the erofs-dax mounter after checking that
// o.Device holds the region (its header read through the device matches)
// and that dmsetup and erofs are there. It takes back the region
// references of the metadata images of mounts a previous run left.
func newEROFSDAX(ctx context.Context, o DAXOptions, validate bool) (*erofsDAXMounter, error) {
	if o.Device == "" || o.Region == nil {
		return nil, fmt.Errorf("%w: the erofs-dax mounter needs a DAX block device holding the region (mount.dax_device)", errdefs.ErrInvalidArgument)
	}
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return nil, fmt.Errorf("the erofs-dax mounter: %w", err)
	}
	if ok, err := hasFilesystem(b, EROFSFSType); err != nil {
		return nil, fmt.Errorf("the erofs-dax mounter: reading /proc/filesystems: %w", err)
	} else if !ok {
		return nil, fmt.Errorf("%w: erofs is not in /proc/filesystems", errdefs.ErrNotImplemented)
	}
	if _, err := exec.LookPath("dmsetup"); err != nil {
		return nil, fmt.Errorf("%w: the erofs-dax mounter needs dmsetup (device-mapper): %v", errdefs.ErrNotImplemented, err)
	}
	size, err := checkRegionDevice(o.Device, o.Region)
	if err != nil {
		return nil, err
	}
	m := &erofsDAXMounter{dev: o.Device, devSize: size, region: o.Region, validate: validate}
	ms, err := mountinfo.GetMounts(mountinfo.FSTypeFilter(EROFSFSType))
	if err != nil {
		return nil, fmt.Errorf("the erofs-dax mounter: %w", err)
	}
	inUse := map[string]bool{}
	for _, e := range ms {
		if k, ok := daxMetaKey(e.Source); ok {
			inUse[filepath.Base(e.Source)] = true
			if err := m.region.Ref(daxmem.KindView, k); err != nil {
				log.G(ctx).WithError(err).WithField("target", e.Mountpoint).Warn("the erofs metadata of a mounted view is not in the region")
			}
		}
	}
	removeUnusedDevices(ctx, inUse)
	return m, nil
}

// removeUnusedDevices removes our device-mapper devices that no mount
// uses: left by a crash between creating one and mounting it, or by a
// mount detached without us.
func removeUnusedDevices(ctx context.Context, inUse map[string]bool) {
	out, err := dmsetup(ctx, "", "ls")
	if err != nil {
		log.G(ctx).WithError(err).Debug("listing device-mapper devices")
		return
	}
	for line := range strings.Lines(out) {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], daxDMPrefix) || inUse[f[0]] {
			continue
		}
		log.G(ctx).WithField("device", f[0]).Info("removing an unused erofs-dax device-mapper device")
		dmRemove(ctx, "/dev/mapper/"+f[0])
	}
}

// checkRegionDevice reads the first page of dev directly (no page cache:
// another kernel may have written the region) and checks it is the
// region's header: magic, size and creation time. It returns dev's size.
func checkRegionDevice(dev string, r *daxmem.Region) (int64, error) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return 0, fmt.Errorf("erofs-dax device: %w", err)
	}
	defer f.Close()
	size, err := blockDevSize(f)
	if err != nil {
		return 0, fmt.Errorf("erofs-dax device %s: not a block device: %w", dev, err)
	}
	// O_DIRECT wants an aligned buffer: a page of an anonymous mapping.
	page, err := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return 0, fmt.Errorf("erofs-dax device %s: a buffer for its first page: %w", dev, err)
	}
	defer unix.Munmap(page)
	if _, err := f.ReadAt(page, 0); err != nil {
		return 0, fmt.Errorf("erofs-dax device %s: reading its first page: %w", dev, err)
	}
	if !r.SameHeader(page) {
		return 0, fmt.Errorf("%w: erofs-dax device %s does not start with region %s (its first bytes are not that region's header): it must be the same memory", errdefs.ErrInvalidArgument, dev, r.Path())
	}
	if size < r.Size() {
		return 0, fmt.Errorf("%w: erofs-dax device %s has %d bytes, the region %d", errdefs.ErrInvalidArgument, dev, size, r.Size())
	}
	return size, nil
}

func (m *erofsDAXMounter) Mount(ctx context.Context, src Source, target string) error {
	target, err := absTarget(target)
	if err != nil {
		return err
	}
	start := time.Now()
	meta, err := m.metaImage(src)
	if err != nil {
		return err
	}
	key := daxmem.Key(sha256.Sum256(meta))
	e, err := m.store(ctx, key, meta)
	if err != nil {
		return fmt.Errorf("image %s: publishing its erofs metadata in the region: %w", src, err)
	}
	release := func() { _ = m.region.Unref(daxmem.KindView, key) }
	name := daxDMPrefix + hex.EncodeToString(key[:])
	// The metadata image, then the region from its byte 0: the image's
	// device slot places the data device at the block after its own.
	sectors := func(n int64) int64 { return n / 512 }
	table := fmt.Sprintf("0 %d linear %s %d\n%d %d linear %s 0\n",
		sectors(int64(len(meta))), m.dev, sectors(e.Offset), sectors(int64(len(meta))), sectors(m.region.Size()), m.dev)
	dev, err := dmCreate(ctx, name, table)
	if err != nil {
		release()
		return fmt.Errorf("image %s: %w", src, err)
	}
	if err := unix.Mount(dev, target, EROFSFSType, unix.MS_RDONLY, "dax=always"); err != nil {
		dmRemove(ctx, dev)
		release()
		return fmt.Errorf("mount -t erofs -o ro,dax=always %s %s (image %s): %w", dev, target, src, err)
	}
	if ok, err := mountOption(target, "dax=always"); err != nil || !ok {
		// erofs says "DAX unsupported by block device. Turning off DAX."
		// and mounts anyway: not what this mounter is for.
		_ = detach(target)
		dmRemove(ctx, dev)
		release()
		return fmt.Errorf("image %s: %w: erofs on %s did not keep dax=always (%v): a device that is not DAX capable", src, errdefs.ErrNotImplemented, dev, err)
	}
	log.G(ctx).WithField("image", src.String()).WithField("target", target).WithField("device", dev).
		WithField("metadata", len(meta)).WithField("total", time.Since(start)).Debug("mounted with erofs dax=always")
	return nil
}

// metaImage builds the EROFS metadata image of the view at src, its files
// chunks of the region (the data device, placed after the image).
func (m *erofsDAXMounter) metaImage(src Source) ([]byte, error) {
	length := src.Length
	if length == 0 {
		length = m.region.Size() - src.Offset
	}
	b, err := m.region.Slice(src.Offset, length)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", src, err)
	}
	return metadataImage(src, b, m.region.Size(), m.validate)
}

// store publishes meta under key in the region, or references it where a
// participant did already, and returns its entry.
func (m *erofsDAXMounter) store(ctx context.Context, key daxmem.Key, meta []byte) (daxmem.Entry, error) {
	for {
		if e, ok := m.region.Lookup(daxmem.KindView, key); ok {
			if err := m.region.Ref(daxmem.KindView, key); err != nil {
				if errors.Is(err, daxmem.ErrNotFound) {
					continue // collected meanwhile
				}
				return daxmem.Entry{}, err
			}
			// The kernel's erofs parses these bytes: they must be the
			// ones built here, whoever published them.
			if b, err := m.region.Slice(e.Offset, int64(len(meta))); err != nil || e.Length != int64(len(meta)) || !bytes.Equal(b, meta) {
				_ = m.region.Unref(daxmem.KindView, key)
				return daxmem.Entry{}, fmt.Errorf("%w: the erofs metadata image %s in the region differs from the one built from the view", errdefs.ErrDataLoss, key)
			}
			return e, nil
		}
		c, err := m.region.Claim(ctx, daxmem.KindView, key, int64(len(meta)), daxmem.ClaimOptions{})
		switch {
		case errors.Is(err, daxmem.ErrExists):
			continue
		case errors.Is(err, daxmem.ErrBusy):
			if _, err := m.region.Wait(ctx, daxmem.KindView, key); err != nil && !errors.Is(err, daxmem.ErrAbandoned) {
				return daxmem.Entry{}, err
			}
			continue
		case err != nil:
			return daxmem.Entry{}, err
		}
		copy(c.Bytes(), meta)
		e, err := c.Publish(ctx, int64(len(meta)))
		if err != nil {
			_ = c.Abort(ctx)
			return daxmem.Entry{}, err
		}
		return e, nil // Publish referenced it for us
	}
}

// release drops this participant's reference to the metadata image of
// an erofs-dax mount of source that was taken off (unmount removed its
// device-mapper device); other sources are not ours.
func (m *erofsDAXMounter) release(ctx context.Context, source string) {
	key, ok := daxMetaKey(source)
	if !ok {
		return
	}
	if err := m.region.Unref(daxmem.KindView, key); err != nil && !errors.Is(err, daxmem.ErrNotFound) {
		log.G(ctx).WithError(err).WithField("source", source).Warn("dropping the reference to an erofs metadata image")
	}
}

// isDAXMetaDevice reports whether source is one of our device-mapper
// devices, an erofs-dax mount's.
func isDAXMetaDevice(source string) bool {
	_, ok := daxMetaKey(source)
	return ok
}

// daxMetaKey returns the region key of the metadata image of a mount of
// source /dev/mapper/daxfs-erofs-<hex key>.
func daxMetaKey(source string) (daxmem.Key, bool) {
	var k daxmem.Key
	h, ok := strings.CutPrefix(filepath.Base(source), daxDMPrefix)
	if !ok || !strings.HasPrefix(source, "/dev/mapper/") || len(h) != 2*len(k) {
		return k, false
	}
	if _, err := hex.Decode(k[:], []byte(h)); err != nil {
		return k, false
	}
	return k, true
}

// mountOption reports whether the mount on target shows option opt.
func mountOption(target, opt string) (bool, error) {
	target, err := resolve(target)
	if err != nil {
		return false, err
	}
	top, err := topMount(target)
	if err != nil {
		return false, err
	}
	for o := range strings.SplitSeq(top.VFSOptions+","+top.Options, ",") {
		if o == opt {
			return true, nil
		}
	}
	return false, nil
}

// dmCreate creates device-mapper device name with table and returns its
// path; one of that name a crash left behind is removed first (the name
// is the metadata image's key, its place in the region may differ). Its
// node is made by dmsetup itself where no udev runs.
func dmCreate(ctx context.Context, name, table string) (string, error) {
	if _, err := dmsetup(ctx, "", "info", name); err == nil {
		if _, err := dmsetup(ctx, "", "remove", name); err != nil {
			return "", err
		}
	}
	if _, err := dmsetup(ctx, table, "create", name); err != nil {
		return "", err
	}
	return "/dev/mapper/" + name, mknodes(ctx, name)
}

func mknodes(ctx context.Context, name string) error {
	if _, err := os.Stat("/dev/mapper/" + name); err == nil {
		return nil
	}
	_, err := dmsetup(ctx, "", "mknodes", name)
	return err
}

// dmRemove removes the device-mapper device at path /dev/mapper/NAME,
// deferred while a (lazily detached) mount still holds it. Best effort.
func dmRemove(ctx context.Context, path string) {
	name := filepath.Base(path)
	if _, err := dmsetup(ctx, "", "remove", "--deferred", name); err != nil {
		log.G(ctx).WithError(err).WithField("device", name).Debug("removing a device-mapper device")
	}
}

func dmsetup(ctx context.Context, stdin string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "dmsetup", args...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("dmsetup %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out.String(), nil
}
