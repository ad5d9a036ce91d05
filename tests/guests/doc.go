// Package guests runs the product in real kernels sharing real memory:
// two QEMU guests (TCG) booted from the guest kit (scripts/guest-kit.sh:
// a Debian trixie-backports kernel with the upstream daxfs module) map one
// host file as device DAX memory, and each runs containerd, runc and
// containerd-daxfs-grpc on the devdax backend with mount.mode = "auto",
// which mounts views with the daxfs module (TestTwoKernelsOneMemory). One
// more guest checks region alignment, why the kit patches the module, and
// the route for kernels without it: the kernel's erofs with dax=always
// over the same memory as pmem (TestOneGuest). BenchmarkGuestPull prints
// pull times and page cache growth. Run as root:
//
//	go test -v -timeout 40m ./tests/guests/
//
// The first run builds the kit (minutes; cached under /var/cache). Where
// QEMU is missing or the kit's packages cannot be reached, the tests skip
// and say why, loudly; any other failure fails them.
package guests
