package daxmem

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestClaimWriterAt: a file region's claim writes through the file at the
// claim's offsets, Bytes sees it at once, Publish checksums it; writes
// outside the claim fail naming the key.
func TestClaimWriterAt(t *testing.T) {
	ctx := context.Background()
	r := mustCreate(t, testOpts(t, 64<<20))
	mustJoin(t, r)
	k := key("written")
	// Not a page multiple: writes are bounded by the claimed size, not
	// by the page-rounded extent.
	const claimed = 8<<20 - 100
	c, err := r.Claim(ctx, KindLayer, k, claimed, ClaimOptions{Deferred: true})
	if err != nil {
		t.Fatal(err)
	}
	w := c.WriterAt()
	if w == nil {
		t.Fatal("a file region's claim has no WriterAt")
	}
	want := make([]byte, 3<<20+123)
	fill(want, k)
	if _, err := w.WriteAt(want[:4096], 0); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(want[4096:], 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(c.Bytes()[:len(want)], want) {
		t.Fatal("the mapping does not show what was written through the file")
	}
	for _, bad := range [][2]int64{{-1, 1}, {claimed, 1}, {claimed - 10, 11}} {
		if _, err := w.WriteAt(make([]byte, bad[1]), bad[0]); !errors.Is(err, ErrInvalidSize) || !strings.Contains(err.Error(), k.Short()) {
			t.Errorf("WriteAt(%d bytes at %d) = %v, want ErrInvalidSize naming the key", bad[1], bad[0], err)
		}
	}
	e, err := c.Publish(ctx, int64(len(want)))
	if err != nil {
		t.Fatal(err)
	}
	if err := r.Verify(e.Kind, e.Key); err != nil {
		t.Fatal(err)
	}
	// A published image is immutable: a writer kept past Publish fails.
	if _, err := w.WriteAt([]byte("late"), 0); !errors.Is(err, ErrClaimDone) || !strings.Contains(err.Error(), k.Short()) {
		t.Fatalf("a write after Publish: %v, want ErrClaimDone naming the key", err)
	}
	if err := r.Verify(e.Kind, e.Key); err != nil {
		t.Fatal(err)
	}
	// Nor may one write into an aborted (freed) extent.
	c, err = r.Claim(ctx, KindLayer, key("aborted"), 1<<20, ClaimOptions{Deferred: true})
	if err != nil {
		t.Fatal(err)
	}
	w = c.WriterAt()
	if err := c.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt([]byte("late"), 0); !errors.Is(err, ErrClaimDone) {
		t.Fatalf("a write after Abort: %v, want ErrClaimDone", err)
	}
}

// TestClaimWriterAtFull: on a full tmpfs, a write through the file fails
// with ErrFull (as Reserve does), not SIGBUS, and the region keeps working.
func TestClaimWriterAtFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size=16m"); err != nil {
		t.Fatalf("mounting a small tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	o := testOpts(t, 64<<20)
	o.Path = filepath.Join(dir, "region")
	r := mustCreate(t, o)
	mustJoin(t, r)
	ctx := context.Background()
	k := key("too big")
	c, err := r.Claim(ctx, KindLayer, k, 32<<20, ClaimOptions{Deferred: true})
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.WriterAt().WriteAt(make([]byte, 24<<20), 0)
	if !errors.Is(err, ErrFull) || !strings.Contains(err.Error(), k.Short()) {
		t.Fatalf("writing 24 MiB into a 16 MiB tmpfs: %v, want ErrFull naming the key", err)
	}
	if err := c.Abort(ctx); err != nil {
		t.Fatal(err)
	}
	publish(t, r, KindLayer, key("small"), 1<<20, 1<<20, ClaimOptions{Deferred: true})
}
