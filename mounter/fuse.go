package mounter

import (
	"context"
	"os"

	"github.com/containerd-daxfs/containerd-daxfs/mounter/fusesrv"
)

// fuseMounter mounts through the FUSE serving process (package fusesrv),
// which it starts, detached in its own session, when it does not run.
type fuseMounter struct {
	c        *fusesrv.Client
	validate bool
}

// newFUSEClient returns the FUSE mounter without contacting the serving
// process: the first call that needs it starts it.
func newFUSEClient(opts FUSEOptions) *fuseMounter {
	if opts.Binary == "" {
		// os.Executable fails only where /proc is missing; the FUSE
		// server then fails to start with the empty path, naming it.
		opts.Binary, _ = os.Executable()
	}
	args := opts.Args
	if args == nil {
		args = []string{"fuse-serve"}
	}
	cmd := append(append([]string{opts.Binary}, args...), "--state", opts.stateDir())
	return &fuseMounter{c: fusesrv.NewClient(opts.stateDir(), cmd), validate: opts.Validate}
}

func (m *fuseMounter) Mount(ctx context.Context, src Source, target string) error {
	target, err := absTarget(target)
	if err != nil {
		return err
	}
	return m.c.Mount(ctx, fusesrv.Source{Path: src.Path, Offset: src.Offset, Length: src.Length}, target, m.validate)
}

// Mounted lists the connections the serving process serves.
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
