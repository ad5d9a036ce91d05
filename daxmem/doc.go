// Package daxmem is the shared memory region that holds DAXFS images: one
// contiguous byte range mapped MAP_SHARED by every participant (one
// participant = one snapshotter daemon = one kernel instance or host).
//
// # Layout
//
// All offsets are from the start of the mapping and page (4096) aligned.
//
//	0                    header, one page (see layout.go for the fields)
//	4096                 participant table: Participants slots of 256 bytes
//	4096 + P*256 (page)  index: Entries slots of 192 bytes
//	after index (page)   data area: extents holding images, up to Size;
//	                     its first ViewArea bytes (the view area) hold
//	                     views only
//
// With the defaults (64 participants, 4096 entries, 8 GiB) the participant
// table is at 4096, the index at 20480 and the data area at 806912 (788
// KiB of metadata), its first eighth the view area. Keep Entries at
// about twice the number of images and aliases you expect: lookups probe
// linearly and slow down as the table fills.
//
// # Placement
//
// A view lies below every layer it references (the kernel module mounts
// one window from the view's start to the end of its last layer). Layers
// go at or above the view area, each claim at the start of the tightest
// gap that holds the image's expected size (ClaimOptions.Expect); the
// image is written from there and Publish gives back the unused tail,
// which joins the free space above it. Views go in the view area, or in
// the tightest gap below their layers. No image moves once published, so
// fragmentation can refuse an image with more than its size free in all,
// never one that a single free extent holds.
//
// # Aliases
//
// An alias entry (KindAlias) has no extent: it names a layer image by
// another digest, the digest of a blob the image was made from or checked
// against, or of an identical image (Claim.PublishShared). Resolve finds a
// layer by its key or through an alias; GC frees an alias once its layer
// is gone.
//
// Every word other processes may change concurrently is an 8-byte aligned
// uint64 inside the mapping, read and written only with sync/atomic. Slots
// start on 64-byte boundaries, so no such word crosses a cache line.
//
// # Protocol
//
// The index is an open-addressing hash table keyed by (kind, key) with
// linear probing from hash(key) mod Entries; the header keeps the longest
// probe distance ever used, so a lookup scans at most that many slots. Each
// slot's first word packs state (FREE, WRITING, READY, DYING), kind, writer
// and a generation that every transition increments; all transitions are a
// compare-and-swap of that word, so a stale actor's CAS fails.
//
//   - Readers never lock: Lookup reads the state word, the fields, and the
//     state word again (a sequence lock) and trusts only READY entries.
//   - Claim takes the header lock word (owner participant, its incarnation
//     and a lease deadline), checks the key is absent, picks a free extent
//     from the occupied extents recorded in the index itself (there is no
//     separate allocator state that a crash could leave inconsistent), fills
//     a FREE slot and CASes it FREE -> WRITING. When it took the lock over
//     from another holder, or finds at release that its own lock was taken
//     over, it rescans the index and backs out if another non-FREE slot has
//     the same key or an overlapping extent. That keeps "no double
//     allocation" and "one writer per key" even when a lease was taken from
//     a holder that was slow rather than dead: both claimants then rescan
//     after their CAS (store-then-load on sequentially consistent atomics),
//     so at least one sees the other. Claim then fallocates and pre-faults
//     the extent (see Faults).
//   - A second claimant of a key being written gets ErrBusy and calls Wait,
//     which returns when the entry is READY or the writer is dead.
//   - Publish writes checksum and final size, shrinks the extent (the tail
//     is freed), flushes where the backend needs it, sets the writer's
//     reference bit, then CASes WRITING -> READY (a release store).
//   - Abort and reclaim CAS WRITING -> FREE; the extent is free from then on.
//   - Ref sets this participant's bit then re-checks the entry is still the
//     same READY generation; GC CASes READY -> DYING, re-reads the bitmap
//     and either frees the slot or restores READY. Of the two orders, at
//     least one side sees the other, so GC never frees a referenced entry.
//   - A claim first frees the WRITING entries of dead writers (or of an
//     earlier incarnation of a live one), as Join does for the joiner's own
//     earlier incarnations, so a killed writer's extent is free at once.
//   - Participants heartbeat. A participant is dead when its heartbeat is
//     older than LeaseTimeout, or (same boot ID and PID namespace as us)
//     when its process no longer exists. GC by any live participant moves a
//     dead slot to RECLAIMING, clears its reference bits, frees its WRITING
//     claims and then frees the slot. A restarted daemon re-claims its slot
//     through its participant file, bumping the incarnation: claims of the
//     old incarnation are then dead, its reference bits are kept.
//
// # Faults
//
// Reading or writing a mapping can raise SIGBUS (tmpfs out of space on a
// sparse page, file truncated under us, a poisoned pmem line), which kills a
// Go process unless the goroutine set debug.SetPanicOnFault. Claim
// fallocates the extent on file backends so the writer's stores cannot hit
// an unbacked page; the package's own bulk reads of image bytes (checksums in
// Publish and Verify) run with SetPanicOnFault(true) and turn a fault into
// an error. Metadata words are in the first pages, which Create writes.
//
// # Coherence
//
// On one host (and on cache-coherent shared memory) atomics and plain stores
// are enough. On memory that is not cache coherent across hosts the
// protocol still publishes immutable images with a single commit word, but
// the backends do not issue cache-line flushes/invalidations themselves: that
// is left to a future backend (see Backend.Flush).
package daxmem
