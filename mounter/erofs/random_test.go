package erofs

import (
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
)

// writeRandomTree writes a random tree under root, biased to the edges of
// the EROFS layout: directories spanning several blocks (long names, many
// entries), names that sort around "." and "..", symlink targets from 1 to
// 4095 bytes with and without xattrs (inline or in a block of their own),
// xattrs large enough to push inode records across block boundaries, file
// sizes around the block size, hard links, device nodes and FIFOs, odd
// modes, owners and nanosecond mtimes.
func writeRandomTree(tb testing.TB, root string, rnd *rand.Rand) {
	tb.Helper()
	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
	}
	alphabet := []string{"a", "b", "z", "A", "0", "9", "-", ".", "_", "~", " ", "é", "\xff", "+"}
	used := map[string]bool{}
	name := func(dir string) string {
		for {
			var n string
			switch rnd.Intn(6) {
			case 0:
				n = strings.Repeat("L", 100+rnd.Intn(156)) // long: few per block
			case 1:
				n = []string{"-", "-.", ".-", "...", ".a", "a", "A", "\x01", "\xfe"}[rnd.Intn(9)]
			default:
				for k := 1 + rnd.Intn(12); k > 0; k-- {
					n += alphabet[rnd.Intn(len(alphabet))]
				}
			}
			if len(n) > 255 {
				n = n[:255]
			}
			if n == "." || n == ".." || used[dir+"/"+n] {
				continue
			}
			used[dir+"/"+n] = true
			return n
		}
	}
	// The source file system (ext4) holds about one block of xattrs per
	// inode, and user.* only on files and directories.
	xattrs := func(p string, user bool) {
		total := 0
		for k := rnd.Intn(4); k > 0; k-- {
			v := make([]byte, []int{0, 1, 7, 500, 1500, 2500}[rnd.Intn(6)])
			if total += len(v) + 32; total > 3000 {
				break
			}
			rnd.Read(v)
			ns := []string{"user.", "trusted.", "security."}[rnd.Intn(3)]
			if !user && ns == "user." {
				ns = "trusted."
			}
			must(unix.Lsetxattr(p, ns+fmt.Sprintf("x%d", rnd.Intn(1000)), v, 0))
		}
	}
	var files []string
	var dirs []string
	var fill func(dir string, depth int)
	fill = func(dir string, depth int) {
		n := rnd.Intn(12)
		if rnd.Intn(4) == 0 {
			n = 40 + rnd.Intn(120) // several directory blocks
		}
		for i := 0; i < n; i++ {
			p := filepath.Join(dir, name(dir))
			switch k := rnd.Intn(20); {
			case k < 2 && depth < 3:
				must(os.Mkdir(p, os.FileMode(0o700+rnd.Intn(0o100))))
				dirs = append(dirs, p)
				fill(p, depth+1)
			case k < 11:
				size := []int{0, 1, 4095, 4096, 4097, 8192, rnd.Intn(50000)}[rnd.Intn(7)]
				data := make([]byte, size)
				rnd.Read(data)
				must(os.WriteFile(p, data, 0o600))
				files = append(files, p)
			case k < 15:
				tl := []int{1, 10, 100, 1000, 3000, 4000, 4095}[rnd.Intn(7)]
				target := make([]byte, tl)
				for j := range target {
					target[j] = "abc/._-xyz"[rnd.Intn(10)]
				}
				must(os.Symlink(string(target), p))
			case k < 16 && len(files) > 0:
				must(os.Link(files[rnd.Intn(len(files))], p))
				continue // shares the first name's attributes
			case k < 17:
				must(unix.Mknod(p, unix.S_IFCHR|0o640, int(unix.Mkdev(uint32(rnd.Intn(4096)), uint32(rnd.Intn(1<<20))))))
			case k < 18:
				must(unix.Mknod(p, unix.S_IFIFO|0o600, 0))
			default:
				must(os.WriteFile(p, nil, 0o644))
			}
			var st unix.Stat_t
			must(unix.Lstat(p, &st))
			typ := st.Mode & unix.S_IFMT
			must(unix.Lchown(p, rnd.Intn(70000), rnd.Intn(70000)))
			if typ != unix.S_IFLNK && typ != unix.S_IFDIR {
				must(unix.Chmod(p, uint32(rnd.Intn(0o10000))))
			}
			xattrs(p, typ == unix.S_IFREG || typ == unix.S_IFDIR)
		}
	}
	must(os.MkdirAll(root, 0o755))
	fill(root, 0)
	xattrs(root, true)
	// Mtimes last, deepest first so directories keep theirs.
	var all []string
	filepath.Walk(root, func(p string, _ os.FileInfo, err error) error {
		if err == nil {
			all = append(all, p)
		}
		return nil
	})
	for _, a := range slices.Backward(all) {
		ts := unix.NsecToTimespec(time.Unix(rnd.Int63n(4e9)-1e9, rnd.Int63n(1e9)).UnixNano())
		must(unix.UtimesNanoAt(unix.AT_FDCWD, a, []unix.Timespec{ts, ts}, unix.AT_SYMLINK_NOFOLLOW))
	}
	// Directories last of all could not get a mode without search
	// permission earlier (the walk needs it); give some of them one now.
	for _, d := range dirs {
		if rnd.Intn(3) == 0 {
			must(unix.Chmod(d, uint32(rnd.Intn(0o10000))))
		}
	}
}

// TestRandomTrees mounts random trees through erofs and compares every
// path with the source, and runs erofs-utils' checker on each image.
func TestRandomTrees(t *testing.T) {
	testenv.RequireRoot(t)
	// What the trees exercised, over all seeds.
	var seen struct{ dirBlocks, inline, plain, pushed, nodes int }
	defer func() {
		t.Logf("layout cases: %+v", seen)
		if seen.dirBlocks == 0 || seen.inline == 0 || seen.plain == 0 || seen.pushed == 0 {
			t.Errorf("the random trees missed a layout case: %+v", seen)
		}
	}()
	for seed := int64(1); seed <= 6; seed++ {
		t.Run(fmt.Sprint("seed", seed), func(t *testing.T) {
			rnd := rand.New(rand.NewSource(seed))
			s := mountTree(t, func(tb testing.TB, root string) { writeRandomTree(tb, root, rnd) })
			requireSameTree(t, s.src, s.mnt)
			b := layoutOf(t, s.r)
			for _, n := range b.order {
				seen.nodes++
				switch {
				case len(n.perBlk) > 1:
					seen.dirBlocks++
				case n.in.IsSymlink() && n.layout == layoutFlatInline:
					seen.inline++
				case n.in.IsSymlink():
					seen.plain++
				}
				if n.pos%blockSize == 0 && n.pos > metaStart {
					seen.pushed++
				}
			}
			if out, err := exec.Command("fsck.erofs", "--device="+s.r.path, s.meta).CombinedOutput(); err != nil {
				t.Errorf("fsck.erofs: %v\n%s", err, out)
			}
		})
	}
}

// layoutOf lays out the region's image as Write does and returns the
// builder, for tests to look at the placement.
func layoutOf(t *testing.T, r region) *builder {
	t.Helper()
	im := openRegion(t, r)
	b := newBuilder(im, Options{DataOffset: r.off, DataSize: r.size})
	if err := b.walk(); err != nil {
		t.Fatal(err)
	}
	if err := b.place(); err != nil {
		t.Fatal(err)
	}
	return b
}
