#!/usr/bin/env bash
# Builds (once) and prints the directory of the guest kit the guest tests
# boot under QEMU: a Debian kernel from trixie-backports, the upstream daxfs
# module built against it (../shared/kernel), a small initramfs and an ext4
# root image with runc and what the product needs in a guest.
#
#   scripts/guest-kit.sh [build]   build if missing; print the kit directory
#   scripts/guest-kit.sh path      print the directory the kit would have
#   scripts/guest-kit.sh probe     exit 0 when the kit exists or its packages
#                                  are reachable; else print why, exit 3
#
# The kit lives outside the clone, under $DAXFS_GUEST_CACHE (default
# $CONTAINERD_DAXFS_CACHE/guest, that is /var/cache/containerd-daxfs/guest,
# beside the tools scripts/deps.sh builds), in kit-<key>: the key hashes this
# script, the module source and the kernel series, so a change to either
# builds a new kit and later runs and CI reuse an existing one. A build goes
# to a scratch directory renamed into place when complete, under a lock, so
# concurrent callers build it once and never see half a kit.
#
# Contents of a kit (kit.env names them):
#   vmlinuz          the kernel (linux-image-<version> from trixie-backports)
#   initrd.cpio      busybox-static and the modules to mount the root disk
#   root.img         ext4: Debian trixie minbase + runc, kmod, busybox,
#                    iproute2, libisal2, dmsetup, the kernel's modules,
#                    its headers and /lib/modules/<version>/extra/daxfs.ko
#   daxfs.ko         the module with one fix (see below), also outside the
#                    image; daxfs-upstream.ko as published (in the image
#                    as /lib/modules/<version>/daxfs-upstream.ko)
#   build.log        what the build did
#
# Guests boot with busybox init (/etc/inittab): /usr/local/sbin/kit-init
# mounts the usual file systems, loads virtio networking and 9p, brings up
# eth0 (10.0.2.15, QEMU user networking), mounts the 9p share tagged "kit"
# on /kit, and init then runs /kit/agent (respawned), which the test
# harness (internal/guest) provides.
#
# Needs root, debootstrap, mkfs.ext4 and http access to deb.debian.org
# (DAXFS_GUEST_MIRROR overrides the mirror). Kernel series: DAXFS_GUEST_KERNEL
# (default 7.2, the series the module builds against unmodified but for one
# renamed function, see ../shared/kernel/README.md).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cache=${DAXFS_GUEST_CACHE:-${CONTAINERD_DAXFS_CACHE:-/var/cache/containerd-daxfs}/guest}
mirror=${DAXFS_GUEST_MIRROR:-http://deb.debian.org/debian}
series=${DAXFS_GUEST_KERNEL:-7.2}
suite=trixie
module_tar=${DAXFS_MODULE_TAR:-$top/../shared/kernel/daxfs-aa9c212.tar.gz}

# Packages of the guest root (and of the module build, which runs in it).
guest_pkgs=busybox-static,kmod,iproute2,procps,runc,libisal2,dmsetup,cpio,xz-utils,zstd,make,gcc,libc6-dev
modules_initrd="virtio_pci virtio_blk ext4"

log() { echo "guest-kit: $*" >&2; }
die() { echo "guest-kit: error: $*" >&2; exit 1; }
# unavailable: what the kit needs is not served (exit 3, as probe: the
# guest tests skip, saying why).
unavailable() { echo "guest-kit: unavailable: $*" >&2; exit 3; }

key() {
	[ -f "$module_tar" ] || die "daxfs module source $module_tar is missing (../shared/kernel beside the clone)"
	{ cat "$0"; sha256sum <"$module_tar"; echo "$series $suite $mirror"; } | sha256sum | cut -c1-16
}

kitdir() { echo "$cache/kit-$(key)"; }

probe() {
	local dir
	dir=$(kitdir)
	if [ -f "$dir/kit.env" ]; then
		return 0
	fi
	command -v debootstrap >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v debootstrap >/dev/null 2>&1 ||
		{ echo "debootstrap is not installed (scripts/deps.sh installs it)"; return 3; }
	local url="$mirror/dists/$suite-backports/InRelease"
	if ! getent hosts "$(echo "$mirror" | sed -E 's#^[a-z]+://([^/:]+).*#\1#')" >/dev/null 2>&1; then
		echo "cannot resolve the Debian mirror $mirror: the kernel packages are unreachable"
		return 3
	fi
	if command -v curl >/dev/null 2>&1; then
		curl -fsS -o /dev/null --max-time 20 "$url" 2>/dev/null || { echo "cannot fetch $url: the kernel packages are unreachable"; return 3; }
	fi
	return 0
}

# resolve_modules KVER ROOT MOD...: prints the module files (relative to
# /lib/modules/KVER) needed to load MOD..., dependencies first, once each;
# modules built into the kernel print nothing.
resolve_modules() {
	local kver=$1 root=$2
	shift 2
	local dep="$root/lib/modules/$kver/modules.dep"
	declare -A seen=()
	local out=()
	visit() {
		local name=${1//-/_} line file d
		[ -n "${seen[$name]:-}" ] && return 0
		seen[$name]=1
		line=$(awk -v n="$name" -F: '{f=$1; sub(".*/","",f); sub(/\.ko(\.[a-z]+)?$/,"",f); gsub("-","_",f); if (f==n) {print; exit}}' "$dep")
		if [ -z "$line" ]; then
			grep -qE "/${name//_/[-_]}\.ko\$" "$root/lib/modules/$kver/modules.builtin" 2>/dev/null && return 0
			die "module $name is neither in modules.dep nor built in"
		fi
		file=${line%%:*}
		for d in ${line#*:}; do
			d=${d##*/}
			d=${d%%.ko*}
			visit "$d"
		done
		out+=("$file")
	}
	for m in "$@"; do visit "$m"; done
	printf '%s\n' "${out[@]}"
}

build() {
	[ "$(id -u)" = 0 ] || die "building the guest kit needs root (debootstrap, chroot)"
	PATH="$PATH:/usr/sbin:/sbin"
	command -v debootstrap >/dev/null || die "debootstrap is not installed (scripts/deps.sh installs it)"
	command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 is not installed (e2fsprogs; scripts/deps.sh installs it)"
	local final root start
	final=$(kitdir)
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9
	if [ -f "$final/kit.env" ]; then
		echo "$final"
		return 0
	fi
	# Scratch directories of interrupted builds (we hold the lock: nobody
	# else is building).
	for d in "$cache"/.build-*; do
		[ -d "$d" ] || continue
		umount_under "$d"
		rm -rf "$d"
	done
	tmp=$(mktemp -d "$cache/.build-XXXXXX")
	root="$tmp/root"
	blog="$tmp/build.log"
	trap 'umount_under "$tmp"; log "build failed; log: $blog (kept in $tmp until the next build)"' EXIT
	start=$(date +%s)
	log "building the guest kit in $final (Debian $suite, kernel $series.x from $suite-backports; several minutes; log $blog)"

	log "debootstrap $suite minbase"
	debootstrap --variant=minbase --include="$guest_pkgs" "$suite" "$root" "$mirror" >>"$blog" 2>&1 ||
		die "debootstrap $suite from $mirror failed (log $blog):
$(tail -n 20 "$blog")"

	cat >"$root/etc/apt/sources.list.d/backports.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
	mount -t proc proc "$root/proc"
	mount --bind /dev "$root/dev"
	in_root() { chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"; }
	in_root apt-get update >>"$blog" 2>&1 || die "apt-get update in the $suite root failed (log $blog)"

	# Debian names a kernel linux-image-<version>+deb13-amd64 (a metapackage
	# of linux-binary-, linux-modules- and linux-base-<same>); the -rt and
	# -cloud flavours are not what users boot (cloud lacks NVDIMM support).
	local pkg kver
	pkg=$(in_root apt-cache search --names-only '^linux-image-[0-9].*-amd64$' | awk '{print $1}' |
		grep -E "^linux-image-${series//./\\.}\.[0-9]+\+[a-z0-9]+-amd64\$" | sort -V | tail -n 1 || true)
	[ -n "$pkg" ] || unavailable "no linux-image-$series.x-amd64 in $suite-backports any more (set DAXFS_GUEST_KERNEL to a served series the module builds against; see ../shared/kernel/README.md)"
	kver=${pkg#linux-image-}
	log "kernel $kver"
	# The kernel, its modules and its headers (with the compiler the kernel
	# was built with), without the metapackage's initramfs generator: the
	# kit has its own small initramfs.
	in_root apt-get install -y --no-install-recommends "linux-binary-$kver" "linux-modules-$kver" "linux-headers-$kver" >>"$blog" 2>&1 ||
		die "installing linux-binary/modules/headers-$kver failed (log $blog):
$(tail -n 20 "$blog")"
	in_root depmod "$kver"

	log "building the daxfs module"
	local kcflags=""
	# Linux 7.2 renamed zap_vma_ptes to zap_special_vma_range (same
	# arguments); the module's unmodified source calls the old name.
	if grep -qs 'zap_special_vma_range' "$root"/usr/src/linux-headers-*-common*/include/linux/mm.h &&
		! grep -qs 'zap_vma_ptes' "$root"/usr/src/linux-headers-*-common*/include/linux/mm.h; then
		kcflags="-Dzap_vma_ptes=zap_special_vma_range"
	fi
	build_module() { # DIR: builds DIR/daxfs/daxfs.ko
		in_root make -C "/usr/src/linux-headers-$kver" M="$1/daxfs" KCFLAGS="$kcflags" modules >>"$blog" 2>&1 ||
			die "building the daxfs module in $1 against $kver failed (log $blog):
$(tail -n 20 "$blog")"
	}
	# As published: kept as daxfs-upstream.ko, for the test that shows
	# why the kit patches it.
	mkdir -p "$root/usr/src/daxfs-upstream"
	tar -xzf "$module_tar" -C "$root/usr/src/daxfs-upstream" --strip-components=1
	build_module /usr/src/daxfs-upstream
	# With one fix: upstream's mmap of static (read-only) images refuses
	# every mapping with VM_WRITE, private ones too, so no ELF program runs
	# from a static daxfs mount (exec maps each data segment
	# MAP_PRIVATE|PROT_WRITE and the process dies of SIGSEGV), and no
	# container either. Only shared writable mappings must be refused;
	# private ones are copy-on-write into anonymous pages, which the
	# module's fault handler already gives private mappings.
	mkdir -p "$root/usr/src/daxfs"
	tar -xzf "$module_tar" -C "$root/usr/src/daxfs" --strip-components=1
	local f="$root/usr/src/daxfs/daxfs/file.c"
	sed -i 's/^\tif (vma->vm_flags & VM_WRITE)$/\tif ((vma->vm_flags \& VM_WRITE) \&\& (vma->vm_flags \& VM_SHARED))/' "$f"
	[ "$(grep -c '^	if ((vma->vm_flags & VM_WRITE) && (vma->vm_flags & VM_SHARED))$' "$f")" = 1 ] ||
		die "the private-mapping fix no longer applies to $module_tar (daxfs/file.c changed): review it"
	build_module /usr/src/daxfs
	mkdir -p "$root/lib/modules/$kver/extra"
	cp "$root/usr/src/daxfs/daxfs/daxfs.ko" "$root/lib/modules/$kver/extra/daxfs.ko"
	cp "$root/usr/src/daxfs-upstream/daxfs/daxfs.ko" "$root/lib/modules/$kver/daxfs-upstream.ko"
	in_root depmod "$kver"
	cp "$root/usr/src/daxfs/daxfs/daxfs.ko" "$tmp/daxfs.ko"
	cp "$root/usr/src/daxfs-upstream/daxfs/daxfs.ko" "$tmp/daxfs-upstream.ko"
	local img
	for img in "$root/boot/vmlinuz-$kver" "$root/usr/lib/modules/$kver/vmlinuz" ""; do
		[ -f "$img" ] && break
	done
	[ -n "$img" ] || die "no vmlinuz for $kver in /boot or /usr/lib/modules/$kver"
	cp "$img" "$tmp/vmlinuz"

	log "initramfs"
	local ird="$root/tmp/initrd"
	mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
	cp "$root/bin/busybox" "$ird/bin/busybox"
	local f n=0 mods
	: >"$ird/lib/modules/order"
	# Resolved first: a failure inside $(...) in the for list would not stop the build.
	mods=$(resolve_modules "$kver" "$root" $modules_initrd) || die "resolving the initrd's modules ($modules_initrd) failed"
	for f in $mods; do
		n=$((n + 1))
		local base=${f##*/}
		case "$base" in
		*.ko.xz) xz -dc "$root/lib/modules/$kver/$f" >"$ird/lib/modules/${base%.xz}" ;;
		*.ko.zst) zstd -qdc "$root/lib/modules/$kver/$f" >"$ird/lib/modules/${base%.zst}" ;;
		*.ko.gz) gzip -dc "$root/lib/modules/$kver/$f" >"$ird/lib/modules/${base%.gz}" ;;
		*) cp "$root/lib/modules/$kver/$f" "$ird/lib/modules/$base" ;;
		esac
		echo "${base%.ko*}.ko" >>"$ird/lib/modules/order"
	done
	cat >"$ird/init" <<'EOF'
#!/bin/busybox sh
# Loads what it takes to mount the root disk, mounts it and switches to it.
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
for m in $(/bin/busybox cat /lib/modules/order); do
	/bin/busybox insmod /lib/modules/$m || echo "initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox sleep 0.05; i=$((i+1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; /bin/busybox sh; }
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /bin/busybox init
EOF
	chmod 755 "$ird/init"
	in_root sh -c 'cd /tmp/initrd && find . | cpio -o -H newc --quiet' >"$tmp/initrd.cpio"
	rm -rf "$ird"
	log "initramfs: $n modules"

	log "guest root"
	mkdir -p "$root/kit" "$root/usr/local/sbin"
	cat >"$root/etc/inittab" <<'EOF'
::sysinit:/usr/local/sbin/kit-init
::respawn:/kit/agent
::shutdown:/bin/sync
EOF
	cat >"$root/usr/local/sbin/kit-init" <<'EOF'
#!/bin/sh
# Guest start-up before the harness's agent runs (busybox init sysinit).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/pts /dev/shm /sys/fs/cgroup
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -o remount,rw /
name=$(sed -n 's/.*daxfs\.name=\([^ ]*\).*/\1/p' /proc/cmdline)
hostname "${name:-guest}"
modprobe -a virtio_net 9pnet_virtio 9p overlay loop
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
mount -t 9p -o trans=virtio,version=9p2000.L,ro kit /kit || echo "kit-init: mounting the kit share failed"
EOF
	chmod 755 "$root/usr/local/sbin/kit-init"
	echo "guest" >"$root/etc/hostname"
	printf '127.0.0.1 localhost\n' >"$root/etc/hosts"
	: >"$root/etc/fstab"
	in_root apt-get clean
	rm -rf "$root"/var/lib/apt/lists/* "$root/usr/src/daxfs" "$root/usr/src/daxfs-upstream"
	umount_under "$tmp"

	local used size
	used=$(du -sm "$root" | cut -f1)
	size=$((used + 3072))
	mkfs.ext4 -q -F -L kitroot -d "$root" "$tmp/root.img" "${size}M" >>"$blog" 2>&1 || die "mkfs.ext4 -d of the guest root failed (log $blog)"
	rm -rf "$root"
	cat >"$tmp/kit.env" <<EOF
KERNEL_VERSION=$kver
KERNEL_PACKAGE=$pkg
SUITE=$suite
MIRROR=$mirror
BUILT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
BUILD_SECONDS=$(($(date +%s) - start))
EOF
	blog="$final/build.log"
	mv "$tmp" "$final"
	trap - EXIT
	# Kits of earlier versions of this script or the module: a guest still
	# running from one keeps its open files.
	for d in "$cache"/kit-*; do
		[ "$d" = "$final" ] || rm -rf "$d"
	done
	log "kit ready in $(($(date +%s) - start)) s: $final"
	echo "$final"
}

# umount_under DIR: unmounts everything mounted at or below DIR, deepest first.
umount_under() {
	local m
	for m in $(awk -v d="$1" '$2 == d || index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r); do
		umount -l "$m" 2>/dev/null || true
	done
}

case "${1:-build}" in
build) build ;;
path) kitdir ;;
probe) probe ;;
*) die "usage: $0 [build|path|probe]" ;;
esac
