package daxmem

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		err  bool
	}{
		{"4096", 4096, false},
		{"8GiB", 8 << 30, false},
		{"8G", 8 << 30, false},
		{"8GB", 8 << 30, false},
		{"8gb", 8 << 30, false},
		{"512 MiB", 512 << 20, false},
		{" 16M ", 16 << 20, false},
		{"1.5K", 1536, false},
		{"2tb", 2 << 40, false},
		{"1p", 1 << 50, false},
		{"100b", 100, false},
		{"0", 0, false},
		{"", 0, true},
		{"GiB", 0, true},
		{"-1", 0, true},
		{"3 parsecs", 0, true},
		{"8GiBs", 0, true},
		{"99999999999TiB", 0, true},
		{"18446744073709551615", 0, true},
		{"1e400", 0, true},
	} {
		got, err := ParseSize(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, error %v", tc.in, got, err, tc.want, tc.err)
		}
		if err != nil && !errors.Is(err, ErrInvalidSize) {
			t.Errorf("ParseSize(%q): error %v does not wrap ErrInvalidSize", tc.in, err)
		}
	}
}

// FuzzParseSize: any input gives a size in [0, MaxSize] or an error
// wrapping ErrInvalidSize, never a panic.
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"8GiB", "1.5k", "512 MiB", "0", "1e18", "-3", "9p"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err != nil {
			if !errors.Is(err, ErrInvalidSize) || n != 0 {
				t.Fatalf("ParseSize(%q) = %d, %v", s, n, err)
			}
			return
		}
		if n < 0 || n > MaxSize {
			t.Fatalf("ParseSize(%q) = %d, outside [0, MaxSize]", s, n)
		}
	})
}
