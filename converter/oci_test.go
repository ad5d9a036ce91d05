package converter

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/containerd/containerd/v2/core/diff"
	"github.com/containerd/containerd/v2/core/images"
	"github.com/containerd/errdefs"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// TestPreconvertedMediaTypes pins what containerd makes of our media
// types: the current ones are layers to images.IsLayerType (so clients
// that unpack themselves keep them), containerd's differs find no stream
// processor for them (so overlayfs refuses them instead of untarring a
// DAXFS image), and the legacy ones are still recognised by
// IsPreconverted. nerdctl 2.2.1 links containerd 2.2.1, whose IsLayerType
// accepts any type with the OCI layer prefix and no +suffix rules; the
// prefix is checked here, the binary in tests/nerdctl_test.go.
func TestPreconvertedMediaTypes(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		mt           string
		preconverted bool
		layer        bool // images.IsLayerType in containerd 2.4
	}{
		{MediaTypeLayer, true, true},
		{MediaTypeLayerZstd, true, true},
		{LegacyMediaTypeLayer, true, false},
		{LegacyMediaTypeLayerZstd, true, false},
		{ocispec.MediaTypeImageLayer, false, true},
		{ocispec.MediaTypeImageLayerGzip, false, true},
		{ocispec.MediaTypeImageLayerZstd, false, true},
		{images.MediaTypeDockerSchema2LayerGzip, false, true},
		{"application/vnd.oci.image.layer.nydus.blob.v1", false, true},
		{images.MediaTypeErofsLayer, false, true},
		{"", false, false},
	} {
		if got := IsPreconverted(tc.mt); got != tc.preconverted {
			t.Errorf("IsPreconverted(%q) = %v, want %v", tc.mt, got, tc.preconverted)
		}
		if got := images.IsLayerType(tc.mt); got != tc.layer {
			t.Errorf("images.IsLayerType(%q) = %v, want %v", tc.mt, got, tc.layer)
		}
		if !tc.preconverted {
			continue
		}
		if images.IsNonDistributable(tc.mt) {
			t.Errorf("%q counts as non-distributable: registries would not get it pushed", tc.mt)
		}
		// containerd's walking differ (and the EROFS differ) build
		// their stream from the media type: no processor, no unpack.
		if _, err := images.DiffCompression(ctx, tc.mt); !errdefs.IsNotImplemented(err) {
			t.Errorf("images.DiffCompression(%q) = %v, want not implemented", tc.mt, err)
		}
		chain := diff.NewProcessorChain(tc.mt, bytes.NewReader(nil))
		if _, err := diff.GetProcessor(ctx, chain, nil); !errors.Is(err, diff.ErrNoProcessor) {
			t.Errorf("diff.GetProcessor(%q) = %v, want %v", tc.mt, err, diff.ErrNoProcessor)
		}
	}
	// containerd before 2.4 (nerdctl 2.2.1 links 2.2.1) recognises OCI
	// layers by this prefix alone.
	for _, mt := range []string{MediaTypeLayer, MediaTypeLayerZstd} {
		if !strings.HasPrefix(mt, "application/vnd.oci.image.layer.") {
			t.Errorf("%q lacks the OCI layer prefix", mt)
		}
	}
}
