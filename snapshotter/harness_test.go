package snapshotter

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"

	"github.com/containerd/containerd/v2/core/content"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/plugins/content/local"
	"github.com/containerd/errdefs"
	"github.com/opencontainers/go-digest"
	"github.com/opencontainers/image-spec/identity"
	specs "github.com/opencontainers/image-spec/specs-go"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
	"github.com/containerd-daxfs/containerd-daxfs/mounter"
	"github.com/containerd-daxfs/containerd-daxfs/overlay"
)

// The tests of the orchestrator run on real parts but for the mounter: a
// region file, containerd's bolt metadata store and local content store,
// our differ; only mounter.Mounter is faked (fakeMounter), so they need no
// root and no kernel file system.

// fakeMounter records mounts instead of making them.
type fakeMounter struct {
	mu       sync.Mutex
	mounted  map[string]mounter.Source
	mounts   int
	unmounts int
	// failNext, when set, is the error of the next Mount.
	failNext error
	// gate, when set, holds every Mount until it is closed (or the
	// Mount's context ends); entered receives each Mount's target first.
	gate    chan struct{}
	entered chan string
}

func newFakeMounter() *fakeMounter { return &fakeMounter{mounted: map[string]mounter.Source{}} }

func (f *fakeMounter) Mount(ctx context.Context, src mounter.Source, target string) error {
	f.mu.Lock()
	gate, entered, err := f.gate, f.entered, f.failNext
	f.failNext = nil
	f.mu.Unlock()
	if entered != nil {
		entered <- target
	}
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if err != nil {
		return err
	}
	if st, err := os.Stat(target); err != nil || !st.IsDir() {
		return fmt.Errorf("mount target %s: not a directory (%v)", target, err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounted[target]; ok {
		return fmt.Errorf("%s: already mounted: %w", target, errdefs.ErrAlreadyExists)
	}
	f.mounted[target] = src
	f.mounts++
	return nil
}

func (f *fakeMounter) Unmount(ctx context.Context, target string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.mounted[target]; !ok {
		return fmt.Errorf("%s: %w: not mounted", target, errdefs.ErrNotFound)
	}
	delete(f.mounted, target)
	f.unmounts++
	return nil
}

func (f *fakeMounter) Mounted(ctx context.Context) ([]mounter.MountInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []mounter.MountInfo
	for t, src := range f.mounted {
		out = append(out, mounter.MountInfo{Target: t, Source: src, Kind: "fake", State: mounter.StateMounted})
	}
	return out, nil
}

// state returns the mounts and unmounts made so far and the targets
// mounted now.
func (f *fakeMounter) state() (mounts, unmounts int, targets []string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for t := range f.mounted {
		targets = append(targets, t)
	}
	sort.Strings(targets)
	return f.mounts, f.unmounts, targets
}

func (f *fakeMounter) isMounted(target string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, ok := f.mounted[target]
	return ok
}

// testEnv is a snapshotter over a fakeMounter, with its region, content
// store and differ.
type testEnv struct {
	t       *testing.T
	ctx     context.Context
	root    string
	region  *daxmem.Region
	cs      content.Store
	mnt     *fakeMounter
	sn      *Snapshotter
	differ  *Differ
	cfg     []func(*Config)
	content ContentFunc
}

func newTestEnv(t *testing.T, configure ...func(*Config)) *testEnv {
	t.Helper()
	return newTestEnvAt(t, filepath.Join(t.TempDir(), "root"), configure...)
}

// newTestEnvAt is newTestEnv over an existing root directory.
func newTestEnvAt(t *testing.T, root string, configure ...func(*Config)) *testEnv {
	t.Helper()
	e := newClosedTestEnv(t, root, configure...)
	e.open()
	return e
}

// newClosedTestEnv is newTestEnvAt without the snapshotter: the caller
// opens it.
func newClosedTestEnv(t *testing.T, root string, configure ...func(*Config)) *testEnv {
	t.Helper()
	ctx := namespaces.WithNamespace(context.Background(), "default")
	work := t.TempDir()
	region, err := daxmem.Create(ctx, daxmem.Options{Path: filepath.Join(work, "region"), Size: 64 << 20, Entries: 256, Participants: 4})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { region.Close() })
	if _, err := region.Join(ctx, daxmem.ParticipantInfo{Host: "test", PID: os.Getpid()}, filepath.Join(work, "participant")); err != nil {
		t.Fatal(err)
	}
	cs, err := local.NewStore(filepath.Join(work, "content"))
	if err != nil {
		t.Fatal(err)
	}
	e := &testEnv{t: t, ctx: ctx, root: root, region: region, cs: cs, mnt: newFakeMounter(), cfg: configure}
	e.content = func(context.Context) (content.Provider, error) { return e.cs, nil }
	t.Cleanup(func() {
		if e.sn != nil {
			e.sn.Close()
		}
	})
	return e
}

// open starts the snapshotter over the environment's root, region and
// mounts (again, after close: a restarted daemon).
func (e *testEnv) open() {
	e.t.Helper()
	cfg := Config{Root: e.root, Region: e.region, Mounter: e.mnt, Overlay: overlay.DefaultOptions(), Content: e.content}
	for _, c := range e.cfg {
		c(&cfg)
	}
	sn, err := New(e.ctx, cfg)
	if err != nil {
		e.t.Fatal(err)
	}
	e.sn = sn
	e.differ = NewDiffer(sn, e.content, DifferOptions{})
}

// restart closes the snapshotter and opens it again.
func (e *testEnv) restart() {
	e.t.Helper()
	if err := e.sn.Close(); err != nil {
		e.t.Fatal(err)
	}
	e.open()
}

// testLayer is a layer blob in the content store.
type testLayer struct {
	desc   ocispec.Descriptor
	diffID digest.Digest
}

// layer puts a gzip layer holding one file, name, into the content store.
func (e *testEnv) layer(name string) testLayer {
	e.t.Helper()
	l, _ := e.layerOf(name, "file "+name+"\n")
	return l
}

// layerOf puts a gzip layer holding file name with data into the content
// store, and returns it and its tar.
func (e *testEnv) layerOf(name, data string) (testLayer, []byte) {
	e.t.Helper()
	tr, err := testimage.TarEntries([]testimage.Entry{testimage.File(name, []byte(data), 0o644)})
	if err != nil {
		e.t.Fatal(err)
	}
	gz, err := testimage.Compress(tr, testimage.Gzip)
	if err != nil {
		e.t.Fatal(err)
	}
	return testLayer{desc: e.blob(ocispec.MediaTypeImageLayerGzip, gz), diffID: digest.FromBytes(tr)}, tr
}

// blob puts b into the content store.
func (e *testEnv) blob(mediaType string, b []byte) ocispec.Descriptor {
	e.t.Helper()
	desc := ocispec.Descriptor{MediaType: mediaType, Digest: digest.FromBytes(b), Size: int64(len(b))}
	if err := content.WriteBlob(e.ctx, e.cs, desc.Digest.String(), bytes.NewReader(b), desc); err != nil {
		e.t.Fatal(err)
	}
	return desc
}

// manifest puts a manifest of layers and its config into the content
// store: what a proven region hit is checked against.
func (e *testEnv) manifest(layers ...testLayer) ocispec.Descriptor {
	e.t.Helper()
	cfg := ocispec.Image{Platform: ocispec.Platform{OS: "linux", Architecture: "amd64"}, RootFS: ocispec.RootFS{Type: "layers"}}
	m := ocispec.Manifest{Versioned: specs.Versioned{SchemaVersion: 2}, MediaType: ocispec.MediaTypeImageManifest}
	for _, l := range layers {
		cfg.RootFS.DiffIDs = append(cfg.RootFS.DiffIDs, l.diffID)
		m.Layers = append(m.Layers, l.desc)
	}
	cb, _ := json.Marshal(cfg)
	m.Config = e.blob(ocispec.MediaTypeImageConfig, cb)
	mb, _ := json.Marshal(m)
	return e.blob(ocispec.MediaTypeImageManifest, mb)
}

// extractLabels are the labels containerd's unpacker puts on the
// extraction snapshot of layer l at the top of chain.
func extractLabels(l testLayer, chain digest.Digest) map[string]string {
	return map[string]string{labelSnapshotRef: chain.String(), labelDiffID: l.diffID.String()}
}

// prepare prepares snapshot key over parent with labels.
func (e *testEnv) prepare(key, parent string, labels map[string]string) []mount.Mount {
	e.t.Helper()
	m, err := e.sn.Prepare(e.ctx, key, parent, snapshots.WithLabels(labels))
	if err != nil {
		e.t.Fatalf("prepare %s: %v", key, err)
	}
	return m
}

// pull unpacks layers one after the other, as containerd's unpacker does
// with our differ, and returns the names of the committed snapshots.
func (e *testEnv) pull(prefix string, layers ...testLayer) []string {
	e.t.Helper()
	var (
		names   []string
		diffIDs []digest.Digest
		parent  string
	)
	for i, l := range layers {
		diffIDs = append(diffIDs, l.diffID)
		chain := identity.ChainID(diffIDs)
		key := fmt.Sprintf("%s/extract-%d %s", prefix, i, chain)
		m := e.prepare(key, parent, extractLabels(l, chain))
		if _, err := e.differ.Apply(e.ctx, l.desc, m); err != nil {
			e.t.Fatalf("apply layer %d: %v", i, err)
		}
		name := fmt.Sprintf("%s/%s", prefix, chain)
		if err := e.sn.Commit(e.ctx, name, key); err != nil {
			e.t.Fatalf("commit layer %d: %v", i, err)
		}
		names = append(names, name)
		parent = name
	}
	return names
}

// referenced reports whether we reference layer image d in the region.
func (e *testEnv) referenced(kind daxmem.Kind, d digest.Digest) bool {
	e.t.Helper()
	k, err := daxmem.KeyFromDigest(d.String())
	if err != nil {
		e.t.Fatal(err)
	}
	ent, ok := e.region.Lookup(kind, k)
	return ok && ent.Refs&(1<<uint(e.region.ID())) != 0
}

// privateLabels returns the labels of snapshot key, ours included.
func (e *testEnv) privateLabels(key string) map[string]string {
	e.t.Helper()
	info, err := e.sn.info(e.ctx, key)
	if err != nil {
		e.t.Fatalf("info of %s: %v", key, err)
	}
	return privateOf(info.Labels)
}

// viewKeyOf returns the key of the view of committed snapshot name.
func (e *testEnv) viewKeyOf(name string) digest.Digest {
	e.t.Helper()
	key, _, _, err := e.sn.keyOf(e.ctx, name)
	if err != nil {
		e.t.Fatal(err)
	}
	return key
}
