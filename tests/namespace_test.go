package tests

import (
	"context"
	"testing"

	diffapi "github.com/containerd/containerd/api/services/diff/v1"
	"github.com/containerd/containerd/v2/core/diff"
	diffproxy "github.com/containerd/containerd/v2/core/diff/proxy"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// TestDaxfsBlobNamespace: the differ reads blobs from the files of
// containerd's content store, which every namespace shares, only for a
// namespace that owns the blob. A client of another namespace that names
// a layer it does not have gets NotFound, and nothing is read or
// converted.
func TestDaxfsBlobNamespace(t *testing.T) {
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{})
	ref := "docker.io/library/greeting:namespace"
	archive, built := testenv.WriteImageArchive(t, greetingImage(t, testimage.Gzip), ref)
	// The blobs land in this namespace's content store; overlayfs
	// unpacks them, so the region has none of the layers.
	ctrd.CtrOK(t, "image", "import", "--snapshotter", "overlayfs", archive)
	layer := built.Layers[len(built.Layers)-1].Descriptor
	diffID := built.DiffIDs[len(built.DiffIDs)-1]
	if regionHasLayer(t, d, diffID) {
		t.Fatal("the layer is in the region before the test converts it")
	}

	other := namespaces.WithNamespace(context.Background(), "intruder")
	sn := ctrd.Client(t).SnapshotService("daxfs")
	mounts, err := sn.Prepare(other, "extract-intruder", "", snapshots.WithLabels(map[string]string{
		snapshots.LabelSnapshotRef:    built.ChainIDs()[len(built.DiffIDs)-1].String(),
		snapshots.LabelSnapshotDiffID: diffID.String(),
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Remove(other, "extract-intruder")

	conn, err := grpc.NewClient("unix://"+d.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	applier := diffproxy.NewDiffApplier(diffapi.NewDiffClient(conn)).(diff.Applier)
	if _, err := applier.Apply(other, layer, mounts); !errdefs.IsNotFound(err) {
		t.Fatalf("applying another namespace's layer: %v, want not found", err)
	}
	m := d.metrics(t)
	if m["daxfs_blobs_local_total"] != 0 || m["daxfs_blobs_remote_total"] != 0 || m["daxfs_layers_applied_total"] != 0 {
		t.Fatalf("blobs read locally %v, through the API %v, layers applied %v; want 0, 0, 0",
			m["daxfs_blobs_local_total"], m["daxfs_blobs_remote_total"], m["daxfs_layers_applied_total"])
	}
	if regionHasLayer(t, d, diffID) {
		t.Fatal("the intruder's apply put the layer into the region")
	}

	// The owner's namespace converts it, from the file.
	mine := ctrd.Context(context.Background())
	mounts, err = sn.Prepare(mine, "extract-owner", "", snapshots.WithLabels(map[string]string{
		snapshots.LabelSnapshotRef:    built.ChainIDs()[len(built.DiffIDs)-1].String(),
		snapshots.LabelSnapshotDiffID: diffID.String(),
	}))
	if err != nil {
		t.Fatal(err)
	}
	defer sn.Remove(mine, "extract-owner")
	if _, err := applier.Apply(mine, layer, mounts); err != nil {
		t.Fatalf("applying the owner's layer: %v", err)
	}
	if m := d.metrics(t); m["daxfs_blobs_local_total"] != 1 {
		t.Fatalf("the owner's layer was read locally %v times, want 1", m["daxfs_blobs_local_total"])
	}
	if !regionHasLayer(t, d, diffID) {
		t.Fatal("the owner's apply did not put the layer into the region")
	}
}
