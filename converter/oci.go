// Package converter turns OCI image layers into DAXFS images and builds the
// merged views of layer chains.
//
// Three conversions live here:
//
//   - ConvertLayer: a layer blob (tar, gzip or zstd compressed tar, or an
//     already converted DAXFS layer image) to a DAXFS layer image in OCI
//     form: whiteouts stay as empty ".wh.NAME" files and opaque directories
//     keep their ".wh..wh..opq" marker, so a layer image depends on nothing
//     but its own tar.
//   - ConvertDir: a directory extracted by containerd's walking differ into
//     an overlay upper (whiteouts as 0/0 character devices, opaque
//     directories as trusted.overlay.opaque) to the same OCI form.
//   - PlanView: the merged tree of a chain of layer images after the OCI
//     whiteout rules, written as a metadata-only image whose regular files
//     point into the layer images.
//
// Tar semantics follow containerd's applier (pkg/archive): later entries
// replace earlier ones, missing parents are created, the root entry is
// ignored, times before the epoch become the epoch.
package converter

import (
	"fmt"
	"path"
	"strings"
	"time"

	"github.com/containerd/containerd/v2/core/images"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// MediaTypeLayer is the media type of a pre-converted layer whose blob is
// a DAXFS layer image, not compressed: its diffID is the digest of the
// blob itself.
//
// The "application/vnd.oci.image.layer." prefix is what containerd's
// images.IsLayerType accepts for any suffix, in every containerd 2.x
// (the one nerdctl links as much as the daemon's), so every client counts
// these blobs as layers: client-side unpack (nerdctl, client.Pull), the
// transfer service and CRI. Nothing but the daxfs differ can apply them:
// containerd's walking and EROFS differs look the media type up
// (images.DiffCompression) and refuse a base type they do not know
// ("no processor for media-type"), so overlayfs never unpacks a DAXFS
// image as if it were a tar. Nydus names its blobs the same way
// (application/vnd.oci.image.layer.nydus.blob.v1).
const MediaTypeLayer = "application/vnd.oci.image.layer.daxfs.v1"

// MediaTypeLayerZstd is a zstd compressed DAXFS layer image: its diffID is
// the digest of the image once decompressed. Registries store and send
// about 0.4x the bytes of the uncompressed form, less than the gzip layer
// it came from (an image is mostly file data, which compresses like the
// tar, and padding to pages, which vanishes).
const MediaTypeLayerZstd = MediaTypeLayer + "+zstd"

// LegacyMediaTypeLayer and LegacyMediaTypeLayerZstd are the media types
// pre-converted layers had before MediaTypeLayer: still read, no longer
// written. containerd does not count them as layers unless told to (the
// transfer service's unpack_config layer_types), and clients that unpack
// themselves (nerdctl, client.Pull) drop them from the image.
const (
	LegacyMediaTypeLayer     = "application/vnd.containerd.daxfs.layer.v1"
	LegacyMediaTypeLayerZstd = LegacyMediaTypeLayer + "+zstd"
)

// IsPreconverted reports whether mt is a media type of a pre-converted
// layer: a DAXFS layer image, bare or zstd compressed, under its current
// or its legacy media type.
func IsPreconverted(mt string) bool {
	switch mt {
	case MediaTypeLayer, MediaTypeLayerZstd, LegacyMediaTypeLayer, LegacyMediaTypeLayerZstd:
		return true
	}
	return false
}

// ContentOf returns what a layer blob of media type mt holds once
// decompressed, and false for a media type that is not a layer we take.
func ContentOf(mt string) (Content, bool) {
	if IsPreconverted(mt) {
		return ContentImage, true
	}
	switch mt {
	case ocispec.MediaTypeImageLayer, ocispec.MediaTypeImageLayerGzip, ocispec.MediaTypeImageLayerZstd,
		images.MediaTypeDockerSchema2Layer, images.MediaTypeDockerSchema2LayerGzip,
		ocispec.MediaTypeImageLayerNonDistributable, ocispec.MediaTypeImageLayerNonDistributableGzip, //nolint:staticcheck // still served by registries
		ocispec.MediaTypeImageLayerNonDistributableZstd: //nolint:staticcheck
		return ContentTar, true
	}
	return ContentAny, false
}

// OCI whiteout names (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	whiteoutMeta   = whiteoutPrefix + whiteoutPrefix
	whiteoutOpaque = whiteoutMeta + ".opq"
)

// Overlay xattrs that mark an opaque directory in an overlay upper: the
// trusted namespace is the default, the user namespace is what overlayfs
// reads with the userxattr option.
var opaqueXattrs = []string{"trusted.overlay.opaque", "user.overlay.opaque"}

// isOverlayXattr reports whether name is one of overlayfs' private xattrs
// (or ours). They describe the upper directory's overlay state, not file
// content, so they are never copied into an image (an opaque marker says
// it instead).
func isOverlayXattr(name string) bool {
	return strings.HasPrefix(name, "trusted.overlay.") || strings.HasPrefix(name, "user.overlay.") ||
		strings.HasPrefix(name, "trusted.daxfs.") // ours: never taken from input
}

// cleanEntryPath turns a tar entry name into a clean relative path ("" for
// the root). Absolute names and names whose ".." components climb out of the
// root are refused: containerd would silently clamp them into the root, but
// no well-formed layer contains them.
func cleanEntryPath(name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("empty name")
	}
	if strings.HasPrefix(name, "/") {
		return "", fmt.Errorf("absolute path %q", name)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("path %q contains a NUL byte", name)
	}
	p := path.Clean(name)
	if p == "." {
		return "", nil
	}
	if p == ".." || strings.HasPrefix(p, "../") {
		return "", fmt.Errorf("path %q escapes the root", name)
	}
	for c := range strings.SplitSeq(p, "/") {
		if len(c) > 255 {
			return "", fmt.Errorf("path %q: component of %d bytes exceeds 255", name, len(c))
		}
	}
	return p, nil
}

// whiteoutKind classifies a base name.
type whiteoutKind int

const (
	notWhiteout whiteoutKind = iota
	whiteoutFile
	whiteoutOpaqueDir
)

// classifyName reports whether base is a whiteout, and checks that a
// whiteout names something a directory can hold.
func classifyName(base string) (whiteoutKind, error) {
	if !strings.HasPrefix(base, whiteoutPrefix) {
		return notWhiteout, nil
	}
	if base == whiteoutOpaque {
		return whiteoutOpaqueDir, nil
	}
	target := base[len(whiteoutPrefix):]
	if target == "" || target == "." || target == ".." {
		return 0, fmt.Errorf("invalid whiteout name %q", base)
	}
	return whiteoutFile, nil
}

// boundTime maps times containerd's applier cannot set (before the epoch,
// or beyond what a 64-bit timespec holds) to the epoch, as it does.
func boundTime(t time.Time) time.Time {
	if t.Before(time.Unix(0, 0)) || t.After(time.Unix(0, 1<<63-1)) {
		return time.Time{}
	}
	if t.Unix() == 0 && t.Nanosecond() == 0 {
		return time.Time{}
	}
	return t
}

func joinPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}
