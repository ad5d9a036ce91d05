package snapshotter

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/core/snapshots/storage"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/opencontainers/go-digest"
)

// stageFile is the extraction state earlier versions kept beside an
// unpack snapshot's upper directory, as JSON in snapshots/<id>/stage.
type stageFile struct {
	DiffID  digest.Digest `json:"diffID"`
	Hit     bool          `json:"hit,omitempty"`
	Applied bool          `json:"applied,omitempty"`
	Layer   digest.Digest `json:"layer,omitempty"`
}

// damagedStage is the labelExtract of a snapshot whose stage file could
// not be read: its Apply, Commit and Mounts fail (with ErrDataLoss), as
// they did before, and Remove removes it without touching any reference.
const damagedStage = "damaged"

// migrateStages moves the stage files of a root written by an earlier
// version into the snapshots' private labels, all in one metadata
// transaction, then removes the files. It runs before anything reads a
// stage; a restart after a failure finds the files again.
func (s *Snapshotter) migrateStages(ctx context.Context) error {
	dir := filepath.Join(s.root, "snapshots")
	files, err := filepath.Glob(filepath.Join(dir, "*", "stage"))
	if err != nil {
		return err
	}
	temps, err := filepath.Glob(filepath.Join(dir, "*", "stage.tmp"))
	if err != nil {
		return err
	}
	if len(files) == 0 && len(temps) == 0 {
		return nil
	}
	migrated := 0
	err = s.ms.WithTransaction(ctx, true, func(ctx context.Context) error {
		ids, err := storage.IDMap(ctx)
		if err != nil {
			return err
		}
		for _, f := range files {
			name, ok := ids[filepath.Base(filepath.Dir(f))]
			if !ok {
				continue // the directory of a removed snapshot: Cleanup takes it
			}
			_, info, _, err := storage.GetInfo(ctx, name)
			if err != nil {
				return err
			}
			if info.Kind != snapshots.KindActive {
				continue
			}
			b, err := os.ReadFile(f)
			if err != nil {
				return err
			}
			labels, err := stageLabels(b)
			if err != nil {
				log.G(ctx).WithError(err).WithField("snapshot", name).WithField("file", f).
					Error("the stage file of an extraction snapshot is damaged: its apply and commit will fail; remove it")
				labels = map[string]string{labelExtract: damagedStage}
			}
			for k, v := range info.Labels {
				if _, ours := labels[k]; !ours {
					labels[k] = v
				}
			}
			if _, err := storage.UpdateInfo(ctx, snapshots.Info{Name: name, Labels: labels}, "labels"); err != nil {
				return fmt.Errorf("snapshot %s: %w", name, err)
			}
			migrated++
		}
		return nil
	})
	if errdefs.IsNotFound(err) {
		return nil // no snapshots: the directories are stale, and Cleanup removes them
	}
	if err != nil {
		return fmt.Errorf("moving the stage files of an earlier version into the snapshot metadata: %w", err)
	}
	var errs []error
	for _, f := range append(files, temps...) {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	log.G(ctx).WithField("snapshots", migrated).Info("moved the stage files of an earlier version into the snapshot metadata")
	return errors.Join(errs...)
}

// stageLabels returns the contents of a stage file as the private labels
// of its snapshot.
func stageLabels(b []byte) (map[string]string, error) {
	var sf stageFile
	if err := json.Unmarshal(b, &sf); err != nil {
		return nil, err
	}
	st := stage(sf)
	if err := st.DiffID.Validate(); err != nil {
		return nil, fmt.Errorf("diffID: %w", err)
	}
	if err := st.layer().Validate(); err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	return st.labels(), nil
}
