// Package mounter puts a DAXFS image on a directory, read-only, so that
// overlayfs can use it as a lower: with the kernel daxfs module when it is
// loaded and the image's physical address is known; else, on a DAX block
// device holding the region (mount.dax_device), with the kernel's erofs
// and dax=always, reading the region in place; else with the kernel's
// erofs over loop devices, from a small metadata image whose files point
// into the DAXFS image (package erofs); else with FUSE served
// by a separate long-lived process (package fusesrv), so that mounts
// outlive the snapshotter daemon.
//
// Whatever the mode, a Mounter lists and unmounts every kind of image
// mount it can make: a daemon restarted in another mode adopts the mounts
// of an earlier run, and takes them off, through it.
package mounter

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/mounter/daxfuse"
	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
)

// Source says where an image lives: Length bytes of the file at Path from
// Offset (Length 0: to the end of the file). For a view, the window runs
// from the view's start to the end of the last layer it references.
// PhysAddr is the physical address of byte Offset of Path, when the backend
// knows it (device DAX, pmem); only then can the kernel module mount it.
type Source struct {
	Path     string
	Offset   int64
	Length   int64
	PhysAddr uint64
	HasPhys  bool
}

func (s Source) String() string {
	if s.Offset == 0 && s.Length == 0 {
		return s.Path
	}
	return fmt.Sprintf("%s@%d+%d", s.Path, s.Offset, s.Length)
}

// Kinds of mount.
const (
	KindFUSE   = "fuse"
	KindKernel = "kernel"
	KindEROFS  = "erofs"
	// KindEROFSDAX is erofs with dax=always over a device-mapper device
	// that puts the view's metadata image in front of the region.
	KindEROFSDAX = "erofs-dax"
)

// States of a mount.
const (
	StateMounted = "mounted"
	// StateDetached is a FUSE connection that was unmounted but is still
	// served because an overlay uses it: no mount point to hand out.
	StateDetached = fusesrv.StateDetached
)

// MountInfo describes one image mount.
type MountInfo struct {
	Target string
	Source Source
	Kind   string
	// State is StateMounted or StateDetached.
	State string
	Since time.Time
}

// Mounter mounts images read-only on directories.
//
// Unmount detaches lazily and succeeds even while an overlay still uses
// the mount (the kernel keeps it alive for the overlay; a FUSE mount is
// served until then): callers that share a mount between overlays must
// count their users and call Unmount after the last one is gone.
type Mounter interface {
	// Mount mounts the image at src on target.
	Mount(ctx context.Context, src Source, target string) error
	// Unmount takes the image mount on target off, whichever kind it is
	// and whichever mode made it; errdefs.ErrNotFound when nothing is
	// mounted there.
	Unmount(ctx context.Context, target string) error
	// Mounted lists the image mounts of every kind, including those made
	// before the caller (re)started or in another mode: a restarted daemon
	// adopts them from here.
	Mounted(ctx context.Context) ([]MountInfo, error)
}

// Modes accepted by New.
const (
	ModeAuto     = "auto"
	ModeFUSE     = "fuse"
	ModeKernel   = "kernel"
	ModeEROFS    = "erofs"
	ModeEROFSDAX = "erofs-dax"
)

// FUSEOptions configure the FUSE mounter, and where the erofs mounter
// keeps its metadata images.
type FUSEOptions struct {
	// StateDir holds the serving process's sockets, locks and logs
	// (default fusesrv.DefaultStateDir).
	StateDir string
	// EROFSDir holds the erofs mounter's metadata images (default
	// StateDir/erofs).
	EROFSDir string
	// Binary is the containerd-daxfs-grpc executable started as
	// `Binary fuse-serve --state StateDir` when no server runs
	// (default: this executable).
	Binary string
	// Args replace ["fuse-serve"] between Binary and --state (tests run
	// their own binary).
	Args []string
	// Validate runs a full daxfs.Validate before each mount.
	Validate bool
	// DAX, when set, configures the erofs-dax mounter (the kernel's erofs
	// with dax=always over a DAX block device holding the region), which
	// auto mode prefers to erofs over loop devices and FUSE where the
	// daxfs module is not loaded.
	DAX *DAXOptions
}

func (fo FUSEOptions) stateDir() string {
	if fo.StateDir != "" {
		return fo.StateDir
	}
	return fusesrv.DefaultStateDir
}

func (fo FUSEOptions) erofsDir() string {
	if fo.EROFSDir != "" {
		return fo.EROFSDir
	}
	return filepath.Join(fo.stateDir(), erofsDirName)
}

// imageMounter is the Mounter of every mode. The mode decides how images
// are mounted; Mounted and Unmount know every kind.
type imageMounter struct {
	mode   string
	kernel *kernelMounter   // nil unless the mode may use the daxfs module
	dax    *erofsDAXMounter // nil unless the mode mounts with erofs-dax
	erofs  *erofsMounter    // nil unless the mode mounts with erofs
	fuse   *fuseMounter
	// erofsDir (resolved) tells our erofs mounts: their metadata loop
	// device's backing file lies in it.
	erofsDir string
	// fuseServed: the mode mounts with FUSE, so New started the serving
	// process and listing needs it. Otherwise it starts when a mount
	// first needs it, and only one already running is asked.
	fuseServed bool
}

// New returns a Mounter for mode: "kernel" (the daxfs module), "erofs-dax"
// (the kernel's erofs with dax=always over fo.DAX's block device), "erofs"
// (the kernel's erofs over loop devices, indexing the image in place),
// "fuse", or "auto": the daxfs module for sources with a physical address
// when /proc/filesystems lists daxfs, the module lets programs on its
// mounts run (ErrModuleNoExec) and the image has nothing it would drop
// (daxfs.Image.KernelLosses), else erofs-dax when fo.DAX is set,
// else erofs where it works, else FUSE (also the fallback for an image
// erofs cannot index).
func New(ctx context.Context, mode string, fo FUSEOptions) (Mounter, error) {
	erofsDir, err := resolve(fo.erofsDir())
	if err != nil {
		return nil, err
	}
	m := &imageMounter{mode: mode, fuse: newFUSEClient(fo), erofsDir: erofsDir}
	switch mode {
	case ModeKernel:
		if m.kernel, err = newKernel(); err != nil {
			return nil, err
		}
	case ModeFUSE:
		if err := m.serveFUSE(ctx); err != nil {
			return nil, err
		}
	case ModeEROFS:
		if m.erofs, err = newEROFS(ctx, fo.erofsDir(), fo.Validate); err != nil {
			return nil, err
		}
	case ModeEROFSDAX:
		if fo.DAX == nil {
			return nil, fmt.Errorf("mount mode %s: %w: no DAX block device configured (mount.dax_device)", mode, errdefs.ErrInvalidArgument)
		}
		if m.dax, err = newEROFSDAX(ctx, *fo.DAX, fo.Validate); err != nil {
			return nil, err
		}
	case ModeAuto, "":
		m.mode = ModeAuto
		if m.kernel, err = newKernel(); err != nil {
			log.G(ctx).WithError(err).Debug("daxfs kernel module not usable")
		}
		// With the module loaded too: it may turn out unusable
		// (ErrModuleNoExec) at its first mount.
		if fo.DAX != nil {
			if m.dax, err = newEROFSDAX(ctx, *fo.DAX, fo.Validate); err != nil {
				return nil, fmt.Errorf("mount.dax_device is set but unusable: %w", err)
			}
			log.G(ctx).WithField("device", fo.DAX.Device).Info("mounting images without the daxfs module with erofs dax=always")
		}
		if m.erofs, err = newEROFS(ctx, fo.erofsDir(), fo.Validate); err == nil {
			log.G(ctx).Debug("mounting images with erofs over loop devices (no daxfs kernel module)")
			return m, nil
		}
		log.G(ctx).WithError(err).Info("erofs not usable; mounting images with FUSE")
		if err := m.serveFUSE(ctx); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("mount mode %q: %w (want auto, kernel, erofs-dax, erofs or fuse)", mode, errdefs.ErrInvalidArgument)
	}
	return m, nil
}

// serveFUSE starts the FUSE serving process if it does not run.
func (m *imageMounter) serveFUSE(ctx context.Context) error {
	if _, err := m.fuse.c.Ensure(ctx); err != nil {
		return err
	}
	m.fuseServed = true
	return nil
}

func (m *imageMounter) Mount(ctx context.Context, src Source, target string) error {
	switch m.mode {
	case ModeKernel:
		if lost, err := imageLosses(src); err == nil && len(lost) > 0 {
			log.G(ctx).WithField("image", src.String()).Warnf("mounting with the daxfs module (mount.mode kernel), which drops the image's %s", strings.Join(lost, " and "))
		}
		return m.kernel.Mount(ctx, src, target)
	case ModeEROFS:
		return m.erofs.Mount(ctx, src, target)
	case ModeEROFSDAX:
		return m.dax.Mount(ctx, src, target)
	case ModeFUSE:
		return m.fuse.Mount(ctx, src, target)
	}
	if m.kernel != nil && src.HasPhys {
		// The module shows no xattrs (file capabilities among them) and
		// no device numbers: such an image goes to a mounter that does.
		lost, err := imageLosses(src)
		switch {
		case err == nil && len(lost) == 0:
			err := m.kernel.Mount(ctx, src, target)
			if !errors.Is(err, ErrModuleNoExec) {
				return err
			}
		case err == nil:
			log.G(ctx).WithField("image", src.String()).Infof("not mounting with the daxfs module, which would drop the image's %s", strings.Join(lost, " and "))
		default:
			// The other mounters validate and say what is wrong.
			log.G(ctx).WithError(err).WithField("image", src.String()).Debug("reading the image for the daxfs module")
		}
	}
	if m.dax != nil {
		err := m.dax.Mount(ctx, src, target)
		if err == nil || errors.Is(err, errdefs.ErrDataLoss) {
			return err
		}
		log.G(ctx).WithError(err).WithField("image", src.String()).Warn("erofs dax=always mount failed; mounting the image otherwise")
	}
	if m.erofs != nil {
		err := m.erofs.Mount(ctx, src, target)
		if err == nil || errors.Is(err, errdefs.ErrDataLoss) {
			return err
		}
		log.G(ctx).WithError(err).WithField("image", src.String()).Warn("erofs mount failed; serving the image with FUSE")
	}
	return m.fuse.Mount(ctx, src, target)
}

func (m *imageMounter) Unmount(ctx context.Context, target string) error {
	source, err := unmount(ctx, target, m.fuse.c.StateDir())
	if err == nil && m.dax != nil {
		m.dax.release(ctx, source)
	}
	return err
}

func (m *imageMounter) Mounted(ctx context.Context) ([]MountInfo, error) {
	out, err := kernelMounts(m.erofsDir)
	if err != nil {
		return nil, err
	}
	if m.fuseServed {
		f, err := m.fuse.Mounted(ctx)
		if err != nil {
			return nil, err
		}
		return append(out, f...), nil
	}
	// FUSE mounts of an earlier run, if its server still runs; asking
	// must not start one.
	if recs, err := fusesrv.NewClient(m.fuse.c.StateDir(), nil).List(ctx); err == nil {
		out = append(out, fuseInfos(recs)...)
	}
	return out, nil
}

// kernelMounts lists the mounts that need no serving process: every
// daxfs module mount, every erofs-dax mount (of our device-mapper
// devices), and the erofs mounts whose metadata images came from
// erofsDir.
func kernelMounts(erofsDir string) ([]MountInfo, error) {
	ms, err := mountinfo.GetMounts(mountinfo.FSTypeFilter(KernelFSType, EROFSFSType))
	if err != nil {
		return nil, err
	}
	var out []MountInfo
	for _, e := range ms {
		switch {
		case e.FSType == KernelFSType:
			out = append(out, MountInfo{Target: e.Mountpoint, Source: kernelSource(e), Kind: KindKernel, State: StateMounted})
		case isDAXMetaDevice(e.Source):
			out = append(out, MountInfo{Target: e.Mountpoint, Source: Source{Path: e.Source}, Kind: KindEROFSDAX, State: StateMounted})
		case metadataDevIn(e.Source, erofsDir):
			out = append(out, MountInfo{Target: e.Mountpoint, Source: Source{Path: e.Source}, Kind: KindEROFS, State: StateMounted})
		}
	}
	return out, nil
}

// unmount lazily detaches the image mount on target: a kernel mount (the
// daxfs module, erofs) itself, an erofs-dax mount with its device-mapper
// device (removed once no overlay holds it), a FUSE mount through the
// serving process of stateDir (never started for it), or, when that
// process is gone or does not know the mount, itself. It returns the
// mount's source.
func unmount(ctx context.Context, target, stateDir string) (string, error) {
	abs, err := absTarget(target)
	if err != nil {
		return "", err
	}
	top, err := topMount(abs)
	if err != nil {
		return "", err
	}
	switch top.FSType {
	case KernelFSType:
	case EROFSFSType:
		if isDAXMetaDevice(top.Source) {
			if err := detach(abs); err != nil {
				return "", err
			}
			dmRemove(ctx, top.Source)
			return top.Source, nil
		}
	case FSTypeFUSE:
		// The serving process forgets the connection too.
		err := fusesrv.NewClient(stateDir, nil).Unmount(ctx, abs)
		if err == nil {
			return top.Source, nil
		}
		log.G(ctx).WithError(err).WithField("target", abs).Debug("the FUSE serving process did not unmount: detaching")
	default:
		return "", fmt.Errorf("%s: %w: a %s mount, not an image mount", abs, errdefs.ErrInvalidArgument, top.FSType)
	}
	return top.Source, detach(abs)
}

// topMount returns the uppermost mount on target (symlinks resolved):
// NotFound when there is none.
func topMount(target string) (*mountinfo.Info, error) {
	real, err := resolve(target)
	if err != nil {
		return nil, err
	}
	ms, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) { return i.Mountpoint != real, false })
	if err != nil {
		return nil, err
	}
	if len(ms) == 0 {
		return nil, fmt.Errorf("%s: %w: not mounted", target, errdefs.ErrNotFound)
	}
	// mountinfo lists mounts in the order they were made.
	return ms[len(ms)-1], nil
}

// detach lazily detaches the uppermost mount on target; NotFound when
// nothing is mounted there.
func detach(target string) error {
	if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
		if err == unix.EINVAL || err == unix.ENOENT {
			return fmt.Errorf("%s: %w: not mounted", target, errdefs.ErrNotFound)
		}
		return fmt.Errorf("unmount %s: %w", target, err)
	}
	return nil
}

// Detach unmounts whatever image mount is on target (daxfs module, erofs,
// or FUSE served from fo.StateDir) without starting or probing anything:
// the operator's umount. Like every Unmount it detaches lazily.
func Detach(ctx context.Context, target string, fo FUSEOptions) error {
	_, err := unmount(ctx, target, fo.stateDir())
	return err
}

// DetachStale lazily detaches every mount on target, of any kind: what an
// earlier run left there and the caller did not adopt (a mount made in a
// mode whose mounts are not listed here, or before target moved behind a
// symlink). Mounting on top of it would leak it; overlays that still use
// it keep it until they go.
func DetachStale(ctx context.Context, target string) error {
	real, err := resolve(target)
	if err != nil {
		return err
	}
	ms, err := mountinfo.GetMounts(func(i *mountinfo.Info) (skip, stop bool) { return i.Mountpoint != real, false })
	if err != nil {
		return err
	}
	for _, m := range ms {
		log.G(ctx).WithField("target", target).WithField("fstype", m.FSType).Warn("detaching a stale mount")
		if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
			return fmt.Errorf("detaching the stale mount on %s: %w", target, err)
		}
		if isDAXMetaDevice(m.Source) {
			dmRemove(ctx, m.Source)
		}
	}
	return nil
}

func absTarget(target string) (string, error) {
	if target == "" {
		return "", fmt.Errorf("mount target: %w: empty path", errdefs.ErrInvalidArgument)
	}
	abs, err := filepath.Abs(target)
	if err != nil {
		return "", err
	}
	return abs, nil
}

// resolve returns the absolute path p with symlinks resolved, as
// mountinfo and sysfs show paths; where p does not exist, its nearest
// existing ancestor is resolved.
func resolve(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		return r, nil
	}
	if dir := filepath.Dir(abs); dir != abs {
		if r, err := resolve(dir); err == nil {
			return filepath.Join(r, filepath.Base(abs)), nil
		}
	}
	return abs, nil
}

// FSTypeFUSE is the file system type of our FUSE mounts in mountinfo.
const FSTypeFUSE = daxfuse.FSType

var errNoKernel = errors.New("the daxfs kernel module is not loaded (not in /proc/filesystems)")

// StopFUSE detaches every FUSE mount of the serving process of stateDir,
// waits for the connections to end (up to 10 s; an overlay still using a
// lower keeps its connection alive and makes this fail), and stops the
// serving process and its descriptor holder. For tests and operators:
// the daemon itself never stops the serving process.
func StopFUSE(ctx context.Context, stateDir string) error {
	return fusesrv.NewClient(FUSEOptions{StateDir: stateDir}.stateDir(), nil).Quit(ctx)
}
