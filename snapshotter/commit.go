package snapshotter

import (
	"context"
	"crypto/sha256"
	"io"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// commitUpper converts the upper directory of active snapshot id (written
// by containerd's walking differ or by a container) into an OCI-form layer
// image, publishes it in the region and returns its key: diffID when
// containerd named the layer, else the image's sha256.
//
// The image is built in a file next to the upper first, because its size
// (and, without a diffID, its key) is known only at the end; the copy into
// the region is the one extra pass this compatibility path pays.
func (s *Snapshotter) commitUpper(ctx context.Context, id string, diffID digest.Digest) (digest.Digest, int64, error) {
	tmp := filepath.Join(s.root, "snapshots", id, "layer.daxfs")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", 0, err
	}
	defer func() {
		f.Close()
		os.Remove(tmp)
	}()
	res, err := converter.ConvertDir(ctx, s.upperPath(id), f, converter.DirOptions{MaxSize: s.maxSize})
	if err != nil {
		return "", 0, err
	}
	key := diffID
	if key == "" {
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(f, 0, 1<<62)); err != nil {
			return "", 0, err
		}
		key = digest.NewDigest(digest.SHA256, h)
	}
	if _, err := s.publishImageFile(ctx, daxmem.KindLayer, key, tmp); err != nil {
		return "", 0, err
	}
	return key, res.Size, nil
}
