package tests

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/v2/pkg/namespaces"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// pushImage builds img, imports it into a scratch containerd and pushes it
// to the registry as reg/library/NAME:TAG. It returns the remote ref and
// the built image.
func pushImage(t testing.TB, src *testenv.Containerd, reg string, img testimage.Image, nameTag string) (string, *testimage.Built) {
	t.Helper()
	local := "docker.io/library/" + nameTag
	archive, built := testenv.WriteImageArchive(t, img, local)
	src.CtrOK(t, "image", "import", archive)
	remote := reg + "/library/" + nameTag
	src.CtrOK(t, "image", "tag", local, remote)
	src.CtrOK(t, "image", "push", "--plain-http", remote)
	return remote, built
}

// pushPause pushes busybox sleeping for ever, the sandbox image of the
// CRI tests, and returns its reference.
func pushPause(t testing.TB, src *testenv.Containerd, reg, nameTag string) string {
	t.Helper()
	img := testenv.BusyboxImage(t)
	img.Config.Entrypoint = []string{"/bin/sleep"}
	img.Config.Cmd = []string{"2147483647"}
	ref, _ := pushImage(t, src, reg, img, nameTag)
	return ref
}

// criNodeConfig is the CRI part of a test node's containerd config: pause
// pinned as the sandbox image, registries from the hosts directory, and,
// when snapshotter is set, CRI's snapshotter.
func criNodeConfig(pause, hosts, snapshotter string) string {
	sn := ""
	if snapshotter != "" {
		sn = fmt.Sprintf("\n  snapshotter = %q", snapshotter)
	}
	return fmt.Sprintf(`
[plugins."io.containerd.cri.v1.images"]%s
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = %q
  [plugins."io.containerd.cri.v1.images".registry]
    config_path = %q
# This sandbox may not lower oom_score_adj (the pause container asks for
# -998): clamp it to containerd's own, as rootless setups do.
[plugins."io.containerd.cri.v1.runtime"]
  restrict_oom_score_adj = true
`, sn, pause, hosts)
}

// TestDaxfsCRI drives containerd's CRI plugin, configured as a Kubernetes
// node with snapshotter = "daxfs", through the CRI gRPC API the kubelet
// uses: pull images from a registry, run a pod sandbox, create and start a
// container that reads its image, and read its log.
func TestDaxfsCRI(t *testing.T) {
	reg := testenv.StartRegistry(t)
	src := testenv.StartContainerd(t, testenv.ContainerdOptions{})
	pause := pushPause(t, src, reg, "pause:cri")
	app, appBuilt := pushImage(t, src, reg, greetingImage(t, testimage.Gzip), "greeting:cri")
	ctrd, d := startWithDaxfs(t, testenv.ContainerdOptions{
		EnableCRI:   true,
		ExtraConfig: criNodeConfig(pause, writeHostsDir(t, reg, reg), "daxfs"),
	})

	conn, err := grpc.NewClient("unix://"+ctrd.Address(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	rt, images := runtime.NewRuntimeServiceClient(conn), runtime.NewImageServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	for _, ref := range []string{pause, app} {
		if _, err := images.PullImage(ctx, &runtime.PullImageRequest{Image: &runtime.ImageSpec{Image: ref}}); err != nil {
			t.Fatalf("CRI PullImage %s: %v", ref, err)
		}
	}
	// The kubelet's pulls went through our differ into the region.
	requireApplied(t, d, appBuilt)

	logDir := t.TempDir()
	sandboxConfig := &runtime.PodSandboxConfig{
		Metadata:     &runtime.PodSandboxMetadata{Name: "daxfs-pod", Namespace: "default", Uid: "uid-daxfs-pod"},
		LogDirectory: logDir,
		Linux: &runtime.LinuxPodSandboxConfig{SecurityContext: &runtime.LinuxSandboxSecurityContext{
			NamespaceOptions: &runtime.NamespaceOption{Network: runtime.NamespaceMode_NODE},
		}},
	}
	pod, err := rt.RunPodSandbox(ctx, &runtime.RunPodSandboxRequest{Config: sandboxConfig})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	t.Cleanup(func() {
		ctx := context.Background()
		_, _ = rt.StopPodSandbox(ctx, &runtime.StopPodSandboxRequest{PodSandboxId: pod.PodSandboxId})
		_, _ = rt.RemovePodSandbox(ctx, &runtime.RemovePodSandboxRequest{PodSandboxId: pod.PodSandboxId})
	})
	ctr, err := rt.CreateContainer(ctx, &runtime.CreateContainerRequest{
		PodSandboxId: pod.PodSandboxId,
		Config: &runtime.ContainerConfig{
			Metadata: &runtime.ContainerMetadata{Name: "reader"},
			Image:    &runtime.ImageSpec{Image: app},
			Command:  []string{"sh", "-c", "cat /etc/greeting; echo written > /tmp/w && cat /tmp/w"},
			LogPath:  "reader.log",
		},
		SandboxConfig: sandboxConfig,
	})
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	if _, err := rt.StartContainer(ctx, &runtime.StartContainerRequest{ContainerId: ctr.ContainerId}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	var st *runtime.ContainerStatusResponse
	for {
		st, err = rt.ContainerStatus(ctx, &runtime.ContainerStatusRequest{ContainerId: ctr.ContainerId})
		if err != nil {
			t.Fatal(err)
		}
		if st.Status.State == runtime.ContainerState_CONTAINER_EXITED {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("container did not exit: %v", st.Status)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st.Status.ExitCode != 0 {
		t.Fatalf("container exit code %d: %s", st.Status.ExitCode, st.Status.Message)
	}
	b, err := os.ReadFile(filepath.Join(logDir, "reader.log"))
	if err != nil {
		t.Fatal(err)
	}
	// CRI log lines: "<time> stdout F <text>".
	var lines []string
	for l := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		if f := strings.SplitN(l, " ", 4); len(f) == 4 {
			lines = append(lines, f[3])
		}
	}
	if got, want := strings.Join(lines, "\n"), strings.TrimSpace(greeting)+"\nwritten"; got != want {
		t.Fatalf("container log %q, want %q", got, want)
	}
	// The container's root came from the daxfs snapshotter.
	// (CRI keeps its objects in the k8s.io namespace.)
	info, err := ctrd.Client(t).SnapshotService("daxfs").Stat(namespaces.WithNamespace(context.Background(), "k8s.io"), ctr.ContainerId)
	if err != nil {
		t.Fatalf("the container's snapshot is not in daxfs: %v", err)
	}
	if info.Parent == "" {
		t.Fatalf("container snapshot %+v has no parent image", info)
	}
}
