package daxfs

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
	"time"
)

// mnode is the test's model of one inode.
type mnode struct {
	mode     uint32
	uid, gid uint32
	data     []byte
	target   string
	rdev     uint64
	mtime    time.Time
	xattrs   map[string][]byte
	kids     map[string]*mnode // directories
	names    int               // non-directories: number of names
	explicit bool              // directory given as an entry (else implicit)
}

// op is one Writer call of a generated tree.
type op struct {
	path, link string // link: Link(path, link)
	n          *mnode
}

type treeGen struct {
	r     *rand.Rand
	ops   []op
	files []string // paths of non-directories, for hard links
	count int
	max   int
}

var sizeChoices = []int{0, 1, 7, 4095, 4096, 4097, 8191, 8192, 8193, 12288, 100}

func (g *treeGen) name(used map[string]*mnode) string {
	for {
		var s string
		switch g.r.IntN(12) {
		case 0:
			s = strings.Repeat(string(rune('a'+g.r.IntN(26))), 255)
		case 1:
			s = "ünïcødé-名前-" + fmt.Sprint(g.r.IntN(1000))
		case 2:
			s = strings.Repeat("é", 127) // 254 bytes of UTF-8
		case 3:
			s = "with space " + fmt.Sprint(g.r.IntN(100))
		case 4:
			s = ".wh." + fmt.Sprint(g.r.IntN(100))
		default:
			s = fmt.Sprintf("%c%d", 'a'+g.r.IntN(26), g.r.IntN(100000))
		}
		if _, ok := used[s]; !ok {
			return s
		}
	}
}

func (g *treeGen) mtime() time.Time {
	switch g.r.IntN(4) {
	case 0:
		return time.Time{}
	case 1:
		return time.Unix(-int64(g.r.IntN(1e9)), int64(g.r.IntN(1e9)))
	}
	return time.Unix(int64(g.r.IntN(2e9)), int64(g.r.IntN(1e9)))
}

func (g *treeGen) xattrs() map[string][]byte {
	if g.r.IntN(5) != 0 {
		return nil
	}
	m := map[string][]byte{}
	for i := g.r.IntN(4); i >= 0; i-- {
		v := make([]byte, g.r.IntN(40))
		for j := range v {
			v[j] = byte(g.r.IntN(256))
		}
		m[fmt.Sprintf("user.k%d", g.r.IntN(50))] = v
	}
	m["security.capability"] = []byte{1, 0, 0, 2}
	return m
}

// dir fills directory d at path p (depth levels deep).
func (g *treeGen) dir(d *mnode, p string, depth int) {
	n := g.r.IntN(8)
	if g.r.IntN(10) == 0 {
		n = g.r.IntN(3001)
	}
	for i := 0; i < n && g.count < g.max; i++ {
		g.count++
		name := g.name(d.kids)
		cp := p + "/" + name
		c := &mnode{uid: uint32(g.r.IntN(3)) * 1000, gid: uint32(g.r.IntN(3)), mtime: g.mtime(), xattrs: g.xattrs()}
		k := g.r.IntN(20)
		switch {
		case k < 3 && depth < 30:
			c.mode = ModeDir | 0o755
			if g.r.IntN(4) == 0 {
				c.mode = ModeDir | 0o1777
			}
			c.kids = map[string]*mnode{}
			c.explicit = g.r.IntN(5) != 0 // some parents only implied
			d.kids[name] = c
			if c.explicit {
				g.ops = append(g.ops, op{path: cp, n: c})
			} else {
				c.uid, c.gid, c.mtime, c.xattrs, c.mode = 0, 0, time.Time{}, nil, ModeDir|0o755
			}
			g.dir(c, cp, depth+1)
			if !c.explicit && len(c.kids) == 0 {
				// Nothing implies it: add it with the implicit attributes.
				c.explicit = true
				g.ops = append(g.ops, op{path: cp, n: c})
			}
			continue
		case k < 5:
			c.mode, c.target = ModeSymlink|0o777, strings.Repeat("../", g.r.IntN(5))+name
			if g.r.IntN(10) == 0 {
				c.target = strings.Repeat("t", MaxSymlinkLen)
			}
		case k < 6 && len(g.files) > 0:
			// A hard link to an earlier non-directory.
			t := g.files[g.r.IntN(len(g.files))]
			g.ops = append(g.ops, op{path: cp, link: t})
			d.kids[name] = nil // resolved after generation
			continue
		case k == 6:
			c.mode, c.rdev = ModeChar|0o600, uint64(g.r.IntN(1<<20))
		case k == 7:
			c.mode, c.rdev = ModeBlock|0o660, uint64(1+g.r.IntN(1<<20))
		case k == 8:
			c.mode = ModeFIFO | 0o644
		case k == 9:
			c.mode = ModeSocket | 0o755
		default:
			c.mode = ModeRegular | uint32([]int{0o644, 0o755, 0o4755, 0o600}[g.r.IntN(4)])
			size := sizeChoices[g.r.IntN(len(sizeChoices))]
			if g.r.IntN(50) == 0 {
				size = 1<<20 + g.r.IntN(3)
			}
			c.data = make([]byte, size)
			for j := 0; j < size; j += 97 {
				c.data[j] = byte(g.r.IntN(256))
			}
		}
		c.names = 1
		d.kids[name] = c
		g.files = append(g.files, cp)
		g.ops = append(g.ops, op{path: cp, n: c})
	}
}

// genTree makes a random tree and the Writer calls that build it, in a
// shuffled order (links after their targets).
func genTree(seed uint64, max int) (*mnode, []op) {
	g := &treeGen{r: rand.New(rand.NewPCG(seed, 0xdaf5)), max: max}
	root := &mnode{mode: ModeDir | 0o755, kids: map[string]*mnode{}}
	g.dir(root, "", 0)
	// Resolve links in the model.
	byPath := map[string]*mnode{}
	var index func(n *mnode, p string)
	index = func(n *mnode, p string) {
		for k, c := range n.kids {
			if c != nil {
				byPath[p+"/"+k] = c
				if c.kids != nil {
					index(c, p+"/"+k)
				}
			}
		}
	}
	index(root, "")
	var links []op
	var rest []op
	for _, o := range g.ops {
		if o.link != "" {
			t := byPath[o.link]
			t.names++
			dir, base := splitPath(strings.TrimPrefix(o.path, "/"))
			parent := root
			if dir != "" {
				parent = byPath["/"+dir]
			}
			parent.kids[base] = t
			links = append(links, o)
		} else {
			rest = append(rest, o)
		}
	}
	g.r.Shuffle(len(rest), func(i, j int) { rest[i], rest[j] = rest[j], rest[i] })
	return root, append(rest, links...)
}

func applyOps(t testing.TB, w *Writer, ops []op) {
	t.Helper()
	for _, o := range ops {
		if o.link != "" {
			if err := w.Link(o.path, o.link, nil); err != nil {
				t.Fatal(err)
			}
			continue
		}
		n := o.n
		h := &Header{Path: o.path, Mode: n.mode, UID: n.uid, GID: n.gid, Size: int64(len(n.data)), Linkname: n.target, ModTime: n.mtime, Rdev: n.rdev, Xattrs: n.xattrs}
		if err := w.Add(h, bytes.NewReader(n.data)); err != nil {
			t.Fatal(err)
		}
	}
}

// modelTree renders the model like Image.Tree.
func modelTree(root *mnode, ext bool) []TreeEntry {
	var out []TreeEntry
	var walk func(n *mnode, p string)
	walk = func(n *mnode, p string) {
		e := TreeEntry{Path: p, Mode: n.mode & ModePermMask, Type: TypeName(n.mode), UID: n.uid, GID: n.gid}
		switch n.mode & ModeTypeMask {
		case ModeDir:
			e.Entries = []string{}
			for k := range n.kids {
				e.Entries = append(e.Entries, k)
			}
			slices.Sort(e.Entries)
		case ModeRegular:
			s := sha256.Sum256(n.data)
			e.Size, e.SHA256, e.Nlink = uint64(len(n.data)), hex.EncodeToString(s[:]), uint32(n.names)
		case ModeSymlink:
			e.Target = n.target
		default:
			e.Nlink = uint32(n.names)
			if ext {
				e.Rdev = n.rdev
			}
		}
		if ext {
			e.HasExt = true
			if !n.mtime.IsZero() {
				e.MTime = Timespec{Sec: n.mtime.Unix(), Nsec: uint32(n.mtime.Nanosecond())}
			}
			for k, v := range n.xattrs {
				e.Xattrs = append(e.Xattrs, Xattr{Name: k, Value: v})
			}
			slices.SortFunc(e.Xattrs, func(a, b Xattr) int { return strings.Compare(a.Name, b.Name) })
		}
		out = append(out, e)
		for _, k := range e.Entries {
			cp := p + "/" + k
			if p == "/" {
				cp = "/" + k
			}
			walk(n.kids[k], cp)
		}
	}
	walk(root, "/")
	return out
}

func TestWriterRandomTrees(t *testing.T) {
	seeds := 12
	if testing.Short() {
		seeds = 4
	}
	for seed := uint64(1); seed <= uint64(seeds); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			root, ops := genTree(seed, 6000)
			for _, opts := range []WriterOptions{{}, {NoExtension: true}} {
				img := buildImage(t, opts, func(w *Writer) { applyOps(t, w, ops) })
				if err := Validate(img); err != nil {
					t.Fatalf("Validate: %v", err)
				}
				want, err := TreeJSON(modelTree(root, !opts.NoExtension))
				if err != nil {
					t.Fatal(err)
				}
				if got := treeOf(t, img, false); !bytes.Equal(got, want) {
					t.Fatalf("opts %+v: read-back tree differs from the model:\n%s", opts, firstDiff(got, want))
				}
				checkAccessors(t, img)
			}
		})
	}
}

// checkAccessors looks every path up by binary search and compares it with
// a linear scan, and checks Lookup of absent names.
func checkAccessors(t testing.TB, img []byte) {
	t.Helper()
	im, err := Open(img)
	if err != nil {
		t.Fatal(err)
	}
	lin := *im
	lin.sorted = false
	for ino := uint32(1); ino <= im.InodeCount(); ino++ {
		in, err := im.Inode(ino)
		if err != nil {
			t.Fatal(err)
		}
		if !in.IsDir() {
			continue
		}
		ents, err := im.ReadDir(ino)
		if err != nil {
			t.Fatal(err)
		}
		for i, d := range ents {
			a, err := im.Lookup(ino, d.Name)
			if err != nil || a != d {
				t.Fatalf("dir %d: Lookup(%q) = %+v, %v; want %+v", ino, d.Name, a, err, d)
			}
			b, err := lin.Lookup(ino, d.Name)
			if err != nil || b != d {
				t.Fatalf("dir %d: linear Lookup(%q) = %+v, %v", ino, d.Name, b, err)
			}
			if c, err := im.DirentAt(ino, i); err != nil || c != d {
				t.Fatalf("dir %d: DirentAt(%d) = %+v, %v", ino, i, c, err)
			}
			if _, err := im.Lookup(ino, d.Name+"\x01"); err == nil {
				t.Fatalf("dir %d: Lookup of an absent name succeeded", ino)
			}
		}
	}
}

// TestWriterOrderIndependent: the same tree added in two orders gets the
// same inode numbers, modes and directory contents.
func TestWriterOrderIndependent(t *testing.T) {
	root, ops := genTree(99, 3000)
	_ = root
	img1 := buildImage(t, WriterOptions{}, func(w *Writer) { applyOps(t, w, ops) })
	rest := slices.Clone(ops)
	var links []op
	rest = slices.DeleteFunc(rest, func(o op) bool {
		if o.link != "" {
			links = append(links, o)
			return true
		}
		return false
	})
	slices.Reverse(rest)
	img2 := buildImage(t, WriterOptions{}, func(w *Writer) { applyOps(t, w, append(rest, links...)) })
	a, _ := Open(img1)
	b, _ := Open(img2)
	if a.InodeCount() != b.InodeCount() {
		t.Fatalf("inode counts %d and %d", a.InodeCount(), b.InodeCount())
	}
	for ino := uint32(1); ino <= a.InodeCount(); ino++ {
		x, _ := a.Inode(ino)
		y, _ := b.Inode(ino)
		x.DataOffset, y.DataOffset = 0, 0
		if x != y {
			t.Fatalf("inode %d differs: %+v vs %+v", ino, x, y)
		}
		if x.IsDir() {
			dx, _ := a.ReadDir(ino)
			dy, _ := b.ReadDir(ino)
			if !slices.Equal(dx, dy) {
				t.Fatalf("directory %d differs", ino)
			}
		}
	}
	if !bytes.Equal(treeOf(t, img1, false), treeOf(t, img2, false)) {
		t.Fatal("trees differ")
	}
}

// TestWriterDeepPath: a chain 300 directories deep with 255-byte names
// (a 77 KB path) round-trips.
func TestWriterDeepPath(t *testing.T) {
	var parts []string
	for i := range 300 {
		parts = append(parts, fmt.Sprintf("%03d", i)+strings.Repeat("d", 252))
	}
	deep := strings.Join(parts, "/")
	img := buildImage(t, WriterOptions{}, func(w *Writer) {
		add(t, w, deep+"/leaf", "leaf data")
		must(t, w.Link("top", deep+"/leaf", nil))
	})
	must(t, Validate(img))
	im, _ := Open(img)
	in := mustLookup(t, im, "/"+deep+"/leaf")
	if d, err := im.Data(in.Ino); err != nil || string(d) != "leaf data" || in.Nlink != 2 {
		t.Fatalf("leaf: %q %v nlink %d", d, err, in.Nlink)
	}
	if im.InodeCount() != 302 {
		t.Fatalf("%d inodes, want 302", im.InodeCount())
	}
}
