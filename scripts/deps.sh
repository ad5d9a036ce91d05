#!/usr/bin/env bash
# Installs everything the project needs on a Debian machine with Go, as root:
# Debian packages (runc, fuse3, erofs-utils, busybox-static, debootstrap,
# spin, zstd) and containerd v2.4.2 plus the distribution registry, built from
# the Go module proxy into .cache/bin (kept between runs: git-ignored).
# Idempotent: a second run installs nothing.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
bin="$top/.cache/bin"
mkdir -p "$bin"

CONTAINERD_VERSION=v2.4.2
REGISTRY_VERSION=v3.1.2
pkgs=(runc fuse3 erofs-utils busybox-static debootstrap spin zstd kmod)

missing=()
for p in "${pkgs[@]}"; do
	dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "deps: installing ${missing[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

stamp="$bin/.containerd-$CONTAINERD_VERSION"
if [ ! -f "$stamp" ] || [ ! -x "$bin/containerd" ] || [ ! -x "$bin/ctr" ] || [ ! -x "$bin/containerd-shim-runc-v2" ]; then
	echo "deps: building containerd $CONTAINERD_VERSION (about 2 minutes)"
	GOBIN="$bin" GOFLAGS=-mod=mod go install \
		github.com/containerd/containerd/v2/cmd/containerd@$CONTAINERD_VERSION \
		github.com/containerd/containerd/v2/cmd/ctr@$CONTAINERD_VERSION \
		github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2@$CONTAINERD_VERSION
	touch "$stamp"
fi

stamp="$bin/.registry-$REGISTRY_VERSION"
if [ ! -f "$stamp" ] || [ ! -x "$bin/registry" ]; then
	echo "deps: building the distribution registry $REGISTRY_VERSION"
	GOBIN="$bin" GOFLAGS=-mod=mod go install github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION
	touch "$stamp"
fi

# overlayfs and fuse are needed by the mounter and the end-to-end tests.
modprobe overlay 2>/dev/null || true
modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "deps: /dev/fuse is missing: FUSE is required" >&2; exit 1; }
