package main

import (
	"context"
	"errors"
)

func runMount(ctx context.Context, args []string) error     { return errors.New("not implemented yet") }
func runUmount(ctx context.Context, args []string) error    { return errors.New("not implemented yet") }
func runFuseServe(ctx context.Context, args []string) error { return errors.New("not implemented yet") }
