package snapshotter

import (
	"context"
	"fmt"
	"maps"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
)

// stage is the extraction state of an unpack snapshot: the snapshot whose
// Prepare named the layer containerd unpacks (its diffID label). It is
// kept in the snapshot's private labels (labelExtract, labelStaged,
// labelLayer), written in the metadata transactions that change it.
type stage struct {
	// DiffID is the layer containerd unpacks into this snapshot; empty
	// until our differ computed it when the unpacker did not name it.
	DiffID digest.Digest
	// Hit: the region held the layer at Prepare; nothing is applied.
	Hit bool
	// Applied: our differ wrote the layer image into the region (or
	// proved the region's image to be the blob's).
	Applied bool
	// Layer is the region key of the layer image a hit or an apply
	// referenced: the diffID, or the key of an identical image the
	// diffID is an alias of. Empty means the diffID (stage files of
	// earlier versions did not keep it).
	Layer digest.Digest
}

// layer returns the region key of the layer image the stage references.
func (st stage) layer() digest.Digest {
	if st.Layer != "" {
		return st.Layer
	}
	return st.DiffID
}

// staged reports whether the snapshot holds its layer: by a hit or an
// apply, and so references the layer image.
func (st stage) staged() bool { return st.Hit || st.Applied }

// extractUnknown is labelExtract's value until the diffID is known: the
// metadata store drops labels with empty values.
const extractUnknown = "unknown"

// labels returns the stage as private labels.
func (st stage) labels() map[string]string {
	l := map[string]string{labelExtract: st.DiffID.String()}
	if st.DiffID == "" {
		l[labelExtract] = extractUnknown
	}
	switch {
	case st.Hit:
		l[labelStaged] = stagedHit
	case st.Applied:
		l[labelStaged] = stagedApplied
	}
	if st.staged() {
		l[labelLayer] = st.layer().String()
	}
	return l
}

// stageOf reads the stage of a snapshot from its labels; false when it is
// not an extraction snapshot.
func stageOf(info snapshots.Info) (stage, bool, error) {
	d, ok := info.Labels[labelExtract]
	if !ok || info.Kind != snapshots.KindActive {
		return stage{}, false, nil
	}
	var diffID digest.Digest
	if d != extractUnknown {
		var err error
		if diffID, err = digest.Parse(d); err != nil {
			return stage{}, false, fmt.Errorf("extraction state of snapshot %s is damaged (%s=%q): %w", info.Name, labelExtract, d, errdefs.ErrDataLoss)
		}
	}
	st := stage{DiffID: diffID}
	switch info.Labels[labelStaged] {
	case "":
	case stagedHit:
		st.Hit = true
	case stagedApplied:
		st.Applied = true
	default:
		return stage{}, false, fmt.Errorf("extraction state of snapshot %s is damaged (%s=%q): %w", info.Name, labelStaged, info.Labels[labelStaged], errdefs.ErrDataLoss)
	}
	if st.staged() && diffID == "" {
		return stage{}, false, fmt.Errorf("extraction state of snapshot %s is damaged (staged without a diffID): %w", info.Name, errdefs.ErrDataLoss)
	}
	if st.staged() {
		st.Layer = digest.Digest(info.Labels[labelLayer])
		if st.Layer.Validate() != nil {
			return stage{}, false, fmt.Errorf("extraction state of snapshot %s is damaged (%s=%q): %w", info.Name, labelLayer, st.Layer, errdefs.ErrDataLoss)
		}
	}
	return st, true, nil
}

// extraction returns the name, info and stage of snapshot id, for our
// differ, which knows a snapshot by the ID in its upper directory's path.
// Call it inside a metadata transaction.
func extraction(ctx context.Context, id string) (snapshots.Info, stage, bool, error) {
	ids, err := storage.IDMap(ctx)
	if err != nil {
		return snapshots.Info{}, stage{}, false, err
	}
	name, ok := ids[id]
	if !ok {
		return snapshots.Info{}, stage{}, false, fmt.Errorf("snapshot %s: %w", id, errdefs.ErrNotFound)
	}
	_, info, _, err := storage.GetInfo(ctx, name)
	if err != nil {
		return snapshots.Info{}, stage{}, false, err
	}
	st, ok, err := stageOf(info)
	return info, st, ok, err
}

// setStage replaces the stage labels of snapshot info with st's. Call it
// inside a metadata write transaction.
func setStage(ctx context.Context, info snapshots.Info, st stage) error {
	labels := make(map[string]string, len(info.Labels)+3)
	for k, v := range info.Labels {
		switch k {
		case labelExtract, labelStaged, labelLayer:
		default:
			labels[k] = v
		}
	}
	maps.Copy(labels, st.labels())
	_, err := storage.UpdateInfo(ctx, snapshots.Info{Name: info.Name, Labels: labels}, "labels")
	return err
}
