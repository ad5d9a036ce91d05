package daxmem

import (
	"context"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// smallRegion returns the bytes of a valid tiny region with a few entries
// and a participant, as a seed for the fuzzers.
func smallRegion(f *testing.F) []byte {
	dir := f.TempDir()
	o := Options{Path: filepath.Join(dir, "r"), Size: 64 << 10, Entries: 8, Participants: 2,
		HeartbeatInterval: 10 * time.Millisecond, LeaseTimeout: 50 * time.Millisecond}
	r, err := Create(context.Background(), o)
	if err != nil {
		f.Fatal(err)
	}
	if _, err := r.Join(context.Background(), ParticipantInfo{}, ""); err != nil {
		f.Fatal(err)
	}
	ctx := context.Background()
	for i, k := range []Kind{KindLayer, KindView} {
		c, err := r.Claim(ctx, k, key(string(rune('a'+i))), 5000, ClaimOptions{})
		if err != nil {
			f.Fatal(err)
		}
		if _, err := c.Publish(ctx, 3000); err != nil {
			f.Fatal(err)
		}
	}
	if _, err := r.Claim(ctx, KindLayer, key("w"), 4096, ClaimOptions{}); err != nil {
		f.Fatal(err)
	}
	r.Close()
	b, err := os.ReadFile(o.Path)
	if err != nil {
		f.Fatal(err)
	}
	return b
}

// FuzzOpen feeds arbitrary bytes to Open as a region file. Half the time
// the header checksum is recomputed over the fuzzed bytes so the fuzzer
// gets past it to the geometry checks and the index. Whatever Open
// accepts must then survive every operation without a panic or hang, and
// never hand out an extent outside the data area.
func FuzzOpen(f *testing.F) {
	valid := smallRegion(f)
	f.Add(valid, false)
	f.Add(valid, true)
	f.Add(valid[:headerSize], true)
	f.Add([]byte{}, false)
	f.Add(make([]byte, 3*pageSize), true)
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte, fixCRC bool) {
		if len(data) > 1<<20 {
			return
		}
		data = append([]byte(nil), data...)
		if fixCRC && len(data) >= headerSize {
			binary.LittleEndian.PutUint64(data[hMagic:], Magic)
			binary.LittleEndian.PutUint32(data[hVersion:], Version)
			binary.LittleEndian.PutUint64(data[hHeaderCRC:], uint64(crc32.Checksum(data[8:hImmutableEnd], castagnoli)))
		}
		path := filepath.Join(dir, "region")
		os.Remove(path)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()

		r, err := Open(ctx, Options{Path: path, HeartbeatInterval: 10 * time.Millisecond, LeaseTimeout: 50 * time.Millisecond})
		if err != nil {
			if !errors.Is(err, ErrBadHeader) {
				t.Fatalf("Open error is not ErrBadHeader: %v", err)
			}
			return
		}
		defer r.Close()
		exerciseRegion(t, ctx, r)
	})
}

func exerciseRegion(t *testing.T, ctx context.Context, r *Region) {
	_ = r.Stats()
	for _, e := range r.Entries() {
		if _, ok := r.Lookup(e.Kind, e.Key); ok {
			got, _ := r.Lookup(e.Kind, e.Key)
			if b, err := r.Slice(got.Offset, got.Length); err != nil || int64(len(b)) != got.Length {
				t.Fatalf("Lookup returned an entry Slice refuses: %+v: %v", got, err)
			}
		}
		_ = r.VerifyEntry(e)
	}
	if _, err := r.Join(ctx, ParticipantInfo{}, ""); err != nil {
		return // e.g. a table full of live-looking participants
	}
	r.GC(ctx, GCOptions{})
	c, err := r.Claim(ctx, KindLayer, key("fuzz"), 4096, ClaimOptions{})
	if err == nil {
		if c.Offset() < r.DataOffset() || c.Offset()+4096 > r.Size() {
			t.Fatalf("claim outside the data area: %d", c.Offset())
		}
		for _, e := range r.Entries() {
			if e.Key != key("fuzz") && r.sane(e) && e.Offset < c.Offset()+4096 && c.Offset() < e.Offset+e.Extent {
				t.Fatalf("claim at %d overlaps %+v", c.Offset(), e)
			}
		}
		if _, err := c.Publish(ctx, 100); err != nil {
			t.Fatal(err)
		}
		if err := r.Verify(KindLayer, key("fuzz")); err != nil {
			t.Fatal(err)
		}
	}
	for _, e := range r.Entries() {
		r.Ref(e.Kind, e.Key)
		r.Unref(e.Kind, e.Key)
	}
	r.GC(ctx, GCOptions{})
	r.Leave(ctx)
}
