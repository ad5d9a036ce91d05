package testimage

import "time"

// WhiteoutLayers are two layers exercising the OCI layer changes that
// overlayfs-style snapshotters must get right: whiteouts of a file and of
// a directory, an opaque directory (with a mode change), a replaced file,
// a file with a nanosecond mtime, a hard link carrying its target's
// metadata, symlinks (one dangling), a FIFO and a setuid file. Callers
// append what their test needs besides (device nodes, xattrs, big files).
func WhiteoutLayers() (base, upper Layer) {
	base = Layer{Entries: []Entry{
		Dir("data", 0o755),
		File("data/keep", []byte("keep\n"), 0o644),
		File("data/gone", []byte("gone\n"), 0o644),
		File("data/replaced", []byte("old\n"), 0o600),
		Dir("opaque", 0o755),
		File("opaque/old1", []byte("old1\n"), 0o644),
		Dir("opaque/sub", 0o755),
		File("opaque/sub/old2", []byte("old2\n"), 0o644),
		Dir("deleted-dir", 0o755),
		File("deleted-dir/f", []byte("f\n"), 0o644),
		Dir("links", 0o755),
	}}
	upper = Layer{Compression: Zstd, Entries: []Entry{
		Whiteout("data/gone"),
		File("data/replaced", []byte("new\n"), 0o644),
		File("data/added", []byte("added\n"), 0o644).WithMtime(time.Date(2023, 5, 6, 7, 8, 9, 123456789, time.UTC)),
		Dir("opaque", 0o750),
		Opaque("opaque"),
		File("opaque/new", []byte("new in opaque\n"), 0o644),
		Whiteout("deleted-dir"),
		// A hard link must name a file of its own layer, and carries the
		// target's metadata: containerd applies the link entry's mode and
		// owner to the shared inode, as tar writers expect.
		File("links/target", []byte("shared bytes\n"), 0o640).WithOwner(1000, 1001),
		Hardlink("links/hard", "links/target").WithMode(0o640).WithOwner(1000, 1001),
		Symlink("links/soft", "target"),
		Symlink("links/dangling", "/nonexistent/path"),
		FIFO("links/fifo", 0o600),
		File("links/setuid", []byte("#!/bin/sh\n"), 0o4755),
	}}
	return base, upper
}
