package regioncmd

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

func run(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := Main(context.Background(), args, &out)
	return out.String(), err
}

func TestRegionCommand(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "region")
	out, err := run(t, "init", "--path", path, "--size", "16M", "--entries", "128")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "16.0 MiB") || !strings.Contains(out, "128 index slots") {
		t.Fatalf("init output:\n%s", out)
	}
	if _, err := run(t, "init", "--path", path, "--size", "16M"); !errors.Is(err, daxmem.ErrExist) {
		t.Fatalf("init over a region: %v", err)
	}
	if _, err := run(t, "status", "--path", path+"-missing"); err == nil {
		t.Fatal("status of a missing region succeeded (and maybe created it)")
	}
	if _, err := run(t, "frobnicate"); !errors.Is(err, ErrUsage) {
		t.Fatalf("unknown sub-command: %v", err)
	}
	if _, err := run(t, "init", "--path", path, "--size", "lots"); !errors.Is(err, ErrUsage) {
		t.Fatalf("bad size: %v", err)
	}

	// Put two images in, as a daemon would, and leave one referenced.
	r, err := daxmem.Open(ctx, daxmem.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Join(ctx, daxmem.ParticipantInfo{Host: "test-host"}, ""); err != nil {
		t.Fatal(err)
	}
	keys := []daxmem.Key{sha256.Sum256([]byte("a")), sha256.Sum256([]byte("b"))}
	var entries []daxmem.Entry
	for _, k := range keys {
		c, err := r.Claim(ctx, daxmem.KindLayer, k, 10000, daxmem.ClaimOptions{})
		if err != nil {
			t.Fatal(err)
		}
		copy(c.Bytes(), k[:])
		e, err := c.Publish(ctx, 5000)
		if err != nil {
			t.Fatal(err)
		}
		entries = append(entries, e)
	}
	if err := r.Unref(daxmem.KindLayer, keys[1]); err != nil {
		t.Fatal(err)
	}

	out, err = run(t, "status", "--path", path, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var st statusOut
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if st.Ready != 2 || len(st.Participants) != 1 || st.Participants[0].Host != "test-host" || !st.Participants[0].Alive {
		t.Fatalf("status: %+v", st)
	}
	out, err = run(t, "ls", "--path", path)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(out, "READY") != 2 || !strings.Contains(out, keys[0].Short()) {
		t.Fatalf("ls:\n%s", out)
	}
	out, err = run(t, "ls", "--path", path, "--json")
	if err != nil {
		t.Fatal(err)
	}
	var ls []entryJSON
	if err := json.Unmarshal([]byte(out), &ls); err != nil || len(ls) != 2 {
		t.Fatalf("ls --json: %v\n%s", err, out)
	}
	if out, err = run(t, "verify", "--path", path); err != nil || strings.Count(out, " ok") != 2 {
		t.Fatalf("verify: %v\n%s", err, out)
	}

	out, err = run(t, "gc", "--path", path, "--dry-run")
	if err != nil || !strings.Contains(out, "would free: 1") {
		t.Fatalf("gc --dry-run: %v\n%s", err, out)
	}
	out, err = run(t, "gc", "--path", path)
	if err != nil || !strings.Contains(out, "images freed: 1") {
		t.Fatalf("gc: %v\n%s", err, out)
	}
	if _, ok := r.Lookup(daxmem.KindLayer, keys[0]); !ok {
		t.Fatal("gc freed a referenced image")
	}

	// Corrupt the remaining image: verify fails naming the key.
	b, err := r.Slice(entries[0].Offset, entries[0].Length)
	if err != nil {
		t.Fatal(err)
	}
	b[1] ^= 0xff
	out, err = run(t, "verify", "--path", path)
	if err == nil || !strings.Contains(out, keys[0].String()) || !strings.Contains(out, "checksum mismatch") {
		t.Fatalf("verify of a corrupt image: %v\n%s", err, out)
	}
}

// TestRegionInitAlign: `region init --align 2M` records 2 MiB (shown by
// status), rounds the size up to it; a bad value is a usage error.
func TestRegionInitAlign(t *testing.T) {
	path := filepath.Join(t.TempDir(), "region")
	out, err := run(t, "init", "--path", path, "--size", "5M", "--entries", "64", "--align", "2M", "--json")
	if err != nil {
		t.Fatal(err)
	}
	var st statusOut
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("%v:\n%s", err, out)
	}
	if st.Align != 2<<20 || st.Size != 6<<20 {
		t.Fatalf("align %d size %d, want 2 MiB and 6 MiB", st.Align, st.Size)
	}
	out, err = run(t, "status", "--path", path)
	if err != nil || !regexp.MustCompile(`alignment: +2.0 MiB`).MatchString(out) {
		t.Fatalf("status: %v\n%s", err, out)
	}
	if _, err := run(t, "init", "--path", path+"2", "--align", "lots"); !errors.Is(err, ErrUsage) {
		t.Fatalf("--align lots: %v", err)
	}
	if _, err := run(t, "init", "--path", path+"3", "--align", "3M"); !errors.Is(err, daxmem.ErrInvalidSize) {
		t.Fatalf("--align 3M: %v", err)
	}
}

// TestRegionJSON: on an empty region every list is [] (not null), and
// every sub-command's JSON keys are snake_case.
func TestRegionJSON(t *testing.T) {
	path := filepath.Join(t.TempDir(), "region")
	if _, err := run(t, "init", "--path", path, "--size", "8M", "--entries", "64"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		keys []string // keys of the object, or of a list's elements
		list bool
	}{
		{[]string{"status"}, []string{"path", "data_size", "largest_free", "entry_slots", "participants"}, false},
		{[]string{"ls"}, nil, true},
		{[]string{"verify"}, nil, true},
		{[]string{"gc", "--dry-run"}, []string{"dry_run", "dead_participants", "bits_cleared", "claims_reclaimed", "images_freed", "bytes_freed", "aliases_freed", "kept"}, false},
	} {
		args := append(append([]string{}, tc.args...), "--path", path, "--json")
		out, err := run(t, args...)
		if err != nil {
			t.Fatalf("%v: %v", tc.args, err)
		}
		if tc.list {
			if strings.TrimSpace(out) != "[]" {
				t.Errorf("%v on an empty region: %q, want []", tc.args, out)
			}
			continue
		}
		var obj map[string]json.RawMessage
		if err := json.Unmarshal([]byte(out), &obj); err != nil {
			t.Fatalf("%v: %v\n%s", tc.args, err, out)
		}
		for k, v := range obj {
			if strings.ToLower(k) != k || strings.Contains(k, " ") {
				t.Errorf("%v: key %q is not snake_case", tc.args, k)
			}
			if string(v) == "null" {
				t.Errorf("%v: %s is null", tc.args, k)
			}
		}
		for _, k := range tc.keys {
			if _, ok := obj[k]; !ok {
				t.Errorf("%v: no key %q in %s", tc.args, k, out)
			}
		}
	}

	// With an image, verify's and ls's elements have snake_case keys too.
	ctx := context.Background()
	r, err := daxmem.Open(ctx, daxmem.Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if _, err := r.Join(ctx, daxmem.ParticipantInfo{}, ""); err != nil {
		t.Fatal(err)
	}
	k := daxmem.Key(sha256.Sum256([]byte("x")))
	c, err := r.Claim(ctx, daxmem.KindLayer, k, 8192, daxmem.ClaimOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Publish(ctx, 4096); err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"verify", "ls"} {
		out, err := run(t, sub, "--path", path, "--json")
		if err != nil {
			t.Fatal(err)
		}
		var list []map[string]any
		if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 {
			t.Fatalf("%s --json: %v\n%s", sub, err, out)
		}
		for key := range list[0] {
			if strings.ToLower(key) != key {
				t.Errorf("%s --json: key %q is not snake_case", sub, key)
			}
		}
		if list[0]["key"] != k.String() {
			t.Errorf("%s --json: key %v, want %s", sub, list[0]["key"], k)
		}
	}
}

// TestRegionHelp: every sub-command prints its usage with its flags.
func TestRegionHelp(t *testing.T) {
	for sub, flags := range map[string][]string{
		"init":   {"--size", "--entries", "--participants", "--view-area", "--align", "--path", "--json"},
		"status": {"--path", "--backend", "--json"},
		"ls":     {"--path", "--json"},
		"gc":     {"--dry-run", "--min-age", "--lease", "--path"},
		"verify": {"--path", "DIGEST"},
	} {
		out, err := run(t, sub, "--help")
		if err != nil {
			t.Fatalf("%s --help: %v", sub, err)
		}
		for _, f := range flags {
			if !strings.Contains(out, f) {
				t.Errorf("%s --help lacks %s:\n%s", sub, f, out)
			}
		}
	}
	out, err := run(t, "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, sub := range []string{"init", "status", "ls", "gc", "verify"} {
		if !strings.Contains(out, sub) {
			t.Errorf("region --help does not list %s:\n%s", sub, out)
		}
	}
	if _, err := run(t); !errors.Is(err, ErrUsage) {
		t.Fatalf("region without a sub-command: %v, want a usage error", err)
	}
	if _, err := run(t, "init", "--no-such-flag"); !errors.Is(err, ErrUsage) {
		t.Fatalf("unknown flag: %v, want a usage error", err)
	}
}
