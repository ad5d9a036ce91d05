package testenv

import (
	"errors"
	"fmt"
	"path/filepath"
	"sort"
	"strings"

	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
)

// MountsUnder returns the mount points at or below dir, as listed in
// /proc/self/mountinfo, deepest (most recently mounted) first: the order in
// which they can be unmounted. Tests use it to check that nothing was left
// mounted.
func MountsUnder(dir string) ([]string, error) {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	// Compare against the resolved path too: mountinfo shows real paths.
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		real = dir
	}
	entries, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil, fmt.Errorf("reading /proc/self/mountinfo: %w", err)
	}
	var points []string
	for _, e := range entries {
		for _, d := range []string{dir, real} {
			if e.Mountpoint == d || strings.HasPrefix(e.Mountpoint, d+"/") {
				points = append(points, e.Mountpoint)
				break
			}
		}
	}
	// mountinfo lists parents before children; reverse it so children come
	// first, and keep that order stable for equal paths (stacked mounts).
	for i, j := 0, len(points)-1; i < j; i, j = i+1, j-1 {
		points[i], points[j] = points[j], points[i]
	}
	sort.SliceStable(points, func(i, j int) bool {
		return strings.Count(points[i], "/") > strings.Count(points[j], "/")
	})
	return points, nil
}

// unmountUnder unmounts everything mounted at or below dir, lazily when a
// plain unmount fails (a busy mount must not stop the cleanup). It returns
// an error when something is still mounted afterwards, so callers never
// remove a directory tree through a live mount.
func unmountUnder(dir string) error {
	for range 3 {
		points, err := MountsUnder(dir)
		if err != nil {
			return err
		}
		if len(points) == 0 {
			return nil
		}
		for _, p := range points {
			if err := unix.Unmount(p, 0); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				_ = unix.Unmount(p, unix.MNT_DETACH)
			}
		}
	}
	points, err := MountsUnder(dir)
	if err != nil {
		return err
	}
	if len(points) > 0 {
		return fmt.Errorf("still mounted under %s after unmounting: %v", dir, points)
	}
	return nil
}
