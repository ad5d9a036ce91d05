#!/usr/bin/env bash
# Installs everything the project needs on a Debian machine with Go, as root:
#   - Debian packages: runc, fuse3, erofs-utils, busybox-static, debootstrap,
#     spin, zstd, kmod (for modprobe), ca-certificates (for the Go proxy),
#     containernetworking-plugins (pod networks for critest's sandboxes),
#     gcc and libisal-dev (the daemon is built with cgo and ISA-L, `-tags
#     isal`, for its gzip inflater; the isal package with the igzip command
#     is not installed, so containerd's own unpacking is as it ships);
#   - containerd v2.4.2 (containerd, ctr, containerd-shim-runc-v2), the
#     distribution registry v3.1.2, crictl and critest of cri-tools v1.37.0
#     and nerdctl v2.2.1, and golangci-lint v2.15.0 (`make check`), built
#     from the Go module proxy into .cache/bin. .cache is git-ignored; in a
#     clone that has none it is made a link to $CONTAINERD_DAXFS_CACHE
#     (default /var/cache/containerd-daxfs), so builds outlive the clone
#     (CI's clean clones reuse them); one lock there serialises concurrent
#     runs. nerdctl is built in the wrapper
#     module scripts/nerdctl (its own go.mod replaces a module with a
#     local path, which `go install pkg@version` refuses); critest is a
#     Go test binary (`go test -c`), built in a scratch module.
#   - qemu-system-x86 and e2fsprogs for the guest tests (tests/guests boot
#     Debian kernels built into a kit by scripts/guest-kit.sh).
#
# Idempotent: a second run installs and builds nothing. A binary counts as
# present when `go version -m` says it was built from the wanted module
# version (Go records the module of the main package, also for nerdctl and
# critest, built in other modules), so binaries built by hand with the
# same `go install` are reused and an upgrade of the pinned version
# rebuilds them.
#
# Environment: DEPS_SKIP_APT=1 skips the Debian packages (e.g. non-root use).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -e "$top/.cache" ] && [ ! -L "$top/.cache" ]; then
	shared="${CONTAINERD_DAXFS_CACHE:-/var/cache/containerd-daxfs}"
	mkdir -p "$shared"
	ln -s "$shared" "$top/.cache"
fi
bin="$top/.cache/bin"
mkdir -p "$bin"
# Two runs sharing the cache (two clones, a CI run beside a developer's)
# build one at a time: a build's scratch directory is removed by the next.
exec 9>"$top/.cache/.deps.lock"
flock 9

CONTAINERD_VERSION=v2.4.2
REGISTRY_VERSION=v3.1.2
CRI_TOOLS_VERSION=v1.37.0
NERDCTL_VERSION=v2.2.1
GOLANGCI_LINT_VERSION=v2.15.0
pkgs=(runc fuse3 erofs-utils busybox-static debootstrap spin zstd kmod ca-certificates gcc libc6-dev libisal-dev containernetworking-plugins qemu-system-x86 e2fsprogs)

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

cri_mod=sigs.k8s.io/cri-tools
if ! built_from "$bin/crictl" "$cri_mod" "$CRI_TOOLS_VERSION"; then
	log "building crictl $CRI_TOOLS_VERSION"
	go_install "$cri_mod" "$CRI_TOOLS_VERSION" "$cri_mod/cmd/crictl"
fi

# critest is the test binary of cri-tools' cmd/critest package: built with
# `go test -c` in a scratch module that requires cri-tools at the pinned
# version.
if ! built_from "$bin/critest" "$cri_mod" "$CRI_TOOLS_VERSION"; then
	log "building critest $CRI_TOOLS_VERSION"
	tmp=$(mktemp -d "$bin/.build.XXXXXX")
	if ! (cd "$tmp" && go mod init critest-build >/dev/null 2>&1 &&
		GOFLAGS=-mod=mod go get "$cri_mod@$CRI_TOOLS_VERSION" &&
		GOFLAGS=-mod=mod go test -c -o "$tmp/critest" "$cri_mod/cmd/critest"); then
		rm -rf "$tmp"
		die "building critest $CRI_TOOLS_VERSION failed"
	fi
	mv -f "$tmp/critest" "$bin/critest"
	rm -rf "$tmp"
fi

lint_mod=github.com/golangci/golangci-lint/v2
if ! built_from "$bin/golangci-lint" "$lint_mod" "$GOLANGCI_LINT_VERSION"; then
	log "building golangci-lint $GOLANGCI_LINT_VERSION"
	go_install "$lint_mod" "$GOLANGCI_LINT_VERSION" "$lint_mod/cmd/golangci-lint"
fi

# nerdctl: built in the wrapper module scripts/nerdctl, whose go.mod
# requires nerdctl at the pinned version and go.sum pins every module.
nerdctl_mod=github.com/containerd/nerdctl/v2
if ! built_from "$bin/nerdctl" "$nerdctl_mod" "$NERDCTL_VERSION"; then
	grep -q "^require $nerdctl_mod $NERDCTL_VERSION\$" "$top/scripts/nerdctl/go.mod" ||
		die "scripts/nerdctl/go.mod does not require $nerdctl_mod $NERDCTL_VERSION"
	log "building nerdctl $NERDCTL_VERSION"
	tmp=$(mktemp -d "$bin/.build.XXXXXX")
	if ! (cd "$top/scripts/nerdctl" && GOFLAGS=-buildvcs=false go build -o "$tmp/nerdctl" "$nerdctl_mod/cmd/nerdctl"); then
		rm -rf "$tmp"
		die "building nerdctl $NERDCTL_VERSION failed"
	fi
	mv -f "$tmp/nerdctl" "$bin/nerdctl"
	rm -rf "$tmp"
fi

for b in containerd ctr containerd-shim-runc-v2; do
	built_from "$bin/$b" "$ctrd_mod" "$CONTAINERD_VERSION" || die "$bin/$b is not containerd $CONTAINERD_VERSION after the build"
done
built_from "$bin/registry" "$reg_mod" "$REGISTRY_VERSION" || die "$bin/registry is not registry $REGISTRY_VERSION after the build"
built_from "$bin/crictl" "$cri_mod" "$CRI_TOOLS_VERSION" || die "$bin/crictl is not crictl $CRI_TOOLS_VERSION after the build"
built_from "$bin/critest" "$cri_mod" "$CRI_TOOLS_VERSION" || die "$bin/critest is not critest $CRI_TOOLS_VERSION after the build"
built_from "$bin/nerdctl" "$nerdctl_mod" "$NERDCTL_VERSION" || die "$bin/nerdctl is not nerdctl $NERDCTL_VERSION after the build"
built_from "$bin/golangci-lint" "$lint_mod" "$GOLANGCI_LINT_VERSION" || die "$bin/golangci-lint is not golangci-lint $GOLANGCI_LINT_VERSION after the build"

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
