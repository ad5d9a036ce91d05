package benchmarks

import (
	"flag"
	"fmt"
	"os"
	"sort"
	"testing"
	"text/tabwriter"
)

var table = flag.Bool("table", false, "run every benchmark (best of -table.runs) and print one comparison table instead of running tests")
var tableRuns = flag.Int("table.runs", 3, "runs per benchmark for -table")

// TestMain prints the comparison table when asked:
//
//	go test -v ./converter/benchmarks -args -table
//
// (-v because go test hides the output of a passing package otherwise).
func TestMain(m *testing.M) {
	flag.Parse()
	if !*table {
		os.Exit(m.Run())
	}
	benches := []struct {
		name string
		f    func(*testing.B)
	}{
		{"Debian rootfs: image vs mkfs.erofs", BenchmarkImageDebianRootfs},
		{"50,000 small files: image vs mkfs.erofs", BenchmarkImageSmallFiles},
		{"gzip Debian layer: image vs tar -xzf", BenchmarkGzipLayer},
		{"view of the Debian chain", BenchmarkViewDebianChain},
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "benchmark\tmetric\tvalue")
	// Exactly -table.runs iterations, as -benchtime Nx does.
	if err := flag.Set("test.benchtime", fmt.Sprintf("%dx", *tableRuns)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	for _, bc := range benches {
		r := testing.Benchmark(bc.f)
		if r.N == 0 {
			fmt.Fprintf(w, "%s\tFAILED\t\n", bc.name)
			continue
		}
		keys := make([]string, 0, len(r.Extra))
		for k := range r.Extra {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		if bc.name == "view of the Debian chain" {
			fmt.Fprintf(w, "%s\tms/op\t%.2f\n", bc.name, float64(r.NsPerOp())/1e6)
		}
		for _, k := range keys {
			fmt.Fprintf(w, "%s\t%s\t%.2f\n", bc.name, k, r.Extra[k])
		}
	}
	w.Flush()
	os.Exit(0)
}
