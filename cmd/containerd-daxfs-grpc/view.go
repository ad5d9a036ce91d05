package main

import (
	"context"
	"errors"
)

func runView(ctx context.Context, args []string) error { return errors.New("not implemented yet") }
