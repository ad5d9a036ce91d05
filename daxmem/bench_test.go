package daxmem

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"
)

// shmPath puts a bench region on tmpfs, like the default path: a region
// file on a disk filesystem would time msync to the disk instead.
func shmPath(b *testing.B) string {
	dir, err := os.MkdirTemp("/dev/shm", "daxmem-bench-")
	if err != nil {
		b.Skipf("no /dev/shm: %v", err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, "region")
}

func BenchmarkLookup(b *testing.B) {
	for _, n := range []int{100, 3000} {
		b.Run(fmt.Sprintf("entries=%d", n), func(b *testing.B) {
			o := testOpts(b, 256<<20)
			o.Entries = 4096
			r := mustCreate(b, o)
			mustJoin(b, r)
			keys := make([]Key, n)
			for i := range keys {
				keys[i] = key(fmt.Sprintf("bench-%d", i))
				publish(b, r, KindLayer, keys[i], 4096, 4096, ClaimOptions{})
			}
			b.Logf("longest probe %d with %d of %d slots used", r.Stats().MaxProbe, n, o.Entries)
			b.Run("hit", func(b *testing.B) {
				for i := 0; b.Loop(); i++ {
					if _, ok := r.Lookup(KindLayer, keys[i%n]); !ok {
						b.Fatal("miss")
					}
				}
			})
			b.Run("miss", func(b *testing.B) {
				k := key("absent")
				for b.Loop() {
					if _, ok := r.Lookup(KindLayer, k); ok {
						b.Fatal("hit")
					}
				}
			})
		})
	}
}

// BenchmarkClaimPublish: one participant claiming, filling and publishing
// 64 KiB images (the checksum and the index scan are in the figure).
func BenchmarkClaimPublish(b *testing.B) {
	ctx := context.Background()
	o := testOpts(b, 512<<20)
	o.Path = shmPath(b)
	o.Entries = 4096
	r := mustCreate(b, o)
	mustJoin(b, r)
	const size = 64 << 10
	for i := 0; b.Loop(); i++ {
		k := key(fmt.Sprintf("cp-%d", i))
		c, err := r.Claim(ctx, KindLayer, k, size, ClaimOptions{})
		if err != nil {
			b.Fatal(err)
		}
		c.Bytes()[0] = 1
		if _, err := c.Publish(ctx, size); err != nil {
			b.Fatal(err)
		}
		r.Unref(KindLayer, k)
		if i%1000 == 999 {
			b.StopTimer()
			r.GC(ctx, GCOptions{})
			b.StartTimer()
		}
	}
}

const benchChildEnv = "DAXMEM_BENCH_CHILD"

// benchChild claims and publishes COUNT images of 64 KiB on distinct keys.
func benchChild() error {
	ctx := context.Background()
	count, _ := strconv.Atoi(os.Getenv("DAXMEM_COUNT"))
	r, err := Open(ctx, Options{Path: os.Getenv("DAXMEM_REGION")})
	if err != nil {
		return err
	}
	defer r.Close()
	if _, err := r.Join(ctx, ParticipantInfo{}, ""); err != nil {
		return err
	}
	defer r.Leave(ctx)
	for i := range count {
		k := key(fmt.Sprintf("%d-%d", os.Getpid(), i))
		c, err := r.Claim(ctx, KindLayer, k, 64<<10, ClaimOptions{})
		if err != nil {
			return err
		}
		c.Bytes()[0] = 1
		if _, err := c.Publish(ctx, 64<<10); err != nil {
			return err
		}
		if err := r.Unref(KindLayer, k); err != nil {
			return err
		}
		if i%200 == 199 {
			if _, err := r.GC(ctx, GCOptions{}); err != nil {
				return err
			}
		}
	}
	return nil
}

// BenchmarkClaimPublishProcesses: N processes claim and publish on one
// region at once; the figure is images per second over all of them.
func BenchmarkClaimPublishProcesses(b *testing.B) {
	const perProc = 1000
	for _, n := range []int{1, 2, 4} {
		b.Run(fmt.Sprintf("procs=%d", n), func(b *testing.B) {
			path := shmPath(b)
			r := mustCreate(b, Options{Path: path, Size: 1 << 30, Entries: 4096})
			r.Close()
			var total time.Duration
			for b.Loop() {
				cmds := make([]*exec.Cmd, n)
				start := time.Now()
				for i := range cmds {
					cmds[i] = exec.Command(os.Args[0], "-test.run=^$", "-test.bench=^$") //nolint:gosec // G702: this test binary, as a child
					cmds[i].Env = append(os.Environ(), benchChildEnv+"=1", "DAXMEM_REGION="+path, "DAXMEM_COUNT="+strconv.Itoa(perProc))
					cmds[i].Stderr = os.Stderr
					if err := cmds[i].Start(); err != nil {
						b.Fatal(err)
					}
				}
				for _, c := range cmds {
					if err := c.Wait(); err != nil {
						b.Fatal(err)
					}
				}
				total += time.Since(start)
			}
			b.ReportMetric(float64(n*perProc*b.N)/total.Seconds(), "images/s")
		})
	}
}
