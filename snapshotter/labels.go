package snapshotter

import (
	"context"
	"maps"
	"strings"

	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/opencontainers/go-digest"
)

// Private state is kept in snapshot labels under our own prefix, never
// under containerd.io/snapshot/: those arrive from image annotations and a
// manifest could forge them. Labels under our prefix coming from a client
// are dropped, so only the snapshotter itself ever sets them.
const (
	labelPrefix = "io.containerd.daxfs.v1/"
	// labelLayer holds the region key (a digest) of the layer image a
	// snapshot references, which our region reference follows: the layer
	// a committed snapshot adds on top of its parent, or the image an
	// extraction snapshot's region hit or apply referenced.
	labelLayer = labelPrefix + "layer"
	// labelChain holds the chain key of a committed snapshot: the region
	// key of the view that merges it with all its parents.
	labelChain = labelPrefix + "chain"
	// labelExtract marks an extraction snapshot: the diffID of the layer
	// containerd unpacks into it (see stage), or extractUnknown until our
	// differ has computed it (an unpacker that does not name it).
	labelExtract = labelPrefix + "extract"
	// labelStaged says how an extraction snapshot got its layer, if it
	// has: stagedHit or stagedApplied.
	labelStaged = labelPrefix + "staged"
)

// Values of labelStaged.
const (
	// stagedHit: the region held the layer at Prepare; the snapshot's
	// mount is read-only and nothing is applied.
	stagedHit = "hit"
	// stagedApplied: our differ wrote the layer image into the region
	// (or proved the region's image to be the blob's).
	stagedApplied = "applied"
)

// Labels containerd's unpacker sets on an extraction Prepare.
const (
	labelSnapshotRef = snapshots.LabelSnapshotRef    // containerd.io/snapshot.ref: the chain ID being unpacked
	labelDiffID      = snapshots.LabelSnapshotDiffID // containerd.io/snapshot/diff-id
	// labelParentChain is the chain ID the layer will be committed over
	// (above the first layer; containerd's unpacker does not export it).
	labelParentChain = "containerd.io/snapshot/parent-chain-id"
	// labelLayerDigest is the digest of the layer's blob, which
	// containerd's image handler for remote snapshotters sets from the
	// manifest's descriptor (CRI pulls, and pulls through the transfer
	// service with enable_remote_snapshot_annotations in the snapshotter's
	// exports).
	labelLayerDigest = "containerd.io/snapshot/cri.layer-digest"
	// labelManifestDigest is the digest of the manifest listing the
	// layer, set by the same handler.
	labelManifestDigest = "containerd.io/snapshot/cri.manifest-digest"
)

// isExtraction reports whether a snapshot is an unpacker's extraction
// snapshot: containerd's unpacker labels it with the chain it will commit
// (snapshot.ref) and the layer's diffID; the Go client's own unpack
// (rootfs.ApplyLayer, which nerdctl uses) labels it with nothing but names
// it as every unpacker does, "extract-<unique> <chain ID>"
// (snapshots.UnpackKeyFormat). Without the diffID, our differ learns it
// from the blob.
func isExtraction(key string, labels map[string]string) bool {
	if labels[labelSnapshotRef] != "" {
		return true
	}
	// containerd prefixes a proxy snapshotter's keys with
	// "<namespace>/<id>/"; an unpack key holds no slash.
	name := key[strings.LastIndexByte(key, '/')+1:]
	rest, ok := strings.CutPrefix(name, snapshots.UnpackKeyPrefix+"-")
	if !ok {
		return false
	}
	_, chain, ok := strings.Cut(rest, " ")
	return ok && digest.Digest(chain).Validate() == nil
}

// withoutPrivate returns labels without keys under our prefix.
func withoutPrivate(labels map[string]string) map[string]string {
	out := make(map[string]string, len(labels))
	for k, v := range labels {
		if !strings.HasPrefix(k, labelPrefix) {
			out[k] = v
		}
	}
	return out
}

// privateOf returns only the keys under our prefix.
func privateOf(labels map[string]string) map[string]string {
	out := map[string]string{}
	for k, v := range labels {
		if strings.HasPrefix(k, labelPrefix) {
			out[k] = v
		}
	}
	return out
}

// sanitizeOpts applies client options to learn their labels and parent, and
// returns options that carry the labels without our private keys, followed
// by extra (our own) labels.
func sanitizeOpts(opts []snapshots.Opt, extra map[string]string) (snapshots.Info, []snapshots.Opt, error) {
	var info snapshots.Info
	for _, o := range opts {
		if err := o(&info); err != nil {
			return info, nil, err
		}
	}
	labels := withoutPrivate(info.Labels)
	maps.Copy(labels, extra)
	info.Labels = labels
	out := []snapshots.Opt{snapshots.WithLabels(labels)}
	if info.Parent != "" {
		out = append(out, snapshots.WithParent(info.Parent))
	}
	return info, out, nil
}

// chainKey returns the chain key of a layer on top of parent, the way OCI
// computes chain IDs: so when layer keys are diffIDs, chain keys are the
// image's chain IDs.
func chainKey(parent, layer digest.Digest) digest.Digest {
	if parent == "" {
		return layer
	}
	return digest.FromString(parent.String() + " " + layer.String())
}

// keyNamespace returns ctx carrying, for calls back to containerd, the
// namespace of the call or else the one a snapshot key belongs to:
// containerd prefixes a proxy snapshotter's keys with their namespace
// ("<namespace>/<id>/<name>", metadata.createKey).
func keyNamespace(ctx context.Context, key string) context.Context {
	if ns, ok := namespaces.Namespace(ctx); ok {
		return namespaces.WithNamespace(ctx, ns) // into the outgoing metadata
	}
	if ns, _, ok := strings.Cut(key, "/"); ok && ns != "" {
		if err := identifiers.Validate(ns); err == nil {
			return namespaces.WithNamespace(ctx, ns)
		}
	}
	return ctx
}
