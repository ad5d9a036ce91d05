package snapshotter

import (
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/opencontainers/go-digest"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// commitUpper converts the upper directory of active snapshot id (written
// by containerd's walking differ or by a container) into an OCI-form layer
// image, publishes it in the region and returns its key, the image's
// sha256, and its size.
//
// The image is built in a file next to the upper first, because its size
// and key are known only at the end; the copy into the region is the one
// extra pass this compatibility path pays.
func (s *Snapshotter) commitUpper(ctx context.Context, id string) (digest.Digest, int64, error) {
	tmp := filepath.Join(s.root, "snapshots", id, "layer.daxfs")
	f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", 0, err
	}
	defer func() {
		f.Close()
		os.Remove(tmp)
	}()
	res, err := converter.ConvertDir(ctx, s.upperPath(id), f, converter.DirOptions{MaxSize: s.maxSize, Limits: s.limits})
	if err != nil {
		return "", 0, err
	}
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, res.Size)); err != nil {
		return "", 0, fmt.Errorf("hashing the layer image of snapshot %s: %w", id, err)
	}
	key := digest.NewDigest(digest.SHA256, h)
	if _, err := s.publishImageFile(ctx, daxmem.KindLayer, key, tmp); err != nil {
		return "", 0, err
	}
	return key, res.Size, nil
}
