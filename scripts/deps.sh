#!/usr/bin/env bash
# Installs everything the project needs on a Debian machine with Go, as root:
#   - Debian packages: runc, fuse3, erofs-utils, busybox-static, debootstrap,
#     spin, zstd, kmod (for modprobe), ca-certificates (for the Go proxy),
#     gcc and libisal-dev (the daemon is built with cgo and ISA-L, `-tags
#     isal`, for its gzip inflater; the isal package with the igzip command
#     is not installed, so containerd's own unpacking is as it ships);
#     qemu-system-x86 and e2fsprogs for the guest tests (tests/guests boot
#     Debian kernels built into a kit by scripts/guest-kit.sh);
#   - containerd v2.4.2 (containerd, ctr, containerd-shim-runc-v2) and the
#     distribution registry v3.1.2, built from the Go module proxy into
#     .cache/bin (git-ignored, kept between runs).
#
# Idempotent: a second run installs and builds nothing. A binary counts as
# present when `go version -m` says it was built from the wanted module
# version, so binaries built by hand with the same `go install` are reused and
# an upgrade of the pinned version rebuilds them.
#
# Environment: DEPS_SKIP_APT=1 skips the Debian packages (e.g. non-root use).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
bin="$top/.cache/bin"
mkdir -p "$bin"

CONTAINERD_VERSION=v2.4.2
REGISTRY_VERSION=v3.1.2
pkgs=(runc fuse3 erofs-utils busybox-static debootstrap spin zstd kmod ca-certificates gcc libc6-dev libisal-dev qemu-system-x86 e2fsprogs)

log() { echo "deps: $*" >&2; }
die() { echo "deps: error: $*" >&2; exit 1; }

command -v go >/dev/null 2>&1 || die "go is not on PATH: install Go (go.mod says $(awk '/^go /{print $2}' "$top/go.mod")) first"

# --- Debian packages ---------------------------------------------------------
if [ "${DEPS_SKIP_APT:-0}" != 1 ]; then
	command -v dpkg-query >/dev/null 2>&1 || die "dpkg-query not found: this script supports Debian and derivatives"
	missing=()
	for p in "${pkgs[@]}"; do
		# dpkg -s succeeds for removed-but-configured packages; check the status.
		status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
		[ "$status" = installed ] || missing+=("$p")
	done
	if [ ${#missing[@]} -gt 0 ]; then
		[ "$(id -u)" = 0 ] || die "missing Debian packages ${missing[*]}: run as root"
		log "installing ${missing[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
	fi
fi

# --- Go binaries -------------------------------------------------------------
# built_from BIN MODULE VERSION: true when BIN exists and was built from
# MODULE@VERSION.
built_from() {
	[ -x "$1" ] || return 1
	go version -m "$1" 2>/dev/null | awk -v m="$2" -v v="$3" '$1=="mod" && $2==m && $3==v {ok=1} END {exit !ok}'
}

# go_install MODULE VERSION PKG...: builds PKG@VERSION into $bin. Builds go to
# a scratch GOBIN first and are moved in afterwards, so an interrupted build
# never leaves a half-written binary that a later run would take as good.
go_install() {
	local mod=$1 ver=$2
	shift 2
	local tmp
	tmp=$(mktemp -d "$bin/.build.XXXXXX")
	local targets=()
	for p in "$@"; do targets+=("$p@$ver"); done
	if ! GOBIN="$tmp" GOFLAGS=-mod=mod go install "${targets[@]}"; then
		rm -rf "$tmp"
		die "go install ${targets[*]} failed"
	fi
	for f in "$tmp"/*; do mv -f "$f" "$bin/"; done
	rm -rf "$tmp"
}

# Remove scratch directories of builds that were interrupted.
rm -rf "$bin"/.build.* 2>/dev/null || true

ctrd_mod=github.com/containerd/containerd/v2
need=()
for b in containerd ctr containerd-shim-runc-v2; do
	built_from "$bin/$b" "$ctrd_mod" "$CONTAINERD_VERSION" || need+=("$ctrd_mod/cmd/$b")
done
if [ ${#need[@]} -gt 0 ]; then
	log "building containerd $CONTAINERD_VERSION: ${need[*]##*/} (a few minutes on 2 cores)"
	go_install "$ctrd_mod" "$CONTAINERD_VERSION" "${need[@]}"
fi

reg_mod=github.com/distribution/distribution/v3
if ! built_from "$bin/registry" "$reg_mod" "$REGISTRY_VERSION"; then
	log "building the distribution registry $REGISTRY_VERSION"
	go_install "$reg_mod" "$REGISTRY_VERSION" "$reg_mod/cmd/registry"
fi

for b in containerd ctr containerd-shim-runc-v2; do
	built_from "$bin/$b" "$ctrd_mod" "$CONTAINERD_VERSION" || die "$bin/$b is not containerd $CONTAINERD_VERSION after the build"
done
built_from "$bin/registry" "$reg_mod" "$REGISTRY_VERSION" || die "$bin/registry is not registry $REGISTRY_VERSION after the build"

# --- Kernel features ---------------------------------------------------------
# overlayfs and fuse are needed by the mounter and the end-to-end tests.
if [ "$(id -u)" = 0 ]; then
	modprobe overlay 2>/dev/null || true
	modprobe fuse 2>/dev/null || true
fi
grep -qw overlay /proc/filesystems || die "the kernel has no overlayfs (modprobe overlay failed)"
[ -e /dev/fuse ] || die "/dev/fuse is missing: FUSE is required"
for t in runc fusermount3 mkfs.erofs debootstrap zstd qemu-system-x86_64 mkfs.ext4; do
	command -v "$t" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$t" >/dev/null 2>&1 ||
		die "$t not found after installing the Debian packages"
done
[ -x /bin/busybox ] || die "/bin/busybox (busybox-static) is missing"
