package main

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/client"
	"github.com/containerd/containerd/v2/core/images"
	ctrconverter "github.com/containerd/containerd/v2/core/images/converter"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/platforms"
	"github.com/urfave/cli/v3"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/converter/imageconv"
)

// runConvert makes a pre-converted image: it rewrites image SRC in
// containerd's image store as DST, every layer replaced by its DAXFS layer
// image (zstd compressed unless --uncompressed), as nydusify or
// `ctr-remote image optimize` do for their snapshotters. SRC's content
// must be local (`ctr image pull` or `ctr image import` first); push DST
// with `ctr image push`.
func convertCommand() *cli.Command {
	return &cli.Command{
		Name:      "convert",
		Usage:     "make a pre-converted image DST from SRC in containerd's image store",
		ArgsUsage: "SRC DST",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "address", Value: DefaultConfig().ContainerdAddress, Usage: "containerd's socket"},
			&cli.StringFlag{Name: "namespace", Value: namespaces.Default, Usage: "containerd namespace of SRC and DST"},
			&cli.BoolFlag{Name: "uncompressed", Usage: "store bare DAXFS images (" + converter.MediaTypeLayer + "), not zstd compressed ones"},
			&cli.StringFlag{Name: "platform", Usage: "convert this platform of a multi-platform image (default: the host's)"},
			&cli.BoolFlag{Name: "all-platforms", Usage: "convert every platform (their content must all be local)"},
		},
		Action: runConvert,
	}
}

func runConvert(ctx context.Context, cmd *cli.Command) error {
	if cmd.NArg() != 2 {
		return usage("want SRC and DST")
	}
	src, dst := cmd.Args().Get(0), cmd.Args().Get(1)
	address, namespace, platform := cmd.String("address"), cmd.String("namespace"), cmd.String("platform")
	all := cmd.Bool("all-platforms")
	if all && platform != "" {
		return usage("--platform and --all-platforms together")
	}

	var copts []imageconv.Option
	if cmd.Bool("uncompressed") {
		copts = append(copts, imageconv.WithCompression(imageconv.None))
	}
	opts := []ctrconverter.Opt{
		ctrconverter.WithLayerConvertFunc(imageconv.LayerConvertFunc(copts...)),
		// Docker media types become OCI ones: a DAXFS layer has no
		// Docker counterpart.
		ctrconverter.WithDockerToOCI(true),
	}
	var match platforms.MatchComparer
	if !all {
		match = platforms.DefaultStrict()
		if platform != "" {
			spec, err := platforms.Parse(platform)
			if err != nil {
				return usage("--platform: %v", err)
			}
			match = platforms.OnlyStrict(spec)
		}
		opts = append(opts, ctrconverter.WithPlatform(match))
	}

	// Without a socket the client would retry for its whole timeout.
	if _, err := os.Stat(strings.TrimPrefix(address, "unix://")); err != nil {
		return fmt.Errorf("converting %s: containerd's socket: %w", src, err)
	}
	cl, err := client.New(address, client.WithDefaultNamespace(namespace))
	if err != nil {
		return fmt.Errorf("connecting to containerd at %s: %w", address, err)
	}
	defer cl.Close()
	ctx = namespaces.WithNamespace(ctx, namespace)
	if match != nil {
		if err := checkPlatform(ctx, cl, src, match, platform); err != nil {
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
