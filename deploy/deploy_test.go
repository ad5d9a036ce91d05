// Package deploy holds the Kubernetes deployment of containerd-daxfs
// (containerd-daxfs.yaml, the containerd drop-in containerd-daxfs.toml, the
// image's Dockerfile). Its tests decode the manifests strictly into the
// Kubernetes API types, check that the DaemonSet, the drop-in and the
// daemon's config agree on paths, and load the drop-in and the config
// with the real containerd and daemon.
package deploy

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pelletier/go-toml/v2"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// decodeStrict decodes every document of a multi-document YAML manifest
// into its typed Kubernetes object, failing on unknown or duplicate
// fields and unknown kinds, as `kubectl apply --validate=strict` does.
func decodeStrict(data []byte) ([]runtime.Object, error) {
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, nodev1.AddToScheme} {
		if err := add(scheme); err != nil {
			return nil, err
		}
	}
	dec := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var objs []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, _, err := dec.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i, err)
		}
		objs = append(objs, obj)
	}
}

func stripComments(doc []byte) []byte {
	var out []byte
	for l := range bytes.SplitSeq(doc, []byte("\n")) {
		if !bytes.HasPrefix(bytes.TrimSpace(l), []byte("#")) {
			out = append(append(out, l...), '\n')
		}
	}
	return out
}

type manifests struct {
	ns     *corev1.Namespace
	rc     *nodev1.RuntimeClass
	cm     *corev1.ConfigMap
	ds     *appsv1.DaemonSet
	config string // the daemon's config.toml in the ConfigMap
}

func readManifests(t *testing.T) manifests {
	t.Helper()
	data, err := os.ReadFile("containerd-daxfs.yaml")
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeStrict(data)
	if err != nil {
		t.Fatalf("containerd-daxfs.yaml: %v", err)
	}
	var m manifests
	for _, o := range objs {
		switch o := o.(type) {
		case *corev1.Namespace:
			m.ns = o
		case *nodev1.RuntimeClass:
			m.rc = o
		case *corev1.ConfigMap:
			m.cm = o
		case *appsv1.DaemonSet:
			m.ds = o
		default:
			t.Fatalf("unexpected object %T", o)
		}
	}
	if m.ns == nil || m.rc == nil || m.cm == nil || m.ds == nil {
		t.Fatalf("want a Namespace, a RuntimeClass, a ConfigMap and a DaemonSet, got %d objects", len(objs))
	}
	m.config = m.cm.Data["config.toml"]
	return m
}

// TestManifestsDecodeStrictly is the strictness of decodeStrict itself:
// the shipped manifests decode, and a misspelt field, a duplicated one, a
// value of the wrong type or an unknown kind is an error naming it.
func TestManifestsDecodeStrictly(t *testing.T) {
	data, err := os.ReadFile("containerd-daxfs.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeStrict(data); err != nil {
		t.Fatalf("shipped manifests: %v", err)
	}
	for _, tc := range []struct{ name, from, to, want string }{
		{"unknown field", "mountPropagation: Bidirectional", "mountPropagaton: Bidirectional", `unknown field "spec.template.spec.containers[0].volumeMounts[1].mountPropagaton"`},
		{"duplicate field", "      hostPID: true\n", "      hostPID: true\n      hostPID: false\n", `key "hostPID" already set`},
		{"wrong type", "terminationGracePeriodSeconds: 30", "terminationGracePeriodSeconds: soon", "terminationGracePeriodSeconds"},
		{"unknown kind", "kind: DaemonSet", "kind: DaemonSett", `no kind "DaemonSett"`},
	} {
		bad := strings.Replace(string(data), tc.from, tc.to, 1)
		if bad == string(data) {
			t.Fatalf("%s: %q not in the manifest", tc.name, tc.from)
		}
		if _, err := decodeStrict([]byte(bad)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// dropIn is what deploy/containerd-daxfs.toml tells containerd.
type dropIn struct {
	ProxyPlugins map[string]struct {
		Type    string            `toml:"type"`
		Address string            `toml:"address"`
		Exports map[string]string `toml:"exports"`
	} `toml:"proxy_plugins"`
	Plugins map[string]any `toml:"plugins"`
}

// daemonConfig is the part of the daemon's config.toml the deployment
// depends on.
type daemonConfig struct {
	Root              string `toml:"root"`
	Address           string `toml:"address"`
	ContainerdAddress string `toml:"containerd_address"`
	ContainerdRoot    string `toml:"containerd_root"`
	Region            struct {
		Backend string `toml:"backend"`
		Path    string `toml:"path"`
	} `toml:"region"`
}

// TestDaemonSetFitsDropInAndConfig checks that the pod can do its job:
// privileged, in the host's PID namespace, on the RuntimeClass whose
// handler the drop-in defines on overlayfs; the host directories of the
// daemon's config (state with bidirectional propagation, socket, region,
// containerd's root and socket) and /dev/fuse are mounted at the same
// paths; and the drop-in's proxy plugins dial the daemon's socket with
// the daemon's root.
func TestDaemonSetFitsDropInAndConfig(t *testing.T) {
	m := readManifests(t)
	var cfg daemonConfig
	if err := toml.Unmarshal([]byte(m.config), &cfg); err != nil {
		t.Fatalf("ConfigMap config.toml: %v", err)
	}
	b, err := os.ReadFile("containerd-daxfs.toml")
	if err != nil {
		t.Fatal(err)
	}
	var di dropIn
	if err := toml.Unmarshal(b, &di); err != nil {
		t.Fatalf("containerd-daxfs.toml: %v", err)
	}
	for _, name := range []string{"daxfs", "daxfs-diff"} {
		if p := di.ProxyPlugins[name]; p.Address != cfg.Address {
			t.Errorf("proxy plugin %s dials %q, the daemon serves on %q", name, p.Address, cfg.Address)
		}
	}
	if got := di.ProxyPlugins["daxfs"].Exports["root"]; got != cfg.Root {
		t.Errorf("proxy plugin daxfs exports root %q, the daemon's root is %q", got, cfg.Root)
	}

	ds, pod := m.ds, m.ds.Spec.Template.Spec
	if ds.Namespace != m.ns.Name || m.cm.Namespace != m.ns.Name {
		t.Errorf("DaemonSet in %q, ConfigMap in %q, namespace %q", ds.Namespace, m.cm.Namespace, m.ns.Name)
	}
	if pod.RuntimeClassName == nil || *pod.RuntimeClassName != m.rc.Name {
		t.Errorf("pod runtime class %v, want %q", pod.RuntimeClassName, m.rc.Name)
	}
	handlers := di.Plugins["io.containerd.cri.v1.runtime"].(map[string]any)["containerd"].(map[string]any)["runtimes"].(map[string]any)
	h, ok := handlers[m.rc.Handler].(map[string]any)
	if !ok || h["snapshotter"] != "overlayfs" {
		t.Errorf("drop-in runtime handler %q: %v, want one on the overlayfs snapshotter", m.rc.Handler, h)
	}
	if !pod.HostPID {
		t.Error("pod is not in the host's PID namespace")
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	if c.SecurityContext == nil || c.SecurityContext.Privileged == nil || !*c.SecurityContext.Privileged {
		t.Error("container is not privileged")
	}
	if got := append(slices.Clone(c.Command), c.Args...); !slices.Equal(got, []string{"/usr/local/bin/containerd-daxfs-grpc", "serve", "--config", "/etc/containerd-daxfs/config.toml"}) {
		t.Errorf("container runs %q", got)
	}

	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	mounts := map[string]corev1.VolumeMount{}
	for _, vm := range c.VolumeMounts {
		if _, ok := volumes[vm.Name]; !ok {
			t.Errorf("volume mount %s names no volume", vm.Name)
		}
		mounts[vm.MountPath] = vm
	}
	if vm, ok := mounts["/etc/containerd-daxfs"]; !ok || volumes[vm.Name].ConfigMap == nil || volumes[vm.Name].ConfigMap.Name != m.cm.Name {
		t.Errorf("/etc/containerd-daxfs is not the ConfigMap %s", m.cm.Name)
	}
	// hostDir fails unless dir is a host path mounted at the same place.
	hostDir := func(dir string) corev1.VolumeMount {
		t.Helper()
		for p := dir; p != "/"; p = filepath.Dir(p) {
			vm, ok := mounts[p]
			if !ok {
				continue
			}
			hp := volumes[vm.Name].HostPath
			if hp == nil || hp.Path != p {
				t.Errorf("%s is mounted at %s from %v, not from the host's %s", dir, p, volumes[vm.Name].VolumeSource, p)
			}
			return vm
		}
		t.Errorf("%s is not on a host path mount", dir)
		return corev1.VolumeMount{}
	}
	if vm := hostDir(cfg.Root); vm.MountPropagation == nil || *vm.MountPropagation != corev1.MountPropagationBidirectional {
		t.Errorf("state %s is mounted without bidirectional propagation: the host would not see the views", cfg.Root)
	}
	hostDir(filepath.Dir(cfg.Address))
	hostDir(filepath.Dir(cfg.Region.Path))
	hostDir(filepath.Dir(cfg.ContainerdAddress))
	if vm := hostDir(cfg.ContainerdRoot); !vm.ReadOnly {
		t.Errorf("containerd's root %s is mounted writable", cfg.ContainerdRoot)
	}
	hostDir("/dev/fuse")
}

// TestDropInLoadsIntoContainerd merges the drop-in into containerd's
// default configuration with the real containerd (`containerd config
// dump`, the configuration it would run with): the proxy plugins are
// there, our differ comes first in the diff service's order (slices in
// imports replace, not append to, the defaults), CRI unpacks into daxfs
// and the system handler runs on overlayfs.
func TestDropInLoadsIntoContainerd(t *testing.T) {
	bin := testenv.Bin(t, "containerd")
	dir := t.TempDir()
	def, err := exec.Command(bin, "config", "default").Output()
	if err != nil {
		t.Fatalf("containerd config default: %v", err)
	}
	dropIn, err := filepath.Abs("containerd-daxfs.toml")
	if err != nil {
		t.Fatal(err)
	}
	main := strings.Replace(string(def), "imports = ['/etc/containerd/conf.d/*.toml']", fmt.Sprintf("imports = [%q]", dropIn), 1)
	if main == string(def) {
		t.Fatal("containerd's default config has no conf.d import to replace")
	}
	mainPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(mainPath, []byte(main), 0o644); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	dump := exec.Command(bin, "--config", mainPath, "config", "dump")
	dump.Stderr = &stderr
	out, err := dump.Output()
	if err != nil {
		t.Fatalf("containerd config dump: %v\n%s", err, stderr.String())
	}
	var merged struct {
		ProxyPlugins map[string]struct {
			Type    string `toml:"type"`
			Address string `toml:"address"`
		} `toml:"proxy_plugins"`
		Plugins struct {
			Diff struct {
				Default []string `toml:"default"`
			} `toml:"io.containerd.service.v1.diff-service"`
			Images struct {
				Snapshotter string `toml:"snapshotter"`
			} `toml:"io.containerd.cri.v1.images"`
			Runtime struct {
				Containerd struct {
					Runtimes map[string]struct {
						Snapshotter string `toml:"snapshotter"`
					} `toml:"runtimes"`
				} `toml:"containerd"`
			} `toml:"io.containerd.cri.v1.runtime"`
			Transfer struct {
				UnpackConfig []struct {
					Snapshotter string `toml:"snapshotter"`
					Differ      string `toml:"differ"`
				} `toml:"unpack_config"`
			} `toml:"io.containerd.transfer.v1.local"`
		} `toml:"plugins"`
	}
	if err := toml.Unmarshal(out, &merged); err != nil {
		t.Fatalf("parsing containerd's dump: %v\n%s", err, out)
	}
	if p := merged.ProxyPlugins["daxfs"]; p.Type != "snapshot" {
		t.Errorf("proxy plugin daxfs: %+v", p)
	}
	if p := merged.ProxyPlugins["daxfs-diff"]; p.Type != "diff" {
		t.Errorf("proxy plugin daxfs-diff: %+v", p)
	}
	if got := merged.Plugins.Diff.Default; !slices.Equal(got, []string{"daxfs-diff", "walking"}) {
		t.Errorf("diff service order %q, want daxfs-diff first", got)
	}
	if got := merged.Plugins.Images.Snapshotter; got != "daxfs" {
		t.Errorf("CRI snapshotter %q", got)
	}
	if got := merged.Plugins.Runtime.Containerd.Runtimes["containerd-daxfs-system"].Snapshotter; got != "overlayfs" {
		t.Errorf("handler containerd-daxfs-system on snapshotter %q", got)
	}
	found := false
	for _, u := range merged.Plugins.Transfer.UnpackConfig {
		found = found || u.Snapshotter == "daxfs" && u.Differ == "daxfs-diff"
	}
	if !found {
		t.Errorf("no unpack_config for daxfs: %+v", merged.Plugins.Transfer.UnpackConfig)
	}
}

// TestConfigMapConfigServes starts the real daemon as the DaemonSet does
// (its command and arguments, the ConfigMap's config.toml) with the host
// paths moved into a temporary directory by the daemon's flags: the
// config is loaded with the daemon's strict loader and the daemon serves.
func TestConfigMapConfigServes(t *testing.T) {
	testenv.RequireRoot(t)
	m := readManifests(t)
	dir, err := os.MkdirTemp("", "dxdeploy")
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "containerd-daxfs-grpc")
	build := exec.Command("go", "build", "-o", bin, "./cmd/containerd-daxfs-grpc")
	build.Dir = testenv.ModuleRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building the daemon: %v\n%s", err, out)
	}
	cfgPath := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfgPath, []byte(m.config), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "daxfs.sock")
	region := filepath.Join("/dev/shm", filepath.Base(dir)+"-region")
	args := slices.Clone(m.ds.Spec.Template.Spec.Containers[0].Args)
	i := slices.Index(args, "--config")
	if i < 0 || i+1 >= len(args) {
		t.Fatalf("container args %q have no --config", args)
	}
	args[i+1] = cfgPath
	args = append(args, "--root", filepath.Join(dir, "root"), "--address", sock,
		"--region-path", region, "--region-size", "64MiB", "--containerd-address", filepath.Join(dir, "no-containerd.sock"))
	logPath := filepath.Join(dir, "daemon.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		mounts, _ := testenv.MountsUnder(dir)
		if len(mounts) > 0 {
			t.Errorf("the daemon left mounts under %s: %v", dir, mounts)
			return
		}
		_ = os.RemoveAll(dir)
		_ = os.Remove(region)
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return
		}
		select {
		case err := <-exited:
			log, _ := os.ReadFile(logPath)
			t.Fatalf("the daemon exited with the ConfigMap's config: %v\n%s", err, log)
		case <-ctx.Done():
			log, _ := os.ReadFile(logPath)
			t.Fatalf("the daemon did not serve on %s:\n%s", sock, log)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
