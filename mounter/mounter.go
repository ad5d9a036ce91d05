// Package mounter puts a DAXFS image on a directory, read-only, so that
// overlayfs can use it as a lower: with the kernel daxfs module when it is
// loaded and the image's physical address is known, else with FUSE served
// by a separate long-lived process (package fusesrv) so that mounts
// outlive the snapshotter daemon.
package mounter

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"

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
)

// MountInfo describes one mount made by a Mounter.
type MountInfo struct {
	Target string
	Source Source
	Kind   string
	// State is "mounted", or "detached" for a FUSE connection that was
	// unmounted but is still served because an overlay uses it.
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
	Mount(ctx context.Context, src Source, target string) error
	Unmount(ctx context.Context, target string) error
	// Mounted lists what is mounted, including mounts made before the
	// caller (re)started: a restarted daemon re-adopts them from here.
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

// New returns a Mounter for mode: "kernel" (the daxfs module), "erofs-dax"
// (the kernel's erofs with dax=always over fo.DAX's block device), "erofs"
// (the kernel's erofs over loop devices, indexing the image in place),
// "fuse", or "auto": the daxfs module for sources with a physical address
// when /proc/filesystems lists daxfs, else erofs-dax when fo.DAX is set,
// else erofs where it works, else FUSE (also the fallback for an image
// erofs cannot index).
func New(ctx context.Context, mode string, fo FUSEOptions) (Mounter, error) {
	switch mode {
	case ModeKernel:
		return NewKernel(ctx)
	case ModeFUSE:
		return NewFUSE(ctx, fo)
	case ModeEROFS:
		return NewEROFS(ctx, fo.erofsDir(), fo.Validate)
	case ModeEROFSDAX:
		if fo.DAX == nil {
			return nil, fmt.Errorf("mount mode %s: %w: no DAX block device configured (mount.dax_device)", mode, errdefs.ErrInvalidArgument)
		}
		return NewEROFSDAX(ctx, *fo.DAX, fo.Validate)
	case ModeAuto, "":
		a := &autoMounter{fo: fo}
		if k, err := NewKernel(ctx); err == nil {
			a.kernel = k.(*kernelMounter)
		} else {
			log.G(ctx).WithError(err).Debug("daxfs kernel module not usable")
		}
		if a.kernel == nil && fo.DAX != nil {
			d, err := NewEROFSDAX(ctx, *fo.DAX, fo.Validate)
			if err != nil {
				return nil, fmt.Errorf("mount.dax_device is set but unusable: %w", err)
			}
			a.dax = d.(*erofsDAXMounter)
			log.G(ctx).WithField("device", fo.DAX.Device).Info("mounting images with erofs dax=always (no daxfs kernel module)")
		}
		e, err := NewEROFS(ctx, fo.erofsDir(), fo.Validate)
		if err == nil {
			a.erofs = e.(*erofsMounter)
			// FUSE is only the fallback now: its serving process starts
			// when a mount first needs it.
			a.fuse = newFUSEClient(fo)
			log.G(ctx).Debug("mounting images with erofs over loop devices (no daxfs kernel module)")
			return a, nil
		}
		log.G(ctx).WithError(err).Info("erofs not usable; mounting images with FUSE")
		f, err := NewFUSE(ctx, fo)
		if err != nil {
			return nil, err
		}
		a.fuse = f.(*fuseMounter)
		return a, nil
	}
	return nil, fmt.Errorf("mount mode %q: %w (want auto, kernel, erofs-dax, erofs or fuse)", mode, errdefs.ErrInvalidArgument)
}

func (fo FUSEOptions) erofsDir() string {
	if fo.EROFSDir != "" {
		return fo.EROFSDir
	}
	st := fo.StateDir
	if st == "" {
		st = fusesrv.DefaultStateDir
	}
	return filepath.Join(st, erofsDirName)
}

type autoMounter struct {
	fo     FUSEOptions
	kernel *kernelMounter
	dax    *erofsDAXMounter // nil unless configured and no daxfs module
	erofs  *erofsMounter    // nil where erofs does not work
	fuse   *fuseMounter
}

func (a *autoMounter) Mount(ctx context.Context, src Source, target string) error {
	if a.kernel != nil && src.HasPhys {
		return a.kernel.Mount(ctx, src, target)
	}
	if a.dax != nil {
		err := a.dax.Mount(ctx, src, target)
		if err == nil || errors.Is(err, errdefs.ErrDataLoss) {
			return err
		}
		log.G(ctx).WithError(err).WithField("image", src.String()).Warn("erofs dax=always mount failed; mounting the image otherwise")
	}
	if a.erofs != nil {
		err := a.erofs.Mount(ctx, src, target)
		if err == nil || errors.Is(err, errdefs.ErrDataLoss) {
			return err
		}
		log.G(ctx).WithError(err).WithField("image", src.String()).Warn("erofs mount failed; serving the image with FUSE")
	}
	return a.fuse.Mount(ctx, src, target)
}

func (a *autoMounter) Unmount(ctx context.Context, target string) error {
	if a.kernel != nil {
		if ok, _ := isKernelMount(target); ok {
			return a.kernel.Unmount(ctx, target)
		}
	}
	if a.dax != nil && isEROFSDAXMount(target) {
		return a.dax.Unmount(ctx, target)
	}
	if a.erofs != nil {
		abs, err := absTarget(target)
		if err != nil {
			return err
		}
		if ok, _ := isEROFSMount(abs); ok {
			return a.erofs.Unmount(ctx, target)
		}
		// A FUSE mount, if any, is served by a running server: do not
		// start one to hear that nothing is mounted.
		running := fusesrv.NewClient(a.fuse.c.StateDir(), nil)
		if _, err := running.List(ctx); err != nil {
			// One attempt (Ensure would retry a refused connection
			// for seconds): no server, no FUSE mount.
			return fmt.Errorf("%s: %w: not mounted", abs, errdefs.ErrNotFound)
		}
		return running.Unmount(ctx, abs)
	}
	return a.fuse.Unmount(ctx, target)
}

func (a *autoMounter) Mounted(ctx context.Context) ([]MountInfo, error) {
	var out []MountInfo
	if a.erofs != nil {
		e, err := a.erofs.Mounted(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, e...)
		// FUSE mounts of an earlier run, if its server still runs;
		// asking must not start one.
		if recs, err := fusesrv.NewClient(a.fuse.c.StateDir(), nil).List(ctx); err == nil {
			out = append(out, fuseInfos(recs)...)
		}
	} else {
		f, err := a.fuse.Mounted(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, f...)
	}
	if a.kernel != nil {
		k, err := a.kernel.Mounted(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, k...)
	}
	if a.dax != nil {
		d, err := a.dax.Mounted(ctx)
		if err != nil {
			return nil, err
		}
		out = append(out, d...)
	}
	return out, nil
}

// fuseMounter is the client of the serving process.
type fuseMounter struct {
	c        *fusesrv.Client
	validate bool
}

// NewFUSE connects to the FUSE serving process of opts.StateDir, starting
// it (detached, in its own session) when it does not run.
func NewFUSE(ctx context.Context, opts FUSEOptions) (Mounter, error) {
	m := newFUSEClient(opts)
	if _, err := m.c.Ensure(ctx); err != nil {
		return nil, err
	}
	return m, nil
}

// newFUSEClient returns the FUSE mounter without contacting the serving
// process: the first call that needs it starts it.
func newFUSEClient(opts FUSEOptions) *fuseMounter {
	if opts.StateDir == "" {
		opts.StateDir = fusesrv.DefaultStateDir
	}
	if opts.Binary == "" {
		// os.Executable fails only where /proc is missing; the FUSE
		// server then fails to start with the empty path, naming it.
		opts.Binary, _ = os.Executable()
	}
	args := opts.Args
	if args == nil {
		args = []string{"fuse-serve"}
	}
	cmd := append(append([]string{opts.Binary}, args...), "--state", opts.StateDir)
	return &fuseMounter{c: fusesrv.NewClient(opts.StateDir, cmd), validate: opts.Validate}
}

func (m *fuseMounter) Mount(ctx context.Context, src Source, target string) error {
	target, err := absTarget(target)
	if err != nil {
		return err
	}
	return m.c.Mount(ctx, fusesrv.Source{Path: src.Path, Offset: src.Offset, Length: src.Length}, target, m.validate)
}

func (m *fuseMounter) Unmount(ctx context.Context, target string) error {
	target, err := absTarget(target)
	if err != nil {
		return err
	}
	return m.c.Unmount(ctx, target)
}

func (m *fuseMounter) Mounted(ctx context.Context) ([]MountInfo, error) {
	recs, err := m.c.List(ctx)
	if err != nil {
		return nil, err
	}
	return fuseInfos(recs), nil
}

func fuseInfos(recs []fusesrv.MountRecord) []MountInfo {
	out := make([]MountInfo, 0, len(recs))
	for _, r := range recs {
		out = append(out, MountInfo{
			Target: r.Target, Kind: KindFUSE, State: r.State, Since: r.Since,
			Source: Source{Path: r.Source.Path, Offset: r.Source.Offset, Length: r.Source.Length},
		})
	}
	return out
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

// FSTypeFUSE is the file system type of our FUSE mounts in mountinfo.
const FSTypeFUSE = daxfuse.FSType

var errNoKernel = errors.New("the daxfs kernel module is not loaded (not in /proc/filesystems)")

// StopFUSE detaches every FUSE mount of the serving process of stateDir,
// waits for the connections to end (up to 10 s; an overlay still using a
// lower keeps its connection alive and makes this fail), and stops the
// serving process and its descriptor holder. For tests and operators:
// the daemon itself never stops the serving process.
func StopFUSE(ctx context.Context, stateDir string) error {
	if stateDir == "" {
		stateDir = fusesrv.DefaultStateDir
	}
	return fusesrv.NewClient(stateDir, nil).Quit(ctx)
}
