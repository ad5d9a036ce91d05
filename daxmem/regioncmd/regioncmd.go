// Package regioncmd is the operator command `containerd-daxfs-grpc region
// init|status|ls|gc|verify`: it operates the shared region without the
// daemon. Only gc joins the region (as a short-lived participant that
// leaves when done); the others just read it.
package regioncmd

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// ErrUsage marks a usage error (the caller prints usage and exits 2).
var ErrUsage = errors.New("usage")

// Main runs `region ARGS...`, writing tables (or JSON with --json) to out.
func Main(ctx context.Context, args []string, out io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: region needs a sub-command: init, status, ls, gc or verify", ErrUsage)
	}
	sub, args := args[0], args[1:]
	fs := flag.NewFlagSet("region "+sub, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var (
		o        daxmem.Options
		size     string
		viewArea string
		asJSON   bool
		dryRun   bool
		minAge   time.Duration
		lease    time.Duration
		entries  int
		parts    int
		backendF string
	)
	fs.StringVar(&o.Path, "path", "", "region file or device (default "+daxmem.DefaultPath+")")
	fs.StringVar(&backendF, "backend", "file", "file, hugetlbfs, devdax or fsdax")
	fs.BoolVar(&asJSON, "json", false, "print JSON")
	switch sub {
	case "init":
		fs.StringVar(&size, "size", "", "region size, e.g. 8G: binary units K, M, G, T, P (default 8GiB, daxmem.DefaultSize)")
		fs.IntVar(&entries, "entries", daxmem.DefaultEntries, "index slots")
		fs.IntVar(&parts, "participants", daxmem.DefaultParticipants, "participant slots (at most 64)")
		fs.StringVar(&viewArea, "view-area", "", "bytes at the bottom of the data area kept for views, about 370 per file of the images in use at once (default an eighth)")
	case "gc":
		fs.BoolVar(&dryRun, "dry-run", false, "report what would be freed")
		fs.DurationVar(&minAge, "min-age", 0, "keep unreferenced images published less than this long ago")
		fs.DurationVar(&lease, "lease", 0, "heartbeat age after which a participant is dead (default 10s; must match the daemons)")
	case "status", "ls", "verify":
	default:
		return fmt.Errorf("%w: unknown region sub-command %q", ErrUsage, sub)
	}
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	o.Backend = backendF
	if size != "" {
		n, err := daxmem.ParseSize(size)
		if err != nil {
			return fmt.Errorf("%w: --size: %v", ErrUsage, err)
		}
		o.Size = n
	}
	if viewArea != "" {
		n, err := daxmem.ParseSize(viewArea)
		if err != nil {
			return fmt.Errorf("%w: --view-area: %v", ErrUsage, err)
		}
		o.ViewArea = n
	}
	o.Entries, o.Participants = entries, parts
	if lease > 0 {
		o.LeaseTimeout = lease
		o.HeartbeatInterval = lease / 4
	}
	emit := func(v any, table func()) error {
		if asJSON {
			enc := json.NewEncoder(out)
			enc.SetIndent("", "  ")
			return enc.Encode(v)
		}
		table()
		return nil
	}

	if sub == "init" {
		r, err := daxmem.Create(ctx, o)
		if err != nil {
			return err
		}
		defer r.Close()
		st := r.Stats()
		return emit(statusJSON(st), func() { printStatus(out, st) })
	}
	o.NoCreate = true
	r, err := daxmem.Open(ctx, o)
	if err != nil {
		return err
	}
	defer r.Close()
	switch sub {
	case "status":
		st := r.Stats()
		return emit(statusJSON(st), func() { printStatus(out, st) })
	case "ls":
		es := r.Entries()
		return emit(entriesJSON(es), func() { printEntries(out, es) })
	case "gc":
		if _, err := r.Join(ctx, daxmem.ParticipantInfo{}, ""); err != nil {
			return err
		}
		defer r.Leave(ctx)
		gs, err := r.GC(ctx, daxmem.GCOptions{MinAge: minAge, DryRun: dryRun})
		if err != nil {
			return err
		}
		return emit(gs, func() {
			verb := "freed"
			if dryRun {
				verb = "would free"
			}
			fmt.Fprintf(out, "dead participants reclaimed: %v\nreference bits cleared: %d\nclaims reclaimed: %d\nimages %s: %d (%s)\naliases %s: %d\nkept by policy: %d\n",
				gs.DeadParticipants, gs.BitsCleared, gs.ClaimsReclaimed, verb, gs.EntriesFreed, human(gs.BytesFreed), verb, gs.AliasesFreed, gs.Kept)
		})
	case "verify":
		type result struct {
			Kind, Key, Error string
			OK               bool
		}
		var res []result
		bad := 0
		want := map[string]bool{}
		for _, a := range fs.Args() {
			k, err := daxmem.KeyFromDigest(a)
			if err != nil {
				return fmt.Errorf("%w: %v", ErrUsage, err)
			}
			want[k.String()] = true
		}
		for _, e := range r.Entries() {
			if e.State != daxmem.StateReady || (len(want) > 0 && !want[e.Key.String()]) {
				continue
			}
			rs := result{Kind: e.Kind.String(), Key: e.Key.String(), OK: true}
			if err := r.VerifyEntry(e); err != nil {
				rs.OK, rs.Error = false, err.Error()
				bad++
			}
			res = append(res, rs)
		}
		if err := emit(res, func() {
			tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
			fmt.Fprintln(tw, "KIND\tKEY\tRESULT")
			for _, rs := range res {
				s := "ok"
				if !rs.OK {
					s = rs.Error
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\n", rs.Kind, rs.Key, s)
			}
			tw.Flush()
		}); err != nil {
			return err
		}
		if bad > 0 {
			return fmt.Errorf("%d of %d images failed verification", bad, len(res))
		}
		return nil
	}
	return errors.New("unreachable")
}

func human(n int64) string {
	const u = "KMGTP"
	if n < 1024 {
		return fmt.Sprintf("%d B", n)
	}
	f, i := float64(n)/1024, 0
	for f >= 1024 && i < len(u)-1 {
		f /= 1024
		i++
	}
	return fmt.Sprintf("%.1f %ciB", f, u[i])
}

type participantJSON struct {
	ID          int       `json:"id"`
	State       string    `json:"state"`
	Incarnation uint32    `json:"incarnation"`
	Host        string    `json:"host"`
	PID         int       `json:"pid"`
	Heartbeat   time.Time `json:"heartbeat"`
	Alive       bool      `json:"alive"`
}

type statusOut struct {
	Path         string            `json:"path"`
	Backend      string            `json:"backend"`
	Durability   string            `json:"durability"`
	PhysAddr     *uint64           `json:"phys_addr,omitempty"`
	Size         int64             `json:"size"`
	DataOffset   int64             `json:"data_offset"`
	DataSize     int64             `json:"data_size"`
	Used         int64             `json:"used"`
	Free         int64             `json:"free"`
	LargestFree  int64             `json:"largest_free"`
	ViewArea     int64             `json:"view_area"`
	ViewFree     int64             `json:"view_free"`
	EntrySlots   int               `json:"entry_slots"`
	Ready        int               `json:"ready"`
	Aliases      int               `json:"aliases"`
	Writing      int               `json:"writing"`
	Dying        int               `json:"dying"`
	Created      time.Time         `json:"created"`
	Participants []participantJSON `json:"participants"`
}

func statusJSON(st daxmem.Stats) statusOut {
	s := statusOut{Path: st.Path, Backend: st.Backend, Durability: st.Durability, Size: st.Size, DataOffset: st.DataOffset,
		DataSize: st.DataSize, Used: st.Used, Free: st.Free, LargestFree: st.LargestFree, ViewArea: st.ViewArea, ViewFree: st.ViewFree,
		EntrySlots: st.EntrySlots, Ready: st.Ready, Aliases: st.Aliases, Writing: st.Writing, Dying: st.Dying, Created: st.Created, Participants: []participantJSON{}}
	if st.PhysKnown {
		p := st.PhysAddr
		s.PhysAddr = &p
	}
	for _, p := range st.Participants {
		s.Participants = append(s.Participants, participantJSON{int(p.ID), p.State, p.Incarnation, p.Host, p.PID, p.Heartbeat, p.Alive})
	}
	return s
}

func printStatus(out io.Writer, st daxmem.Stats) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	phys := "unknown (views mount with erofs or FUSE, not the daxfs module)"
	if st.PhysKnown {
		phys = fmt.Sprintf("%#x", st.PhysAddr)
	}
	fmt.Fprintf(tw, "path:\t%s\n", st.Path)
	fmt.Fprintf(tw, "backend:\t%s (%s)\n", st.Backend, st.Durability)
	fmt.Fprintf(tw, "physical address:\t%s\n", phys)
	fmt.Fprintf(tw, "size:\t%s (data area %s at offset %d)\n", human(st.Size), human(st.DataSize), st.DataOffset)
	fmt.Fprintf(tw, "used / free:\t%s / %s (largest free extent for a layer %s)\n", human(st.Used), human(st.Free), human(st.LargestFree))
	fmt.Fprintf(tw, "view area:\t%s, %s free\n", human(st.ViewArea), human(st.ViewFree))
	fmt.Fprintf(tw, "images:\t%d ready, %d being written, %d dying, %d aliases (%d index slots)\n", st.Ready, st.Writing, st.Dying, st.Aliases, st.EntrySlots)
	fmt.Fprintf(tw, "created:\t%s\n", st.Created.UTC().Format(time.RFC3339))
	tw.Flush()
	if len(st.Participants) == 0 {
		fmt.Fprintln(out, "participants: none")
		return
	}
	fmt.Fprintln(out, "participants:")
	tw = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "  ID\tSTATE\tINC\tHOST\tPID\tHEARTBEAT\tALIVE")
	for _, p := range st.Participants {
		fmt.Fprintf(tw, "  %d\t%s\t%d\t%s\t%d\t%s ago\t%v\n", p.ID, p.State, p.Incarnation, p.Host, p.PID,
			time.Since(p.Heartbeat).Round(time.Millisecond), p.Alive)
	}
	tw.Flush()
}

type entryJSON struct {
	Slot      int       `json:"slot"`
	State     string    `json:"state"`
	Kind      string    `json:"kind"`
	Key       string    `json:"key"`
	Offset    int64     `json:"offset"`
	Length    int64     `json:"length"`
	Extent    int64     `json:"extent"`
	Checksum  string    `json:"checksum"`
	Writer    int       `json:"writer"`
	Refs      []int     `json:"refs"`
	Target    string    `json:"target,omitempty"`
	Created   time.Time `json:"created"`
	Published time.Time `json:"published,omitzero"`
}

func entriesJSON(es []daxmem.Entry) []entryJSON {
	out := []entryJSON{}
	for _, e := range es {
		j := entryJSON{Slot: e.Slot, State: e.State.String(), Kind: e.Kind.String(), Key: e.Key.String(), Offset: e.Offset,
			Length: e.Length, Extent: e.Extent, Checksum: fmt.Sprintf("%08x", e.Checksum), Writer: int(e.Writer),
			Refs: []int{}, Created: e.Created, Published: e.Published}
		for _, p := range e.RefList() {
			j.Refs = append(j.Refs, int(p))
		}
		if e.Kind == daxmem.KindAlias {
			j.Target = e.Target.String()
		}
		out = append(out, j)
	}
	return out
}

func printEntries(out io.Writer, es []daxmem.Entry) {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STATE\tKIND\tKEY\tOFFSET\tLENGTH\tWRITER\tREFS\tPUBLISHED")
	for _, e := range es {
		refs := make([]string, 0, 4)
		for _, p := range e.RefList() {
			refs = append(refs, strconv.Itoa(int(p)))
		}
		pub := "-"
		if !e.Published.IsZero() {
			pub = e.Published.UTC().Format(time.RFC3339)
		}
		if e.Kind == daxmem.KindAlias {
			// An alias has no bytes: its "offset" column names its layer.
			fmt.Fprintf(tw, "%s\t%s\t%s\t-> %s\t-\t%d\t-\t%s\n", e.State, e.Kind, e.Key.Short(), e.Target.Short(), e.Writer, pub)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n", e.State, e.Kind, e.Key.Short(), e.Offset, human(e.Length), e.Writer,
			strings.Join(refs, ","), pub)
	}
	tw.Flush()
}
