package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/containerd/containerd/v2/client"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/converter/imageconv"
)

// runConvert makes a pre-converted image: it rewrites image SRC in
// containerd's image store as DST, every layer replaced by its DAXFS layer
// image (zstd compressed unless --uncompressed), as nydusify or
// `ctr-remote image optimize` do for their snapshotters. SRC's content
// must be local (`ctr image pull` or `ctr image import` first); push DST
// with `ctr image push`.
func runConvert(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("convert", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	address := fs.String("address", DefaultConfig().ContainerdAddress, "containerd's socket")
	namespace := fs.String("namespace", namespaces.Default, "containerd namespace of SRC and DST")
	bare := fs.Bool("uncompressed", false, "store bare DAXFS images ("+converter.MediaTypeLayer+"), not zstd compressed ones")
	platform := fs.String("platform", "", "convert this platform of a multi-platform image (default: the host's)")
	all := fs.Bool("all-platforms", false, "convert every platform (their content must all be local)")
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() != 2 {
		return fmt.Errorf("%w: want SRC and DST", errUsage)
	}
	src, dst := fs.Arg(0), fs.Arg(1)
	if *all && *platform != "" {
		return fmt.Errorf("%w: --platform and --all-platforms together", errUsage)
	}

	var copts []imageconv.Option
	if *bare {
		copts = append(copts, imageconv.WithCompression(imageconv.None))
	}
	opts := []ctrconverter.Opt{
		ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc(copts...)),
		// Docker media types become OCI ones: a DAXFS layer has no
		// Docker counterpart.
		ctrconverter.WithDockerToOCI(true),
	}
	if !*all {
		p := platforms.DefaultStrict()
		if *platform != "" {
			spec, err := platforms.Parse(*platform)
			if err != nil {
				return fmt.Errorf("%w: --platform: %v", errUsage, err)
			}
			p = platforms.OnlyStrict(spec)
		}
		opts = append(opts, ctrconverter.WithPlatform(p))
	}

	// Without a socket the client would retry for its whole timeout.
	if _, err := os.Stat(*address); err != nil {
		return fmt.Errorf("converting %s: containerd's socket: %w", src, err)
	}
	cl, err := client.New(*address, client.WithDefaultNamespace(*namespace))
	if err != nil {
		return fmt.Errorf("connecting to containerd at %s: %w", *address, err)
	}
	defer cl.Close()
	ctx = namespaces.WithNamespace(ctx, *namespace)
	img, err := ctrconverter.Convert(ctx, cl, dst, src, opts...)
	if err != nil {
		return fmt.Errorf("converting %s to %s: %w", src, dst, err)
	}
	fmt.Printf("%s: %s\n", img.Name, img.Target.Digest)
	return nil
}
