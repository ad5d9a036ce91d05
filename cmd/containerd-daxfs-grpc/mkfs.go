package main

import (
	"context"
	"errors"
)

func runMkfs(ctx context.Context, args []string) error { return errors.New("not implemented yet") }
