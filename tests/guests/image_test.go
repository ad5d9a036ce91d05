package guests

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv"
	"github.com/containerd-daxfs/containerd-daxfs/internal/testenv/testimage"
)

// Big files of the guest image: incompressible, so that pulling the image
// moves their bytes and reading a container's root reads them.
const (
	bigFiles   = 4
	bigFileLen = 6 << 20
)

// bigData returns big file i's bytes (a fixed pseudo-random stream).
func bigData(i int) []byte {
	r := rand.New(rand.NewChaCha8([32]byte{byte(i), 'd', 'a', 'x'}))
	b := make([]byte, bigFileLen)
	for j := 0; j < len(b); j += 8 {
		v := r.Uint64()
		for k := 0; k < 8 && j+k < len(b); k++ {
			b[j+k] = byte(v >> (8 * k))
		}
	}
	return b
}

func sha(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// guestImage is busybox plus two layers exercising what OCI layers carry:
// whiteouts of a file and of a directory, an opaque directory, a replaced
// file, a hard link, symlinks, a FIFO, a setuid file, and bigFiles large
// files; nothing the daxfs module would drop, so its views are the
// module's in auto mode.
func guestImage(tb testing.TB) *testimage.Built { return buildGuestImage(tb, false) }

// lossyGuestImage is guestImage with a third layer holding what the daxfs
// module would drop: a device node and an xattr.
func lossyGuestImage(tb testing.TB) *testimage.Built { return buildGuestImage(tb, true) }

func buildGuestImage(tb testing.TB, lossy bool) *testimage.Built {
	tb.Helper()
	base, upper := testimage.WhiteoutLayers()
	base.Entries = append(base.Entries, testimage.Dir("big", 0o755))
	for i := range bigFiles {
		base.Entries = append(base.Entries, testimage.File(fmt.Sprintf("big/%d", i), bigData(i), 0o644))
	}
	layers := []testimage.Layer{base, upper}
	if lossy {
		layers = append(layers, testimage.Layer{Entries: []testimage.Entry{
			testimage.CharDevice("links/null", 0o666, 1, 3),
			testimage.File("links/xattrs", []byte("x\n"), 0o644).WithXattr("user.note", "hello"),
		}})
	}
	built, err := testenv.BusyboxImage(tb, layers...).Build()
	if err != nil {
		tb.Fatal(err)
	}
	return built
}

// layerBytes is the size of the image's layer blobs.
func layerBytes(built *testimage.Built) int64 {
	var n int64
	for _, l := range built.Layers {
		n += l.Descriptor.Size
	}
	return n
}
