package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"

	"github.com/containerd-daxfs/containerd-daxfs/converter"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// writeHostsDir writes a containerd registry hosts directory in which
// each of hosts is served by the registry reg over plain HTTP (a mirror
// for a name like registry.k8s.io, or reg itself), and returns it.
func writeHostsDir(t *testing.T, reg string, hosts ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, h := range hosts {
		if err := os.MkdirAll(filepath.Join(dir, h), 0o755); err != nil {
			t.Fatal(err)
		}
		toml := fmt.Sprintf("[host.%q]\n  capabilities = [\"pull\", \"resolve\"]\n", "http://"+reg)
		if h == reg {
			toml = fmt.Sprintf("server = %q\n", "http://"+reg) + toml
		}
		if err := os.WriteFile(filepath.Join(dir, h, "hosts.toml"), []byte(toml), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// writeJSON writes v as JSON into dir/name and returns the path.
func writeJSON(t *testing.T, dir, name string, v any) string {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCrictl drives a node configured as the README's "Kubernetes nodes"
// (containerd with the deploy/containerd-daxfs.toml drop-in imported,
// CRI's snapshotter daxfs) with crictl 1.37: pull a plain and a
// pre-converted image, run a pod sandbox, create and start a container,
// read its logs, stop and remove it and the pod. Both images unpack into
// the region through our differ; the container's root is a daxfs
// snapshot. A pod of the RuntimeClass handler the drop-in defines for
// the daemon's own pod runs on overlayfs.
func TestCrictl(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	pause := pushPause(t, src, reg, "pause:crictl")
	plain, built := pushImage(t, src, reg, greetingImage(t, testimage.Gzip), "greeting:crictl")
	pre := reg + "/library/greeting:crictl-daxfs"
	if out, err := exec.Command(daemonBinary(t), "convert", "--address", src.Address(), "--namespace", src.Namespace, plain, pre).CombinedOutput(); err != nil {
		t.Fatalf("convert: %v\n%s", err, out)
	}
	src.CtrOK(t, "image", "push", "--plain-http", pre)

	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{
		EnableCRI: true,
		// CRI's snapshotter comes from the drop-in.
		ExtraConfig: criNodeConfig(pause, writeHostsDir(t, reg, reg), ""),
	}, daxfsOptions{DropIn: true})

	ctrd.CrictlOK(t, "pull", plain)
	requireApplied(t, d, built)
	ctrd.CrictlOK(t, "pull", pre)
	mts, preDiffIDs := imageLayers(t, ctrd, pre, "k8s.io")
	if mts[0] != converter.MediaTypeLayerZstd {
		t.Fatalf("pulled %s has layers %q", pre, mts)
	}
	if m := d.metrics(t); m["daxfs_layers_applied_total"] != float64(len(built.DiffIDs)+len(preDiffIDs)) {
		t.Fatalf("our differ applied %v layers, want %d (plain) + %d (pre-converted)", m["daxfs_layers_applied_total"], len(built.DiffIDs), len(preDiffIDs))
	}
	for _, diffID := range preDiffIDs {
		if !regionHasLayer(t, d, diffID) {
			t.Fatalf("pre-converted layer %s is not in the region", diffID)
		}
	}
	if out := ctrd.CrictlOK(t, "images", "-q"); !strings.Contains(out, "sha256:") {
		t.Fatalf("crictl images lists nothing: %q", out)
	}

	cl := ctrd.Client(t)
	ctx := namespaces.WithNamespace(context.Background(), "k8s.io")
	dir := t.TempDir()
	for i, tc := range []struct{ image, runtime, snapshotter string }{
		{plain, "", "daxfs"},
		{pre, "", "daxfs"},
		{plain, "containerd-daxfs-system", "overlayfs"},
	} {
		name := fmt.Sprintf("pod%d", i)
		logDir := filepath.Join(dir, name)
		podJSON := writeJSON(t, dir, name+".json", map[string]any{
			"metadata":      map[string]any{"name": name, "namespace": "default", "uid": "uid-" + name},
			"log_directory": logDir,
			"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
		})
		ctrJSON := writeJSON(t, dir, name+"-ctr.json", map[string]any{
			"metadata": map[string]any{"name": "greeter"},
			"image":    map[string]any{"image": tc.image},
			"command":  []string{"sh", "-c", "cat /etc/greeting; echo written > /tmp/w && cat /tmp/w; exec sleep 600"},
			"log_path": "greeter.log",
		})
		args := []string{"runp"}
		if tc.runtime != "" {
			args = append(args, "--runtime", tc.runtime)
		}
		pod := strings.TrimSpace(ctrd.CrictlOK(t, append(args, podJSON)...))
		id := strings.TrimSpace(ctrd.CrictlOK(t, "create", pod, ctrJSON, podJSON))
		ctrd.CrictlOK(t, "start", id)
		want := greeting + "written\n"
		var logs string
		for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) {
			logs = ctrd.CrictlOK(t, "logs", id)
			if logs == want || time.Now().After(deadline) {
				break
			}
		}
		if logs != want {
			t.Fatalf("%s: crictl logs %q, want %q", name, logs, want)
		}
		for _, c := range []struct{ id, what string }{{id, "container"}, {pod, "sandbox"}} {
			info, err := cl.ContainerService().Get(ctx, c.id)
			if err != nil {
				t.Fatal(err)
			}
			if info.Snapshotter != tc.snapshotter {
				t.Fatalf("%s: the %s's root is on %s, want %s", name, c.what, info.Snapshotter, tc.snapshotter)
			}
		}
		ctrd.CrictlOK(t, "stop", id)
		ctrd.CrictlOK(t, "rm", id)
		ctrd.CrictlOK(t, "stopp", pod)
		ctrd.CrictlOK(t, "rmp", pod)
		if out := ctrd.CrictlOK(t, "ps", "-a", "-q"); strings.TrimSpace(out) != "" {
			t.Fatalf("%s: containers left after rm: %q", name, out)
		}
	}

	// The pre-converted image in a pod on overlayfs: CRI unpacks it into
	// overlayfs at create, and containerd's walking differ refuses its
	// layers, naming their media type.
	podJSON := writeJSON(t, dir, "ovl.json", map[string]any{
		"metadata":      map[string]any{"name": "ovl", "namespace": "default", "uid": "uid-ovl"},
		"log_directory": filepath.Join(dir, "ovl"),
		"linux":         map[string]any{"security_context": map[string]any{"namespace_options": map[string]any{"network": 2}}},
	})
	ctrJSON := writeJSON(t, dir, "ovl-ctr.json", map[string]any{
		"metadata": map[string]any{"name": "greeter"},
		"image":    map[string]any{"image": pre},
		"command":  []string{"true"},
	})
	pod := strings.TrimSpace(ctrd.CrictlOK(t, "runp", "--runtime", "containerd-daxfs-system", podJSON))
	t.Cleanup(func() { _, _ = ctrd.Crictl(t, "rmp", "-f", pod) })
	_, err := ctrd.Crictl(t, "create", pod, ctrJSON, podJSON)
	if err == nil || !strings.Contains(err.Error(), converter.MediaTypeLayerZstd) || !strings.Contains(err.Error(), "no processor for media-type") {
		t.Fatalf("creating a container of a pre-converted image on overlayfs: %v, want containerd's refusal naming %s", err, converter.MediaTypeLayerZstd)
	}
}
