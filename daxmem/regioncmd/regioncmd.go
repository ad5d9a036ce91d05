// Package regioncmd is the operator command `containerd-daxfs-grpc region
// init|status|ls|gc|verify`: it operates the shared region without the
// daemon. Only gc joins the region (as a short-lived participant that
// leaves when done); the others just read it. Every sub-command prints a
// table, or JSON with --json (snake_case keys; a list is [] when empty).
package regioncmd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v3"

	"github.com/containerd-daxfs/containerd-daxfs/daxmem"
)

// ErrUsage marks a usage error (the caller prints usage and exits 2).
var ErrUsage = errors.New("usage")

// Main runs `region ARGS...`, writing tables (or JSON with --json) to out.
func Main(ctx context.Context, args []string, out io.Writer) error {
	c := Command()
	c.Writer, c.ErrWriter = out, io.Discard
	return c.Run(ctx, append([]string{"region"}, args...))
}

// Command is the `region` command with its sub-commands. It writes to its
// root command's Writer.
func Command() *cli.Command {
	c := &cli.Command{
		Name:  "region",
		Usage: "operate the shared memory region without the daemon",
		Commands: []*cli.Command{
			{
				Name:   "init",
				Usage:  "create a region (fails if one exists at the path)",
				Flags:  append(commonFlags(), initFlags()...),
				Action: runInit,
			},
			{
				Name:   "status",
				Usage:  "show the region's header, space and participants",
				Flags:  commonFlags(),
				Action: runStatus,
			},
			{
				Name:   "ls",
				Usage:  "list the region's index entries",
				Flags:  commonFlags(),
				Action: runLs,
			},
			{
				Name:  "gc",
				Usage: "reclaim dead participants and free unreferenced images",
				Flags: append(commonFlags(),
					&cli.BoolFlag{Name: "dry-run", Usage: "report what would be freed"},
					&cli.DurationFlag{Name: "min-age", Usage: "keep unreferenced images published less than this long ago"},
					&cli.DurationFlag{Name: "lease", Usage: "heartbeat age after which a participant is dead (default 10s; must match the daemons)"},
				),
				Action: runGC,
			},
			{
				Name:      "verify",
				Usage:     "check the checksums of READY images (all, or those named)",
				ArgsUsage: "[DIGEST...]",
				Flags:     commonFlags(),
				Action:    runVerify,
			},
		},
		// Without a sub-command, or with an unknown one.
		Action: func(ctx context.Context, cmd *cli.Command) error {
			if cmd.Args().Present() {
				return fmt.Errorf("%w: unknown region sub-command %q (want init, status, ls, gc or verify)", ErrUsage, cmd.Args().First())
			}
			return fmt.Errorf("%w: region needs a sub-command: init, status, ls, gc or verify", ErrUsage)
		},
	}
	c.OnUsageError = usageError
	for _, sub := range c.Commands {
		sub.OnUsageError = usageError
	}
	return c
}

// usageError marks flag errors as usage errors.
func usageError(_ context.Context, cmd *cli.Command, err error, _ bool) error {
	return fmt.Errorf("%w: %v", ErrUsage, err)
}

// commonFlags are every sub-command's.
func commonFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "path", Usage: "region file or device (default " + daxmem.DefaultPath + ")"},
		&cli.StringFlag{Name: "backend", Value: daxmem.BackendFile, Usage: "file, hugetlbfs, devdax or fsdax"},
		&cli.BoolFlag{Name: "json", Usage: "print JSON"},
	}
}

// initFlags are init's own: the geometry of the new region.
func initFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "size", Usage: "region size: bytes with an optional binary unit K, M, G, T or P (default 8G)"},
		&cli.IntFlag{Name: "entries", Value: daxmem.DefaultEntries, Usage: "index slots"},
		&cli.IntFlag{Name: "participants", Value: daxmem.DefaultParticipants, Usage: "participant slots (at most 64)"},
		&cli.StringFlag{Name: "view-area", Usage: "bytes at the bottom of the data area kept for views, about 370 per file of the images in use at once (default an eighth)"},
		&cli.StringFlag{Name: "align", Usage: "alignment to record, e.g. 2M for a file that device DAX will map too (default: the backend's)"},
	}
}

// options reads the flags every sub-command has, and with geometry init's.
func options(cmd *cli.Command, geometry bool) (daxmem.Options, error) {
	o := daxmem.Options{Path: cmd.String("path"), Backend: cmd.String("backend")}
	if !geometry {
		return o, nil
	}
	for _, f := range []struct {
		name string
		dst  *int64
	}{{"size", &o.Size}, {"view-area", &o.ViewArea}, {"align", &o.Align}} {
		if v := cmd.String(f.name); v != "" {
			n, err := daxmem.ParseSize(v)
			if err != nil {
				return o, fmt.Errorf("%w: --%s: %v", ErrUsage, f.name, err)
			}
			*f.dst = n
		}
	}
	o.Entries, o.Participants = cmd.Int("entries"), cmd.Int("participants")
	return o, nil
}

// emit writes v as JSON with --json, else runs table.
func emit(cmd *cli.Command, v any, table func(out io.Writer)) error {
	out := cmd.Root().Writer
	if cmd.Bool("json") {
		enc := json.NewEncoder(out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	table(out)
	return nil
}

// open opens an existing region read-only in spirit: nothing is created.
func open(ctx context.Context, o daxmem.Options) (*daxmem.Region, error) {
	o.NoCreate = true
	return daxmem.Open(ctx, o)
}

func noArgs(cmd *cli.Command) error {
	if cmd.Args().Present() {
		return fmt.Errorf("%w: %s takes no arguments, got %q", ErrUsage, cmd.FullName(), cmd.Args().Slice())
	}
	return nil
}

func runInit(ctx context.Context, cmd *cli.Command) error {
	if err := noArgs(cmd); err != nil {
		return err
	}
	o, err := options(cmd, true)
	if err != nil {
		return err
	}
	r, err := daxmem.Create(ctx, o)
	if err != nil {
		return err
	}
	defer r.Close()
	st := r.Stats()
	return emit(cmd, statusJSON(st), func(out io.Writer) { printStatus(out, st) })
}

// reading runs a command that takes no arguments and only reads the
// region: f gets the region opened without joining it.
func reading(f func(cmd *cli.Command, r *daxmem.Region) error) cli.ActionFunc {
	return func(ctx context.Context, cmd *cli.Command) error {
		if err := noArgs(cmd); err != nil {
			return err
		}
		o, _ := options(cmd, false)
		r, err := open(ctx, o)
		if err != nil {
			return err
		}
		defer r.Close()
		return f(cmd, r)
	}
}

var runStatus = reading(func(cmd *cli.Command, r *daxmem.Region) error {
	st := r.Stats()
	return emit(cmd, statusJSON(st), func(out io.Writer) { printStatus(out, st) })
})

var runLs = reading(func(cmd *cli.Command, r *daxmem.Region) error {
	es := r.Entries()
	return emit(cmd, entriesJSON(es), func(out io.Writer) { printEntries(out, es) })
})

// gcJSON is gc's --json output.
type gcJSON struct {
	DryRun           bool  `json:"dry_run"`
	DeadParticipants []int `json:"dead_participants"`
	BitsCleared      int   `json:"bits_cleared"`
	ClaimsReclaimed  int   `json:"claims_reclaimed"`
	ImagesFreed      int   `json:"images_freed"`
	BytesFreed       int64 `json:"bytes_freed"`
	AliasesFreed     int   `json:"aliases_freed"`
	Kept             int   `json:"kept"`
}

func runGC(ctx context.Context, cmd *cli.Command) error {
	if err := noArgs(cmd); err != nil {
		return err
	}
	o, _ := options(cmd, false)
	if lease := cmd.Duration("lease"); lease > 0 {
		o.LeaseTimeout = lease
		o.HeartbeatInterval = lease / 4
	}
	r, err := open(ctx, o)
	if err != nil {
		return err
	}
	defer r.Close()
	if _, err := r.Join(ctx, daxmem.ParticipantInfo{}, ""); err != nil {
		return err
	}
	defer r.Leave(ctx)
	dryRun := cmd.Bool("dry-run")
	gs, err := r.GC(ctx, daxmem.GCOptions{MinAge: cmd.Duration("min-age"), DryRun: dryRun})
	if err != nil {
		return err
	}
	j := gcJSON{DryRun: dryRun, DeadParticipants: []int{}, BitsCleared: gs.BitsCleared, ClaimsReclaimed: gs.ClaimsReclaimed,
		ImagesFreed: gs.EntriesFreed, BytesFreed: gs.BytesFreed, AliasesFreed: gs.AliasesFreed, Kept: gs.Kept}
	for _, p := range gs.DeadParticipants {
		j.DeadParticipants = append(j.DeadParticipants, int(p))
	}
	return emit(cmd, j, func(out io.Writer) {
		verb := "freed"
		if dryRun {
			verb = "would free"
		}
		fmt.Fprintf(out, "dead participants reclaimed: %v\nreference bits cleared: %d\nclaims reclaimed: %d\nimages %s: %d (%s)\naliases %s: %d\nkept by policy: %d\n",
			j.DeadParticipants, gs.BitsCleared, gs.ClaimsReclaimed, verb, gs.EntriesFreed, human(gs.BytesFreed), verb, gs.AliasesFreed, gs.Kept)
	})
}

// verifyJSON is one image's line of verify's --json output.
type verifyJSON struct {
	Kind  string `json:"kind"`
	Key   string `json:"key"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

func runVerify(ctx context.Context, cmd *cli.Command) error {
	want := map[string]bool{}
	for _, a := range cmd.Args().Slice() {
		k, err := daxmem.KeyFromDigest(a)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrUsage, err)
		}
		want[k.String()] = true
	}
	o, _ := options(cmd, false)
	r, err := open(ctx, o)
	if err != nil {
		return err
	}
	defer r.Close()
	res := []verifyJSON{}
	bad := 0
	for _, e := range r.Entries() {
		if e.State != daxmem.StateReady || (len(want) > 0 && !want[e.Key.String()]) {
			continue
		}
		rs := verifyJSON{Kind: e.Kind.String(), Key: e.Key.String(), OK: true}
		if err := r.VerifyEntry(e); err != nil {
			rs.OK, rs.Error = false, err.Error()
			bad++
		}
		res = append(res, rs)
	}
	if err := emit(cmd, res, func(out io.Writer) {
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
	Align        int64             `json:"align"`
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
	s := statusOut{Path: st.Path, Backend: st.Backend, Durability: st.Durability, Size: st.Size, Align: st.Align, DataOffset: st.DataOffset,
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
	fmt.Fprintf(tw, "alignment:\t%s\n", human(st.Align))
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
