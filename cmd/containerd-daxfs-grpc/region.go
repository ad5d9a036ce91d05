package main

import (
	"context"
	"errors"
)

func runRegion(ctx context.Context, args []string) error { return errors.New("not implemented yet") }
