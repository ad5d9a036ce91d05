package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
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
	var match platforms.MatchComparer
	if !*all {
		match = platforms.DefaultStrict()
		if *platform != "" {
			spec, err := platforms.Parse(*platform)
			if err != nil {
				return fmt.Errorf("%w: --platform: %v", errUsage, err)
			}
			match = platforms.OnlyStrict(spec)
		}
		opts = append(opts, ctrconverter.WithPlatform(match))
	}

	// Without a socket the client would retry for its whole timeout.
	if _, err := os.Stat(strings.TrimPrefix(*address, "unix://")); err != nil {
		return fmt.Errorf("converting %s: containerd's socket: %w", src, err)
	}
	cl, err := client.New(*address, client.WithDefaultNamespace(*namespace))
	if err != nil {
		return fmt.Errorf("connecting to containerd at %s: %w", *address, err)
	}
	defer cl.Close()
	ctx = namespaces.WithNamespace(ctx, *namespace)
	if match != nil {
		if err := checkPlatform(ctx, cl, src, match, *platform); err != nil {
			return fmt.Errorf("converting %s: %w", src, err)
		}
	}
	img, err := ctrconverter.Convert(ctx, cl, dst, src, opts...)
	if err != nil {
		return fmt.Errorf("converting %s to %s: %w", src, dst, err)
	}
	fmt.Printf("%s: %s\n", img.Name, img.Target.Digest)
	return nil
}

// checkPlatform fails unless image src has a manifest for match: the
// converter drops the manifests of an index that do not match and would
// write an empty one. A single-manifest image is converted whatever its
// platform (pre-converting for other machines is common), unless a
// platform was asked for by name.
func checkPlatform(ctx context.Context, cl *client.Client, src string, match platforms.MatchComparer, asked string) error {
	img, err := cl.GetImage(ctx, src)
	if err != nil {
		return err
	}
	cs := cl.ContentStore()
	if images.IsIndexType(img.Target().MediaType) {
		if _, err := images.Manifest(ctx, cs, img.Target(), match); err != nil {
			return fmt.Errorf("no manifest for the platform asked for (%s): %w", platformName(asked), err)
		}
		return nil
	}
	if asked == "" {
		return nil
	}
	mf, err := images.Manifest(ctx, cs, img.Target(), nil)
	if err != nil {
		return err
	}
	p, err := images.ConfigPlatform(ctx, cs, mf.Config)
	if err != nil {
		return err
	}
	if !match.Match(p) {
		return fmt.Errorf("no manifest for the platform asked for (%s): the image is for %s", asked, platforms.Format(p))
	}
	return nil
}

func platformName(p string) string {
	if p == "" {
		return "the host's, " + platforms.DefaultString()
	}
	return p
}
