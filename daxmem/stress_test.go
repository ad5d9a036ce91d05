package daxmem

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

var soak = flag.Duration("soak", 0, "run the multi-process stress test for this long (e.g. 5m)")

const childEnv = "DAXMEM_STRESS_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(benchChildEnv) != "" {
		if err := benchChild(); err != nil {
			fmt.Fprintln(os.Stderr, "bench child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if os.Getenv(childEnv) != "" {
		if err := stressChild(); err != nil {
			fmt.Fprintln(os.Stderr, "stress child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// stressKeys is the key space the children fight over.
func stressKey(round, i int) (Kind, Key) {
	k := KindLayer
	if i%4 == 3 {
		k = KindView
	}
	return k, key(fmt.Sprintf("stress-%d-%d", round, i))
}

// stressSize is the image size of a key: fixed per key so any participant
// converting it produces the same bytes.
func stressSize(k Key) int64 {
	return 1 + int64(binary.LittleEndian.Uint32(k[:4])%(96<<10))
}

type stressConfig struct {
	Region, IDFile, Log string
	Seed                int64
	Round, Keys, Ops    int
}

func (c stressConfig) env() []string {
	return append(os.Environ(),
		childEnv+"=1",
		"DAXMEM_REGION="+c.Region, "DAXMEM_IDFILE="+c.IDFile, "DAXMEM_LOG="+c.Log,
		"DAXMEM_SEED="+strconv.FormatInt(c.Seed, 10),
		"DAXMEM_KEYS="+strconv.Itoa(c.Keys), "DAXMEM_ROUND="+strconv.Itoa(c.Round), "DAXMEM_OPS="+strconv.Itoa(c.Ops))
}

// stressChild is one participant process: it claims random keys, writes
// them slowly in chunks (so a SIGKILL lands mid-write), publishes or
// aborts, references what others made, and logs what it did.
func stressChild() error {
	seed, _ := strconv.ParseInt(os.Getenv("DAXMEM_SEED"), 10, 64)
	nkeys, _ := strconv.Atoi(os.Getenv("DAXMEM_KEYS"))
	ops, _ := strconv.Atoi(os.Getenv("DAXMEM_OPS"))
	round, _ := strconv.Atoi(os.Getenv("DAXMEM_ROUND"))
	rng := rand.New(rand.NewSource(seed))
	ctx := context.Background()
	r, err := Open(ctx, Options{Path: os.Getenv("DAXMEM_REGION"), HeartbeatInterval: 20 * time.Millisecond, LeaseTimeout: 2 * time.Second})
	if err != nil {
		return err
	}
	defer r.Close()
	if _, err := r.Join(ctx, ParticipantInfo{}, os.Getenv("DAXMEM_IDFILE")); err != nil {
		return err
	}
	logf, err := os.OpenFile(os.Getenv("DAXMEM_LOG"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	defer logf.Close()
	pid := os.Getpid()
	_, inc, _ := r.me()
	fmt.Fprintf(logf, "J %d %d %d\n", r.ID(), inc, pid)
	logLine := func(op string, k Kind, kk Key) {
		fmt.Fprintf(logf, "%s %s %s %d\n", op, k, kk, pid)
	}
	for range ops {
		k, kk := stressKey(round, rng.Intn(nkeys))
		var opts ClaimOptions
		if k == KindView {
			// Views must lie below the layers: ask for an end below the
			// lowest layer, as the snapshotter would.
			for _, e := range r.Entries() {
				if e.Kind == KindLayer && (opts.Below == 0 || e.Offset < opts.Below) {
					opts.Below = e.Offset
				}
			}
		}
		size := stressSize(kk)
		c, err := r.Claim(ctx, k, kk, size+int64(rng.Intn(64<<10)), opts)
		switch {
		case errors.Is(err, ErrExists):
			if err := r.Ref(k, kk); err != nil && !errors.Is(err, ErrNotFound) {
				return err
			}
			continue
		case errors.Is(err, ErrBusy):
			if _, err := r.Wait(ctx, k, kk); err != nil && !errors.Is(err, ErrAbandoned) {
				return err
			}
			continue
		case errors.Is(err, ErrFull):
			continue
		case err != nil:
			return err
		}
		logLine("C", k, kk)
		b := c.Bytes()
		want := make([]byte, size)
		fill(want, kk)
		for off := 0; off < int(size); off += 16 << 10 {
			copy(b[off:], want[off:min(int(size), off+16<<10)])
			time.Sleep(time.Duration(rng.Intn(4000)) * time.Microsecond)
		}
		if rng.Intn(10) == 0 {
			if err := c.Abort(ctx); err != nil {
				return err
			}
			logLine("A", k, kk)
			continue
		}
		if _, err := c.Publish(ctx, size); err != nil {
			return err
		}
		logLine("P", k, kk)
		if rng.Intn(8) == 0 {
			// Reclaim what dead participants left, but keep every image:
			// the checks below count conversions per key.
			if _, err := r.GC(ctx, GCOptions{Keep: func(Entry) bool { return true }}); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkRegion asserts the region invariants from outside (no join).
func checkRegion(t *testing.T, path string) []Entry {
	t.Helper()
	r, err := Open(context.Background(), Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	entries := r.Entries()
	seen := map[string]bool{}
	for i, e := range entries {
		if !r.sane(e) {
			t.Fatalf("entry %+v outside the data area", e)
		}
		if i > 0 && entries[i-1].Offset+entries[i-1].Extent > e.Offset {
			t.Fatalf("extents overlap: %+v and %+v", entries[i-1], e)
		}
		id := e.Kind.String() + e.Key.String()
		if seen[id] {
			t.Fatalf("key %s %s has two entries", e.Kind, e.Key)
		}
		seen[id] = true
		if e.State != StateReady {
			continue
		}
		if err := r.VerifyEntry(e); err != nil {
			t.Fatal(err)
		}
		want := make([]byte, stressSize(e.Key))
		fill(want, e.Key)
		got, _ := r.Slice(e.Offset, e.Length)
		if !bytes.Equal(got, want) {
			t.Fatalf("READY %s %s has the wrong bytes (%d, want %d)", e.Kind, e.Key.Short(), len(got), len(want))
		}
	}
	return entries
}

// checkLog asserts each key was converted by exactly one participant: at
// most one publication per key, and every claim that was neither published
// nor aborted belongs to a process we killed.
func checkLog(t *testing.T, logPath string, killed map[int]bool, entries []Entry) (claims, pubs, rejoins, midWrite int) {
	t.Helper()
	f, err := os.Open(logPath)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, 0, 0, 0
		}
		t.Fatal(err)
	}
	defer f.Close()
	type claim struct{ key, pid string }
	open := map[claim]int{}
	published := map[string]int{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) != 4 {
			continue // a line cut by SIGKILL
		}
		c := claim{fl[1] + " " + fl[2], fl[3]}
		switch fl[0] {
		case "J":
			if inc, _ := strconv.Atoi(fl[2]); inc > 1 {
				rejoins++
			}
		case "C":
			open[c]++
			claims++
		case "A":
			open[c]--
		case "P":
			open[c]--
			published[c.key]++
			pubs++
		}
	}
	for k, n := range published {
		if n > 1 {
			t.Fatalf("%s was published %d times", k, n)
		}
	}
	for c, n := range open {
		pid, _ := strconv.Atoi(c.pid)
		if n > 0 && !killed[pid] {
			t.Fatalf("pid %d claimed %s and neither published nor aborted it, but was not killed", pid, c.key)
		}
		if n > 0 {
			midWrite++
		}
	}
	for _, e := range entries {
		if e.State == StateReady && published[e.Kind.String()+" "+e.Key.String()] == 0 {
			// Published but killed before it could log: the claim must
			// be from a killed process.
			found := false
			for c, n := range open {
				pid, _ := strconv.Atoi(c.pid)
				if c.key == e.Kind.String()+" "+e.Key.String() && n > 0 && killed[pid] {
					found = true
				}
			}
			if !found {
				t.Fatalf("READY %s %s has no publisher in the log", e.Kind, e.Key)
			}
		}
	}
	return claims, pubs, rejoins, midWrite
}

func TestMultiProcessStress(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process stress test skipped in -short mode")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "region")
	logPath := filepath.Join(dir, "log")
	r := mustCreate(t, Options{Path: path, Size: 32 << 20, Entries: 512, Participants: 32})
	r.Close()
	const children = 6
	rounds, deadline := 8, time.Time{}
	if *soak > 0 {
		rounds, deadline = 1<<30, time.Now().Add(*soak)
	}
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	killed := map[int]bool{}
	totalKills, totalRejoins, totalMidWrite := 0, 0, 0
	for round := 0; round < rounds && (deadline.IsZero() || time.Now().Before(deadline)); round++ {
		procs := make([]*exec.Cmd, children)
		done := make([]chan error, children)
		for i := range procs {
			cfg := stressConfig{Region: path, IDFile: filepath.Join(dir, fmt.Sprintf("participant-%d", i)), Log: logPath,
				Seed: rng.Int63(), Round: round, Keys: 40, Ops: 30}
			cmd := exec.Command(os.Args[0], "-test.run=^$") //nolint:gosec // G702: this test binary, as a child
			cmd.Env = cfg.env()
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			procs[i] = cmd
			ch := make(chan error, 1)
			done[i] = ch
			go func() {
				err := cmd.Wait()
				if err != nil && stderr.Len() > 0 {
					err = fmt.Errorf("%w: %s", err, stderr.String())
				}
				ch <- err
			}()
		}
		// Kill some participants mid-flight, at random moments.
		victims := rng.Perm(children)[:2+rng.Intn(2)]
		for j, v := range victims {
			if j%2 == 0 {
				// Kill right after it logged a claim: it is writing now.
				waitForClaim(logPath, procs[v].Process.Pid, time.Second)
			} else {
				time.Sleep(time.Duration(10+rng.Intn(80)) * time.Millisecond)
			}
			if err := procs[v].Process.Signal(syscall.SIGKILL); err == nil {
				killed[procs[v].Process.Pid] = true
			}
		}
		for i, ch := range done {
			select {
			case err := <-ch:
				var ee *exec.ExitError
				if errors.As(err, &ee) && ee.Sys().(syscall.WaitStatus).Signaled() && killed[procs[i].Process.Pid] {
					totalKills++
					continue
				}
				if err != nil {
					t.Fatalf("round %d child %d: %v", round, i, err)
				}
			case <-time.After(2 * time.Minute):
				t.Fatalf("round %d child %d hung", round, i)
			}
		}
		entries := checkRegion(t, path)
		claims, pubs, rejoins, midWrite := checkLog(t, logPath, killed, entries)
		t.Logf("round %d: %d entries; so far %d claims, %d publications, %d kills (%d mid-write), %d re-joins of a previous slot",
			round, len(entries), claims, pubs, totalKills, midWrite, rejoins)
		totalRejoins, totalMidWrite = rejoins, midWrite
		if round%2 == 1 {
			// Free the space: everyone of this round is gone, so a GC by a
			// fresh participant frees everything and reclaims every slot.
			// The next round's children re-join their old slots or new ones.
			gcAll(t, path)
		}
	}
	if totalMidWrite == 0 || totalRejoins == 0 {
		t.Fatalf("%d kills (%d mid-write), %d re-joins: the test did not exercise crashes and restarts", totalKills, totalMidWrite, totalRejoins)
	}
	gcAll(t, path)
}

// waitForClaim polls the log until pid has logged a claim (or timeout).
func waitForClaim(logPath string, pid int, timeout time.Duration) {
	suffix := " " + strconv.Itoa(pid) + "\n"
	for end := time.Now().Add(timeout); time.Now().Before(end); time.Sleep(time.Millisecond) {
		b, _ := os.ReadFile(logPath)
		for _, line := range strings.SplitAfter(string(b), "\n") {
			if strings.HasPrefix(line, "C ") && strings.HasSuffix(line, suffix) {
				return
			}
		}
	}
}

// gcAll runs GC as a fresh participant with every other one gone and
// checks that nothing leaked.
func gcAll(t *testing.T, path string) {
	t.Helper()
	r2, err := Open(context.Background(), Options{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	defer r2.Close()
	mustJoin(t, r2)
	defer r2.Leave(context.Background())
	st, err := r2.GC(context.Background(), GCOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("final gc: %+v", st)
	if n := len(r2.Entries()); n != 0 {
		t.Fatalf("%d entries left after GC with all participants gone: %+v", n, r2.Entries())
	}
	if s := r2.Stats(); s.Free != s.DataSize || s.LargestFree != s.DataSize-s.ViewArea || s.ViewFree != s.ViewArea {
		t.Fatalf("free %d largest %d view area free %d, want the whole data area %d (above the view area: %d)", s.Free, s.LargestFree, s.ViewFree, s.DataSize, s.DataSize-s.ViewArea)
	}
	for _, p := range r2.Participants() {
		if p.State != "free" && !p.Self {
			t.Fatalf("participant %d still %s after GC", p.ID, p.State)
		}
	}
}
