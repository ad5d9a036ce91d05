// Package overlay computes the overlayfs mounts the snapshotter hands to
// containerd: a container's writable root over a daxfs view, the staging
// mount an extraction writes into, and read-only binds for views.
//
// It only builds mount descriptions; containerd (or the caller) performs
// them. A proxy snapshotter cannot add mount handlers to containerd, so
// everything returned here is a plain "overlay" or "bind" mount of paths the
// daemon has already mounted.
package overlay

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/core/mount"
)

// Options are the overlayfs features a mount should use.
type Options struct {
	// IndexOff adds "index=off". The inode index ties an upper to the
	// exact lower it was created over; our lowers are remounted (and may be
	// served by a new FUSE connection after a restart), so the index must
	// stay off, as containerd's own overlay snapshotter does.
	IndexOff bool
	// UserXattr adds "userxattr": overlayfs then reads user.overlay.*
	// instead of trusted.overlay.* (needed inside a user namespace).
	UserXattr bool
	// Extra options appended as given (e.g. "volatile").
	Extra []string
}

// DefaultOptions returns the options for this kernel: index=off whenever
// the kernel knows the parameter.
func DefaultOptions() Options {
	return Options{IndexOff: indexParamSupported()}
}

// Container returns the single writable overlay mount of a container root.
// lowers are ordered top first, as overlayfs' lowerdir expects.
func Container(lowers []string, upper, work string, o Options) (mount.Mount, error) {
	if len(lowers) == 0 {
		return mount.Mount{}, fmt.Errorf("overlay mount of %s needs at least one lower directory", upper)
	}
	for _, p := range append(append([]string{}, lowers...), upper, work) {
		if err := checkPath(p); err != nil {
			return mount.Mount{}, err
		}
	}
	opts := make([]string, 0, 4+len(o.Extra))
	opts = append(opts, o.flags()...)
	opts = append(opts,
		"lowerdir="+strings.Join(lowers, ":"),
		"upperdir="+upper,
		"workdir="+work,
	)
	return mount.Mount{Type: "overlay", Source: "overlay", Options: opts}, nil
}

// ReadOnlyBind returns a read-only recursive bind mount of dir. containerd's
// unpacker reads a read-only last mount as "layer already staged".
func ReadOnlyBind(dir string) (mount.Mount, error) {
	if err := checkPath(dir); err != nil {
		return mount.Mount{}, err
	}
	return mount.Mount{Type: "bind", Source: dir, Options: []string{"ro", "rbind"}}, nil
}

// UpperDir returns the upperdir of mounts when they are exactly one overlay
// mount, the form the snapshotter hands out for writable snapshots.
func UpperDir(mounts []mount.Mount) (string, bool) {
	if len(mounts) != 1 || mounts[0].Type != "overlay" {
		return "", false
	}
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "upperdir="); ok {
			return v, true
		}
	}
	return "", false
}

// LowerDirs returns the lowerdir list of a single overlay mount, top first.
func LowerDirs(mounts []mount.Mount) ([]string, bool) {
	if len(mounts) != 1 || mounts[0].Type != "overlay" {
		return nil, false
	}
	for _, o := range mounts[0].Options {
		if v, ok := strings.CutPrefix(o, "lowerdir="); ok {
			return strings.Split(v, ":"), true
		}
	}
	return nil, false
}

func (o Options) flags() []string {
	var f []string
	if o.IndexOff {
		f = append(f, "index=off")
	}
	if o.UserXattr {
		f = append(f, "userxattr")
	}
	return append(f, o.Extra...)
}

// checkPath rejects paths overlayfs would misparse: options are separated by
// commas and lowerdir entries by colons.
func checkPath(p string) error {
	if p == "" || p[0] != '/' {
		return fmt.Errorf("overlay path %q must be absolute", p)
	}
	if strings.ContainsAny(p, ",:") {
		return fmt.Errorf("overlay path %q contains ',' or ':'", p)
	}
	return nil
}

// Supported reports an error when the kernel has no overlay filesystem.
func Supported() error {
	b, err := os.ReadFile("/proc/filesystems")
	if err != nil {
		return fmt.Errorf("reading /proc/filesystems: %w", err)
	}
	if !hasFilesystem(b, "overlay") {
		return fmt.Errorf("overlayfs is not available in this kernel (modprobe overlay)")
	}
	return nil
}

// hasFilesystem parses /proc/filesystems: lines of "[nodev]\tNAME".
func hasFilesystem(procFilesystems []byte, name string) bool {
	sc := bufio.NewScanner(bytes.NewReader(procFilesystems))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) > 0 && f[len(f)-1] == name {
			return true
		}
	}
	return false
}

func indexParamSupported() bool {
	_, err := os.Stat("/sys/module/overlay/parameters/index")
	return err == nil
}
