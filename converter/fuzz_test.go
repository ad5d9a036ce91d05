package converter

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxfs"
)

// FuzzConvertLayer feeds arbitrary bytes (seeded with tars, compressed tars
// and an image) to ConvertLayer: it must return an image that validates or
// an error, never panic or hang. The output is a bounded Window, so the
// size limits are exercised too.
func FuzzConvertLayer(f *testing.F) {
	// Small seeds: the fuzzer minimizes interesting inputs, and that takes
	// minutes on inputs of hundreds of kilobytes.
	seed := makeTar(f, []tarEnt{
		dir("d"), withX(file("d/f", "data"), "user.x", "1"), symlink("l", "d/f"),
		{name: "c", typ: '3', mode: 0o600, major: 1, minor: 3}, {name: "p", typ: '6', mode: 0o600},
	})
	f.Add(seed)
	f.Add(gz(f, seed))
	f.Add(zst(f, seed))
	f.Add(makeTar(f, []tarEnt{file("a", "x"), hardlink("b", "a"), {name: ".wh.c", typ: '0'}, dir("d"), file("d/.wh..wh..opq", "")}))
	f.Add(makeTar(f, []tarEnt{file("../x", "x")}))
	out := &memOut{}
	if _, err := ConvertLayer(context.Background(), bytes.NewReader(seed), out, LayerOptions{}); err != nil {
		f.Fatal(err)
	}
	f.Add(out.b)
	f.Add([]byte{})
	f.Add([]byte(strings.Repeat("\x00", 1024)))

	const max = 1 << 20
	buf := make([]byte, max)
	used := max
	f.Fuzz(func(t *testing.T, blob []byte) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		clear(buf[:used])
		used = max
		res, err := ConvertLayer(ctx, bytes.NewReader(blob), daxfs.NewWindow(buf), LayerOptions{MaxSize: max})
		if err != nil {
			return
		}
		used = int(res.Size)
		if res.Size <= 0 || res.Size > max {
			t.Fatalf("size %d", res.Size)
		}
		if err := daxfs.Validate(buf[:res.Size]); err != nil {
			t.Fatalf("converted image does not validate: %v", err)
		}
	})
}
