// Package guest boots Linux guests under QEMU (TCG: no KVM needed) from
// the guest kit (scripts/guest-kit.sh, cached under /var/cache) for tests
// that need real kernels sharing real memory:
//
//   - LoadKit builds the kit once per machine, or says (UnavailableError)
//     why guests cannot run here: QEMU missing, or the kit not built and
//     Debian's archive out of reach.
//   - Start and Boot start a guest: RAM below 4 GiB, a host file as shared
//     memory at 4 GiB (soft-reserved: /dev/dax0.0 once bound to
//     device_dax) and, with PmemAlias, the same file again as legacy
//     persistent memory (a DAX-capable pmem block device); the kit's root
//     image with writes discarded; a host directory read-only on /kit;
//     user networking restricted to the agent's port and the Forwards.
//   - The guest's busybox init runs /kit/agent (cmd/guest-agent), which
//     runs the commands Run, Sh and Start send it (package agent).
//
// Guests are stopped (QEMU killed) at test cleanup; everything a guest
// writes is discarded with it.
package guest
