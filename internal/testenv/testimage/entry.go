// Package testimage builds small OCI images for tests, hermetically: layer
// tars from a list of entries (files, directories, links, whiteouts, opaque
// markers, FIFOs, device nodes, xattrs, long and UTF-8 names, mtimes),
// compressed layer blobs, an image config with correct rootfs.diff_ids, a
// manifest, and an OCI image archive (oci-layout, index.json,
// blobs/sha256/...) that `ctr image import` accepts.
//
// Output is deterministic: the same Image always gives the same digests.
//
// Typical use:
//
//	bb, err := testimage.BusyboxLayer()
//	img := testimage.Image{Layers: []testimage.Layer{bb, {Entries: []testimage.Entry{
//		testimage.File("etc/hello", []byte("hi\n"), 0o644),
//		testimage.Whiteout("bin/ls"),
//	}}}}
//	built, err := img.Build()
//	err = built.WriteArchive(w, "docker.io/library/test:latest")
package testimage

import (
	"archive/tar"
	"maps"
	"path"
	"strings"
	"time"
)

// DefaultMtime returns the modification time of entries that do not set
// one: fixed, so that layer digests are reproducible.
func DefaultMtime() time.Time { return time.Date(2024, 1, 2, 3, 4, 5, 0, time.UTC) }

// Whiteout prefixes as defined by the OCI image spec.
const (
	WhiteoutPrefix = ".wh."
	OpaqueMarker   = ".wh..wh..opq"
)

// Entry is one tar entry of a layer: a header and, for regular files, the
// content. Build entries with File, Dir, Symlink, ... and adjust them with
// the With* methods, which return modified copies.
type Entry struct {
	Header tar.Header
	Data   []byte
}

func newEntry(name string, typ byte, mode int64) Entry {
	return Entry{Header: tar.Header{
		Typeflag: typ,
		Name:     name,
		Mode:     mode,
		ModTime:  DefaultMtime(),
		Format:   tar.FormatPAX,
	}}
}

// File is a regular file with the given content and permission bits.
func File(name string, data []byte, mode int64) Entry {
	e := newEntry(name, tar.TypeReg, mode)
	e.Data = data
	e.Header.Size = int64(len(data))
	return e
}

// Dir is a directory. A trailing slash is added to the name as tar writers
// conventionally do.
func Dir(name string, mode int64) Entry {
	if !strings.HasSuffix(name, "/") {
		name += "/"
	}
	return newEntry(name, tar.TypeDir, mode)
}

// Symlink is a symbolic link name -> target.
func Symlink(name, target string) Entry {
	e := newEntry(name, tar.TypeSymlink, 0o777)
	e.Header.Linkname = target
	return e
}

// Hardlink is a hard link name to the earlier entry target (a path in the
// same layer, as tar stores it).
func Hardlink(name, target string) Entry {
	e := newEntry(name, tar.TypeLink, 0o644)
	e.Header.Linkname = target
	return e
}

// Whiteout deletes p (a file or directory of a lower layer): an empty file
// named .wh.<base> in p's directory.
func Whiteout(p string) Entry {
	dir, base := path.Split(strings.TrimSuffix(p, "/"))
	return newEntry(dir+WhiteoutPrefix+base, tar.TypeReg, 0o644)
}

// Opaque marks dir as opaque: the contents of dir in lower layers are hidden
// (the layer must also carry dir itself and its new contents).
func Opaque(dir string) Entry {
	dir = strings.TrimSuffix(dir, "/")
	if dir == "" || dir == "." {
		return newEntry(OpaqueMarker, tar.TypeReg, 0o644)
	}
	return newEntry(dir+"/"+OpaqueMarker, tar.TypeReg, 0o644)
}

// FIFO is a named pipe.
func FIFO(name string, mode int64) Entry {
	return newEntry(name, tar.TypeFifo, mode)
}

// CharDevice is a character device node major:minor.
func CharDevice(name string, mode, major, minor int64) Entry {
	e := newEntry(name, tar.TypeChar, mode)
	e.Header.Devmajor, e.Header.Devminor = major, minor
	return e
}

// BlockDevice is a block device node major:minor.
func BlockDevice(name string, mode, major, minor int64) Entry {
	e := newEntry(name, tar.TypeBlock, mode)
	e.Header.Devmajor, e.Header.Devminor = major, minor
	return e
}

// WithOwner sets the numeric owner.
func (e Entry) WithOwner(uid, gid int) Entry {
	e.Header.Uid, e.Header.Gid = uid, gid
	return e
}

// WithMode replaces the permission bits (and setuid/setgid/sticky).
func (e Entry) WithMode(mode int64) Entry {
	e.Header.Mode = mode
	return e
}

// WithMtime sets the modification time, with nanosecond precision (the
// entry is written in PAX format).
func (e Entry) WithMtime(t time.Time) Entry {
	e.Header.ModTime = t
	return e
}

// WithXattr adds an extended attribute, stored as a PAX record
// SCHILY.xattr.<name> (e.g. "user.note", "security.capability",
// "trusted.x").
func (e Entry) WithXattr(name, value string) Entry {
	recs := maps.Clone(e.Header.PAXRecords)
	if recs == nil {
		recs = map[string]string{}
	}
	recs["SCHILY.xattr."+name] = value
	e.Header.PAXRecords = recs
	e.Header.Format = tar.FormatPAX
	return e
}
