package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

// TestHelp: the top-level help lists every operator command, and every
// command prints its usage with its flags.
func TestHelp(t *testing.T) {
	help := func(args ...string) string {
		t.Helper()
		c := app()
		var out bytes.Buffer
		c.Writer, c.ErrWriter = &out, &out
		if err := c.Run(context.Background(), append([]string{name}, args...)); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out.String())
		}
		return out.String()
	}
	top := help("--help")
	for _, sub := range []string{"serve", "region", "mkfs", "inspect", "view", "mount", "umount", "convert"} {
		if !strings.Contains(top, "\n   "+sub+" ") {
			t.Errorf("--help does not list %s:\n%s", sub, top)
		}
	}
	if strings.Contains(top, "fuse-serve") {
		t.Errorf("--help lists the internal fuse-serve:\n%s", top)
	}
	for _, tc := range []struct {
		args  []string
		flags []string
	}{
		{nil, []string{"--config", "--root", "--address", "--region-size", "--mount-mode"}},
		{[]string{"serve"}, []string{"--config", "--root", "--address", "--containerd-address", "--log-level", "--region-path", "--region-size", "--mount-mode"}},
		{[]string{"region"}, []string{"init", "status", "ls", "gc", "verify"}},
		{[]string{"region", "init"}, []string{"--size", "--entries", "--participants", "--view-area", "--path", "--backend", "--json"}},
		{[]string{"region", "gc"}, []string{"--dry-run", "--min-age", "--lease"}},
		{[]string{"region", "verify"}, []string{"--path", "--json", "DIGEST"}},
		{[]string{"mkfs"}, []string{"SRC OUT", "--no-extension", "--max-size"}},
		{[]string{"inspect"}, []string{"IMAGE", "--json"}},
		{[]string{"view"}, []string{"OUT LAYER..."}},
		{[]string{"mount"}, []string{"IMAGE DIR", "--offset", "--length", "--mode", "--phys", "--state", "--validate"}},
		{[]string{"umount"}, []string{"DIR", "--state"}},
		{[]string{"convert"}, []string{"SRC DST", "--address", "--namespace", "--uncompressed", "--platform", "--all-platforms"}},
	} {
		out := help(append(tc.args, "--help")...)
		for _, f := range tc.flags {
			if !strings.Contains(out, f) {
				t.Errorf("%v --help lacks %q:\n%s", tc.args, f, out)
			}
		}
	}
}

// TestExitCodes: usage errors exit 2 naming the command and pointing at
// its --help; other failures exit 1.
func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want []string
	}{
		{[]string{"mkfs", "only-src"}, 2, []string{"containerd-daxfs-grpc mkfs: usage: want SRC and OUT", "'containerd-daxfs-grpc mkfs --help'"}},
		{[]string{"region", "init", "--size", "lots"}, 2, []string{"--size", "'containerd-daxfs-grpc region init --help'"}},
		{[]string{"region", "frobnicate"}, 2, []string{"unknown region sub-command"}},
		{[]string{"mount", "--no-such-flag", "a", "b"}, 2, []string{"containerd-daxfs-grpc mount:", "no-such-flag"}},
		{[]string{"frobnicate"}, 2, []string{`unknown command "frobnicate"`}},
		{[]string{"inspect", "/nonexistent/image"}, 1, []string{"containerd-daxfs-grpc inspect:", "/nonexistent/image"}},
		{[]string{"--config", "/nonexistent/config.toml"}, 1, []string{"config"}},
	} {
		var stderr bytes.Buffer
		code := execute(context.Background(), append([]string{name}, tc.args...), &stderr)
		if code != tc.code {
			t.Errorf("%v: exit %d, want %d\n%s", tc.args, code, tc.code, stderr.String())
		}
		for _, w := range tc.want {
			if !strings.Contains(stderr.String(), w) {
				t.Errorf("%v: output %q lacks %q", tc.args, stderr.String(), w)
			}
		}
	}
}
