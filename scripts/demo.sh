#!/usr/bin/env bash
# The README's main command (`make demo`): installs what is missing, builds
# containerd-daxfs-grpc, starts a private containerd and the daxfs daemon on
# its embedded default region (/dev/shm/containerd-daxfs/region), imports a
# busybox image built here, and runs a container on the daxfs snapshotter.
#
#   scripts/demo.sh         set up and run (idempotent: reuses running daemons)
#   scripts/demo.sh stop    stop the demo's daemons and unmount everything
#
# The demo's containerd is separate from any containerd already on the
# machine: its state is under /var/lib/containerd-daxfs-demo and its socket
# is /run/containerd-daxfs-demo/containerd.sock.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

bin="$top/.cache/bin"
daxfs="$top/bin/containerd-daxfs-grpc"
demo=/var/lib/containerd-daxfs-demo
run=/run/containerd-daxfs-demo
ctrd_sock=$run/containerd.sock
daxfs_root=/var/lib/containerd-daxfs
daxfs_sock=/run/containerd-daxfs/containerd-daxfs-grpc.sock
image=docker.io/library/busybox-daxfs:latest
ctr=("$bin/ctr" --address "$ctrd_sock" --namespace demo)

stop() {
	"${ctr[@]}" tasks kill -s SIGKILL demo-shell >/dev/null 2>&1 || true
	for pidfile in "$run/containerd.pid" "$run/daxfs.pid"; do
		if [ -f "$pidfile" ]; then
			kill "$(cat "$pidfile")" 2>/dev/null || true
			rm -f "$pidfile"
		fi
	done
	sleep 1
	# The FUSE serving process outlives the daemon by design: end it too.
	pkill -f "fuse-serve --state $daxfs_root/fuse" 2>/dev/null || true
	grep -o " $daxfs_root/mnt/[^ ]*" /proc/self/mountinfo | while read -r m; do umount -l "$m" || true; done
	echo "demo stopped (the region stays in /dev/shm/containerd-daxfs/region)"
}

if [ "${1:-}" = stop ]; then
	stop
	exit 0
fi

if [ "$(id -u)" != 0 ]; then
	echo "demo: run as root (containerd, overlayfs and FUSE need it)" >&2
	exit 1
fi

scripts/deps.sh
mkdir -p bin "$demo" "$run"
# ISA-L for the gzip inflater (libisal-dev comes from deps.sh).
go build -tags isal -o "$daxfs" ./cmd/containerd-daxfs-grpc

# containerd, configured as the README's "Using it with containerd 2.4" says.
if ! [ -S "$ctrd_sock" ] || ! "${ctr[@]}" version >/dev/null 2>&1; then
	cat >"$demo/config.toml" <<EOF
version = 3
root = "$demo/root"
state = "$run/state"
# CRI is not needed to drive containerd with ctr; NRI would take a host-wide socket.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.nri.v1.nri"]
[grpc]
  address = "$ctrd_sock"
[ttrpc]
  address = "$run/containerd.sock.ttrpc"
[proxy_plugins.daxfs]
  type = "snapshot"
  address = "$daxfs_sock"
  capabilities = ["rebase"]
  [proxy_plugins.daxfs.exports]
    root = "$daxfs_root"
    enable_remote_snapshot_annotations = "true"
[proxy_plugins.daxfs-diff]
  type = "diff"
  address = "$daxfs_sock"
[plugins."io.containerd.service.v1.diff-service"]
  default = ["daxfs-diff", "walking"]
[plugins."io.containerd.transfer.v1.local"]
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "overlayfs"
    differ = "walking"
  [[plugins."io.containerd.transfer.v1.local".unpack_config]]
    platform = "linux/amd64"
    snapshotter = "daxfs"
    differ = "daxfs-diff"
    layer_types = ["application/vnd.containerd.daxfs.layer.v1", "application/vnd.containerd.daxfs.layer.v1+zstd"]
EOF
	echo "demo: starting containerd (log: $demo/containerd.log)"
	PATH="$bin:$PATH" setsid "$bin/containerd" --config "$demo/config.toml" \
		>"$demo/containerd.log" 2>&1 </dev/null &
	echo $! >"$run/containerd.pid"
fi

# The daxfs daemon on its defaults: region /dev/shm/containerd-daxfs/region.
if ! [ -S "$daxfs_sock" ] || ! kill -0 "$(cat "$run/daxfs.pid" 2>/dev/null || echo 0)" 2>/dev/null; then
	echo "demo: starting containerd-daxfs-grpc (log: $demo/daxfs.log)"
	setsid "$daxfs" serve --containerd-address "$ctrd_sock" >"$demo/daxfs.log" 2>&1 </dev/null &
	echo $! >"$run/daxfs.pid"
fi

ready=
for _ in $(seq 150); do
	if [ -S "$ctrd_sock" ] && [ -S "$daxfs_sock" ] && "${ctr[@]}" version >/dev/null 2>&1; then
		ready=1
		break
	fi
	sleep 0.2
done
if [ -z "$ready" ]; then
	echo "demo: the daemons did not start; last lines of their logs:" >&2
	tail -n 20 "$demo/containerd.log" "$demo/daxfs.log" >&2
	exit 1
fi

archive="$demo/busybox.oci.tar"
[ -f "$archive" ] || go run ./internal/testenv/cmd/mkimage -o "$archive" -name "$image"
"${ctr[@]}" image import --snapshotter daxfs "$archive"

echo
echo "demo: running a container on the daxfs snapshotter:"
"${ctr[@]}" run --rm --snapshotter daxfs "$image" demo-shell sh -c \
	'echo "hello from a daxfs root: $(ls /bin | wc -l) programs in /bin, busybox $(sha256sum /bin/busybox | cut -c1-12)"; mount | grep " / "'

echo
"$daxfs" region status
echo
echo "Try: ${ctr[*]} run --rm -t --snapshotter daxfs $image sh1 sh"
echo "Stop: scripts/demo.sh stop"
