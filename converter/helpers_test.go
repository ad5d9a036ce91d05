package converter

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// memOut is a growing in-memory io.WriterAt.
type memOut struct{ b []byte }

func (m *memOut) WriteAt(p []byte, off int64) (int, error) {
	if end := off + int64(len(p)); end > int64(len(m.b)) {
		if end > int64(cap(m.b)) {
			nb := make([]byte, end, 2*end)
			copy(nb, m.b)
			m.b = nb
		} else {
			m.b = m.b[:end]
		}
	}
	return copy(m.b[off:], p), nil
}

// treeOf describes every path of an image: type, permissions, owner, size,
// content digest or link target, rdev, mtime, xattrs and nlink.
func treeOf(t testing.TB, im *daxfs.Image) map[string]string {
	t.Helper()
	out := map[string]string{}
	var walk func(ino uint32, p string)
	walk = func(ino uint32, p string) {
		in, err := im.Inode(ino)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		var sb strings.Builder
		fmt.Fprintf(&sb, "mode=%o uid=%d gid=%d", in.Mode, in.UID, in.GID)
		switch {
		case in.IsRegular():
			d, err := im.Data(ino)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			fmt.Fprintf(&sb, " size=%d sha=%x nlink=%d", in.Size, sha256.Sum256(d), in.Nlink)
		case in.IsSymlink():
			l, err := im.Readlink(ino)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			fmt.Fprintf(&sb, " ->%s nlink=%d", l, in.Nlink)
		case in.IsDir():
		default:
			fmt.Fprintf(&sb, " rdev=%d nlink=%d", im.Rdev(ino), in.Nlink)
		}
		if ts, ok := im.ModTime(ino); ok {
			fmt.Fprintf(&sb, " mtime=%d.%09d", ts.Sec, ts.Nsec)
		}
		xs, err := im.Xattrs(ino)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		for _, x := range xs {
			fmt.Fprintf(&sb, " %s=%q", x.Name, x.Value)
		}
		out[p] = sb.String()
		if in.IsDir() {
			ents, err := im.ReadDir(ino)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			for _, e := range ents {
				walk(e.Ino, p+"/"+e.Name)
			}
		}
	}
	walk(daxfs.RootIno, "")
	return out
}

func diffTrees(want, got map[string]string) []string {
	var d []string
	for p, w := range want {
		g, ok := got[p]
		switch {
		case !ok:
			d = append(d, fmt.Sprintf("missing %s (%s)", p, w))
		case g != w:
			d = append(d, fmt.Sprintf("%s: want %s, got %s", p, w, g))
		}
	}
	for p, g := range got {
		if _, ok := want[p]; !ok {
			d = append(d, fmt.Sprintf("extra %s (%s)", p, g))
		}
	}
	sort.Strings(d)
	return d
}

// tarEnt is one entry of a test tar.
type tarEnt struct {
	name  string
	typ   byte
	mode  int64
	data  string
	link  string
	uid   int
	xattr map[string]string
	mtime time.Time
	major int64
	minor int64
}

func file(name, data string) tarEnt {
	return tarEnt{name: name, typ: tar.TypeReg, mode: 0o644, data: data}
}
func dir(name string) tarEnt { return tarEnt{name: name, typ: tar.TypeDir, mode: 0o755} }
func symlink(name, target string) tarEnt {
	return tarEnt{name: name, typ: tar.TypeSymlink, mode: 0o777, link: target}
}
func hardlink(name, target string) tarEnt {
	return tarEnt{name: name, typ: tar.TypeLink, mode: 0o644, link: target}
}

var testTime = time.Unix(1700000000, 123456789)

func makeTar(t testing.TB, ents []tarEnt) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range ents {
		mt := e.mtime
		if mt.IsZero() {
			mt = testTime
		}
		h := &tar.Header{
			Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link,
			Uid: e.uid, Gid: e.uid, ModTime: mt, Format: tar.FormatPAX,
			Devmajor: e.major, Devminor: e.minor,
		}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.data))
		}
		if e.typ == tar.TypeXGlobalHeader {
			h = &tar.Header{Typeflag: e.typ, Name: e.name, PAXRecords: map[string]string{"comment": "global"}}
		}
		for k, v := range e.xattr {
			if h.PAXRecords == nil {
				h.PAXRecords = map[string]string{}
			}
			h.PAXRecords["SCHILY.xattr."+k] = v
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatalf("%s: %v", e.name, err)
		}
		if e.typ == tar.TypeReg {
			io.WriteString(tw, e.data)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// layerFromTar converts a tar to a layer image and opens it.
func layerFromTar(t testing.TB, tarball []byte) *daxfs.Image {
	t.Helper()
	out := &memOut{}
	if _, err := ConvertLayer(t.Context(), bytes.NewReader(tarball), out, LayerOptions{}); err != nil {
		t.Fatalf("ConvertLayer: %v", err)
	}
	return openImage(t, out.b)
}

func openImage(t testing.TB, b []byte) *daxfs.Image {
	t.Helper()
	if err := daxfs.Validate(b); err != nil {
		t.Fatalf("Validate: %v", err)
	}
	im, err := daxfs.Open(b)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	return im
}

// buildView plans and writes the view of layers the way the view command
// lays them out (view first, then each layer page aligned) and opens it.
func buildView(t testing.TB, layers []*daxfs.Image) *daxfs.Image {
	t.Helper()
	b, err := composeView(layers)
	if err != nil {
		t.Fatalf("view: %v", err)
	}
	return openImage(t, b)
}

func composeView(layers []*daxfs.Image) ([]byte, error) {
	plan, err := PlanView(layers)
	if err != nil {
		return nil, err
	}
	bases := make([]uint64, len(layers))
	pos := uint64(plan.Size())
	for i, l := range layers {
		pos = (pos + daxfs.BlockSize - 1) &^ (daxfs.BlockSize - 1)
		bases[i] = pos
		pos += uint64(len(l.Bytes()))
	}
	buf := make([]byte, pos)
	for i, l := range layers {
		copy(buf[bases[i]:], l.Bytes())
	}
	if err := plan.Write(daxfs.NewWindow(buf), bases, pos); err != nil {
		return nil, err
	}
	return buf, nil
}
