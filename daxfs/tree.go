package daxfs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// TreeEntry describes one path of an image, for tests and `inspect --json`.
// Its JSON form is the schema of the upstream fixture's expected.json:
// path, mode ("0o755"), type, uid, gid, then entries (directories), size,
// sha256 and nlink (regular files), target (symlinks), rdev and nlink
// (devices, FIFOs, sockets); then, when the image has an extension block,
// mtime (RFC 3339 with nanoseconds, UTC) and xattrs (name -> value as a
// JSON string when valid UTF-8 without NUL, else "base64:" + base64).
type TreeEntry struct {
	Path    string
	Mode    uint32 // permission bits only (ModePermMask)
	Type    string // "dir", "file", "symlink", "char", "block", "fifo", "socket"
	UID     uint32
	GID     uint32
	Entries []string // dir: names in byte order
	Size    uint64   // file
	SHA256  string   // file: hex
	Nlink   uint32   // file, char, block, fifo, socket
	Target  string   // symlink
	Rdev    uint64   // char, block (from the extension block)

	// Extension data; HasExt says whether the image had it.
	HasExt bool
	MTime  Timespec
	Xattrs []Xattr
}

// TypeName returns the TreeEntry type name for a mode.
func TypeName(mode uint32) string {
	switch mode & ModeTypeMask {
	case ModeDir:
		return "dir"
	case ModeRegular:
		return "file"
	case ModeSymlink:
		return "symlink"
	case ModeChar:
		return "char"
	case ModeBlock:
		return "block"
	case ModeFIFO:
		return "fifo"
	case ModeSocket:
		return "socket"
	}
	return "unknown"
}

// Tree validates the image and returns every path, depth first from "/",
// each directory's children in byte order of their names.
func (im *Image) Tree() ([]TreeEntry, error) {
	if err := im.Validate(); err != nil {
		return nil, err
	}
	var out []TreeEntry
	var walk func(ino uint32, path string) error
	walk = func(ino uint32, path string) error {
		e, ents, err := im.treeEntry(ino, path)
		if err != nil {
			return err
		}
		out = append(out, e)
		for _, d := range ents {
			child := path + "/" + d.Name
			if path == "/" {
				child = "/" + d.Name
			}
			if err := walk(d.Ino, child); err != nil {
				return err
			}
		}
		return nil
	}
	if err := walk(RootIno, "/"); err != nil {
		return nil, err
	}
	return out, nil
}

func (im *Image) treeEntry(ino uint32, path string) (TreeEntry, []Dirent, error) {
	in, err := im.Inode(ino)
	if err != nil {
		return TreeEntry{}, nil, fmt.Errorf("%s: %w", path, err)
	}
	e := TreeEntry{Path: path, Mode: in.Mode & ModePermMask, Type: TypeName(in.Mode), UID: in.UID, GID: in.GID}
	var ents []Dirent
	switch in.Mode & ModeTypeMask {
	case ModeDir:
		ents, err = im.ReadDir(ino)
		if err != nil {
			return e, nil, fmt.Errorf("%s: %w", path, err)
		}
		// Copy: names alias the image and the caller may keep the tree.
		e.Entries = make([]string, len(ents))
		for i := range ents {
			ents[i].Name = string([]byte(ents[i].Name))
			e.Entries[i] = ents[i].Name
		}
		sortDirents(ents)
		sortStrings(e.Entries)
	case ModeRegular:
		data, err := im.Data(ino)
		if err != nil {
			return e, nil, fmt.Errorf("%s: %w", path, err)
		}
		sum := sha256.Sum256(data)
		e.Size, e.SHA256, e.Nlink = in.Size, hex.EncodeToString(sum[:]), in.Nlink
	case ModeSymlink:
		t, err := im.Readlink(ino)
		if err != nil {
			return e, nil, fmt.Errorf("%s: %w", path, err)
		}
		e.Target = string(t)
	default:
		e.Nlink = in.Nlink
		e.Rdev = im.Rdev(ino)
	}
	if im.HasExtension() {
		e.HasExt = true
		e.MTime, _ = im.ModTime(ino)
		xs, err := im.Xattrs(ino)
		if err != nil {
			return e, nil, fmt.Errorf("%s: %w", path, err)
		}
		for _, x := range xs {
			e.Xattrs = append(e.Xattrs, Xattr{Name: x.Name, Value: bytes.Clone(x.Value)})
		}
		// Copy names out of the image.
		for i := range e.Xattrs {
			e.Xattrs[i].Name = string([]byte(e.Xattrs[i].Name))
		}
	}
	return e, ents, nil
}

func sortDirents(d []Dirent) {
	slices.SortFunc(d, func(a, b Dirent) int { return strings.Compare(a.Name, b.Name) })
}

func sortStrings(s []string) { slices.Sort(s) }

// xattrJSON renders an xattr value for JSON.
func xattrJSON(v []byte) string {
	if bytes.IndexByte(v, 0) < 0 && isUTF8(v) {
		return string(v)
	}
	return "base64:" + base64Std(v)
}

// MarshalJSON writes the entry with the fixture's key order.
func (e TreeEntry) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	key := func(k string, v any) error {
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		b.WriteString(strconv.Quote(k))
		b.WriteByte(':')
		return enc.Encode(v)
	}
	b.WriteByte('{')
	kv := []struct {
		k string
		v any
	}{{"path", e.Path}, {"mode", "0o" + strconv.FormatUint(uint64(e.Mode), 8)}, {"type", e.Type}, {"uid", e.UID}, {"gid", e.GID}}
	switch e.Type {
	case "dir":
		ents := e.Entries
		if ents == nil {
			ents = []string{}
		}
		kv = append(kv, struct {
			k string
			v any
		}{"entries", ents})
	case "file":
		kv = append(kv, []struct {
			k string
			v any
		}{{"size", e.Size}, {"sha256", e.SHA256}, {"nlink", e.Nlink}}...)
	case "symlink":
		kv = append(kv, struct {
			k string
			v any
		}{"target", e.Target})
	default:
		if e.Type == "char" || e.Type == "block" {
			kv = append(kv, struct {
				k string
				v any
			}{"rdev", e.Rdev})
		}
		kv = append(kv, struct {
			k string
			v any
		}{"nlink", e.Nlink})
	}
	if e.HasExt {
		t := time.Unix(e.MTime.Sec, int64(e.MTime.Nsec)).UTC().Format(time.RFC3339Nano)
		kv = append(kv, struct {
			k string
			v any
		}{"mtime", t})
		if len(e.Xattrs) > 0 {
			m := make(map[string]string, len(e.Xattrs))
			for _, x := range e.Xattrs {
				m[x.Name] = xattrJSON(x.Value)
			}
			kv = append(kv, struct {
				k string
				v any
			}{"xattrs", m})
		}
	}
	for _, p := range kv {
		if err := key(p.k, p.v); err != nil {
			return nil, err
		}
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// TreeJSON renders a tree the way the upstream fixture's expected.json is
// formatted (one-space indent, UTF-8 unescaped), without a trailing newline.
func TreeJSON(t []TreeEntry) ([]byte, error) {
	if t == nil {
		t = []TreeEntry{}
	}
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", " ")
	if err := enc.Encode(t); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}
