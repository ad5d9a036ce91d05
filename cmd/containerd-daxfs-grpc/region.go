package main

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem/regioncmd"
)

// runRegion is `region init|status|ls|gc|verify` (see package regioncmd).
func runRegion(ctx context.Context, args []string) error {
	err := regioncmd.Main(ctx, args, os.Stdout)
	if errors.Is(err, regioncmd.ErrUsage) {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	return err
}
