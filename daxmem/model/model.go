// Package model is an exhaustive state-space exploration of the daxmem
// claim/publish/reference/GC protocol (package daxmem, see its doc.go).
//
// The model keeps the shared words the implementation keeps (index entries
// with a generation, the lock word with owner and incarnation, the
// participant table) and splits every operation at the same atomic steps
// the code uses: each step is one load, store or CAS of a shared word, or
// a scan the code does while holding the lock (where nobody else can make
// the scanned state worse). Participants run small scripts; any of them may
// crash at any step and restart (re-join with a new incarnation). The
// explorer visits every interleaving and checks:
//
//   - no double allocation: live extents never overlap;
//   - one writer per key: never two WRITING/READY entries for a key;
//   - no free of a referenced image: an image a live participant holds a
//     reference to (Ref or Publish returned) stays READY (or transiently
//     DYING, from which GC restores it);
//   - progress: from every reachable state the surviving participants can
//     finish their scripts (no deadlock, no wedged lock after a crash).
//
// Liveness detection is abstracted as perfect (a crashed participant is
// seen dead at once, a live one is never seen dead): heartbeat leases are
// what make that true in practice, and a stalled process that outlives its
// lease is outside the model (see daxmem's package comment).
package model

import "fmt"

// Sizes of the model.
const (
	maxP = 3
	maxE = 3
	maxK = 2
)

const (
	free    = 0
	writing = 1
	ready   = 2
	dying   = 3
)

type entry struct {
	st, key, off, ln, refs, writer, winc, gen uint8
}

// program counters
const (
	pcNext = iota // pick the next script step
	pcLookup
	pcLock // acquire the lock, then go to ret
	pcClaimFind
	pcClaimPlace
	pcClaimCAS
	pcClaimCheck
	pcClaimUnlock
	pcWrite
	pcPubSetBit
	pcPubCAS
	pcAbort
	pcWait
	pcRefFind
	pcRefSetBit
	pcRefCheck
	pcRefResolve
	pcGCParticipants
	pcGCEntry
	pcGCRecheck
	pcGCUnlock
	pcDone
)

// script steps
const (
	opAcquire = iota // claim-or-ref key
	opUnref
	opGC
)

type step struct{ op, key uint8 }

type part struct {
	pc, ip          uint8 // program counter, script position
	ret             uint8 // where pcLock continues
	crashed         bool
	inc             uint8 // incarnation of this process
	key             uint8
	slot, gen, off  uint8
	ln              uint8
	prevBit         bool
	holds           uint8 // keys we hold a reference to (bitmask)
	aborted         uint8 // aborts done (bounded)
	gcEntry         uint8
	haveLock        bool
	claimsPublished uint8
}

type tableSlot struct {
	alive bool // ALIVE (else FREE: reclaimed)
	inc   uint8
}

// State is one global state.
type State struct {
	e         [maxE]entry
	lockOwner int8 // -1: free
	lockInc   uint8
	p         [maxP]part
	t         [maxP]tableSlot
	crashes   uint8
	restarts  uint8
}

// Bug injects a protocol mistake, to show the checker catches it.
type Bug int

const (
	NoBug Bug = iota
	// BugGCNoRecheck: GC frees an unreferenced READY entry without the
	// READY -> DYING step and the second look at the bitmap.
	BugGCNoRecheck
	// BugClaimNoFind: Claim allocates without checking for the key under
	// the lock (relying on the lock-free lookup alone).
	BugClaimNoFind
	// BugNoSteal: a dead holder's lock is never taken over.
	BugNoSteal
)

// Config sets the size of the model.
type Config struct {
	Participants int
	Entries      int     // index slots
	Units        int     // data area in allocation units
	ClaimUnits   [2]int  // claim size per key (publish may shrink to 1)
	Scripts      [][]int // per participant: sequence of ops encoded op*10+key
	MaxCrashes   int
	MaxRestarts  int
	MaxAborts    int
	Bug          Bug
	MaxStates    int
}

// Result of an exploration.
type Result struct {
	States      int
	Transitions int
	Violation   string // first invariant violated ("" if none)
	Trace       []string
}

type explorer struct {
	cfg     Config
	scripts [maxP][]step
}

// Explore visits every reachable state breadth first.
func Explore(cfg Config) Result {
	x := &explorer{cfg: cfg}
	for i, s := range cfg.Scripts {
		for _, c := range s {
			x.scripts[i] = append(x.scripts[i], step{uint8(c / 10), uint8(c % 10)})
		}
	}
	var init State
	init.lockOwner = -1
	for i := 0; i < cfg.Participants; i++ {
		init.t[i] = tableSlot{alive: true, inc: 1}
		init.p[i].inc = 1
	}
	type node struct {
		parent int
		label  string
	}
	index := map[State]int{init: 0}
	states := []State{init}
	nodes := []node{{-1, "init"}}
	var succ [][]int
	res := Result{}
	trace := func(i int) []string {
		var tr []string
		for ; i >= 0; i = nodes[i].parent {
			tr = append([]string{nodes[i].label}, tr...)
		}
		return tr
	}
	for i := 0; i < len(states); i++ {
		s := states[i]
		if v := x.check(&s); v != "" {
			res.Violation, res.Trace = v, trace(i)
			break
		}
		var out []int
		for _, t := range x.successors(s) {
			res.Transitions++
			j, ok := index[t.s]
			if !ok {
				j = len(states)
				index[t.s] = j
				states = append(states, t.s)
				nodes = append(nodes, node{i, t.label})
			}
			out = append(out, j)
		}
		succ = append(succ, out)
		if cfg.MaxStates > 0 && len(states) > cfg.MaxStates {
			res.Violation = fmt.Sprintf("state space larger than %d", cfg.MaxStates)
			break
		}
	}
	res.States = len(states)
	if res.Violation != "" {
		return res
	}
	// Progress: every state must reach one where all live participants
	// are done. Backward reachability from the good states.
	pred := make([][]int, len(states))
	for i, out := range succ {
		for _, j := range out {
			pred[j] = append(pred[j], i)
		}
	}
	good := make([]bool, len(states))
	var queue []int
	for i := range states {
		if x.allDone(&states[i]) {
			good[i] = true
			queue = append(queue, i)
		}
	}
	for len(queue) > 0 {
		j := queue[0]
		queue = queue[1:]
		for _, i := range pred[j] {
			if !good[i] {
				good[i] = true
				queue = append(queue, i)
			}
		}
	}
	for i := range states {
		if !good[i] {
			res.Violation = "no progress: the live participants cannot finish from this state"
			res.Trace = trace(i)
			return res
		}
	}
	return res
}

func (x *explorer) allDone(s *State) bool {
	for i := 0; i < x.cfg.Participants; i++ {
		if !s.p[i].crashed && s.p[i].pc != pcDone {
			return false
		}
	}
	return true
}

// writerAlive: the participant that claimed an entry is alive in the
// incarnation that claimed it.
func (x *explorer) liveAs(s *State, q int, inc uint8) bool {
	return q >= 0 && q < x.cfg.Participants && !s.p[q].crashed && s.t[q].alive && s.t[q].inc == inc && s.p[q].inc == inc
}

func (x *explorer) check(s *State) string {
	for i := 0; i < x.cfg.Entries; i++ {
		a := s.e[i]
		if a.st == free {
			continue
		}
		if int(a.off)+int(a.ln) > x.cfg.Units {
			return fmt.Sprintf("entry %d extends past the data area", i)
		}
		for j := i + 1; j < x.cfg.Entries; j++ {
			b := s.e[j]
			if b.st == free {
				continue
			}
			if a.off < b.off+b.ln && b.off < a.off+a.ln {
				return fmt.Sprintf("double allocation: entries %d and %d overlap", i, j)
			}
			if a.key == b.key && a.st != dying && b.st != dying {
				return fmt.Sprintf("key %d has two entries (%d, %d): converted twice", a.key, i, j)
			}
		}
	}
	for p := 0; p < x.cfg.Participants; p++ {
		if s.p[p].crashed {
			continue
		}
		for k := range maxK {
			if s.p[p].holds&(1<<k) == 0 {
				continue
			}
			found := false
			for i := 0; i < x.cfg.Entries; i++ {
				e := s.e[i]
				if int(e.key) == k && (e.st == ready || e.st == dying) && e.refs&(1<<p) != 0 {
					found = true
				}
			}
			if !found {
				return fmt.Sprintf("participant %d holds a reference to key %d but its image was freed", p, k)
			}
		}
	}
	return ""
}

type trans struct {
	s     State
	label string
}

func (x *explorer) successors(s State) []trans {
	var out []trans
	for p := 0; p < x.cfg.Participants; p++ {
		pp := s.p[p]
		if pp.crashed {
			if int(s.restarts) < x.cfg.MaxRestarts {
				out = append(out, trans{x.restart(s, p), fmt.Sprintf("P%d restarts", p)})
			}
			continue
		}
		if pp.pc == pcDone {
			continue
		}
		if int(s.crashes) < x.cfg.MaxCrashes {
			t := s
			t.p[p].crashed = true
			t.crashes++
			out = append(out, trans{t, fmt.Sprintf("P%d crashes at pc %d", p, pp.pc)})
		}
		for _, t := range x.stepP(s, p) {
			out = append(out, trans{t, fmt.Sprintf("P%d pc %d", p, pp.pc)})
		}
	}
	return out
}

// restart re-joins a crashed participant: it re-claims its slot (keeping
// its reference bits) when GC has not reclaimed it, else takes it fresh.
// The new process starts its script over and holds nothing yet.
func (x *explorer) restart(s State, p int) State {
	s.restarts++
	inc := s.t[p].inc + 1
	s.t[p] = tableSlot{alive: true, inc: inc}
	s.p[p] = part{inc: inc}
	return s
}

func (x *explorer) findKey(s *State, k uint8) int {
	for i := 0; i < x.cfg.Entries; i++ {
		if s.e[i].st != free && s.e[i].key == k {
			return i
		}
	}
	return -1
}

// lockStep tries to take the lock: free, or held by a dead incarnation.
func (x *explorer) lockStep(s *State, p int) bool {
	if s.lockOwner < 0 || (x.cfg.Bug != BugNoSteal && !x.liveAs(s, int(s.lockOwner), s.lockInc)) {
		s.lockOwner, s.lockInc = int8(p), s.p[p].inc
		s.p[p].haveLock = true
		return true
	}
	return false
}

func (x *explorer) unlock(s *State, p int) {
	if s.lockOwner == int8(p) && s.lockInc == s.p[p].inc {
		s.lockOwner, s.lockInc = -1, 0
	}
	s.p[p].haveLock = false
}

func (x *explorer) freeEntry(s *State, i int) {
	s.e[i] = entry{gen: s.e[i].gen + 1}
}

// stepP returns the states after participant p's next step (several when
// the step is a nondeterministic choice; none when blocked).
func (x *explorer) stepP(s State, p int) []State {
	me := &s.p[p]
	one := func() []State { return []State{s} }
	switch me.pc {
	case pcNext:
		if int(me.ip) >= len(x.scripts[p]) {
			me.pc = pcDone
			return one()
		}
		st := x.scripts[p][me.ip]
		me.ip++
		me.key = st.key
		switch st.op {
		case opAcquire:
			me.pc = pcLookup
		case opUnref:
			if i := x.findKey(&s, st.key); i >= 0 {
				s.e[i].refs &^= 1 << p
			}
			me.holds &^= 1 << st.key
			me.pc = pcNext
		case opGC:
			me.pc, me.ret = pcLock, pcGCParticipants
		}
		return one()
	case pcLookup: // lock-free Lookup
		if i := x.findKey(&s, me.key); i >= 0 && s.e[i].st == ready {
			me.pc = pcRefFind
		} else {
			me.pc, me.ret = pcLock, pcClaimFind
		}
		return one()
	case pcLock:
		if !x.lockStep(&s, p) {
			return nil // blocked
		}
		me.pc = me.ret
		return one()
	case pcClaimFind:
		i := x.findKey(&s, me.key)
		if x.cfg.Bug == BugClaimNoFind {
			i = -1
		}
		if i < 0 {
			me.pc = pcClaimPlace
			return one()
		}
		e := s.e[i]
		switch e.st {
		case ready:
			x.unlock(&s, p)
			me.pc = pcRefFind
		case writing:
			if x.liveAs(&s, int(e.writer), e.winc) {
				x.unlock(&s, p)
				me.pc = pcWait
			} else {
				x.freeEntry(&s, i) // dead writer's claim
			}
		case dying: // orphaned by a dead GC: we hold the lock
			if e.refs != 0 {
				s.e[i].st, s.e[i].gen = ready, e.gen+1
			} else {
				x.freeEntry(&s, i)
			}
		}
		return one()
	case pcClaimPlace:
		// Scan occupied extents (under the lock) and pick the lowest fit
		// and the first FREE slot from the key's home.
		need := uint8(x.cfg.ClaimUnits[me.key])
		off := -1
		for o := 0; o+int(need) <= x.cfg.Units && off < 0; o++ {
			clash := false
			for i := 0; i < x.cfg.Entries; i++ {
				e := s.e[i]
				if e.st != free && uint8(o) < e.off+e.ln && e.off < uint8(o)+need {
					clash = true
				}
			}
			if !clash {
				off = o
			}
		}
		slot := -1
		for d := 0; d < x.cfg.Entries && slot < 0; d++ {
			i := (int(me.key) + d) % x.cfg.Entries
			if s.e[i].st == free {
				slot = i
			}
		}
		if off < 0 || slot < 0 {
			x.unlock(&s, p) // region full: the operation fails cleanly
			me.pc = pcNext
			return one()
		}
		me.slot, me.off, me.ln, me.gen = uint8(slot), uint8(off), need, s.e[slot].gen
		me.pc = pcClaimCAS
		return one()
	case pcClaimCAS:
		e := &s.e[me.slot]
		if e.st != free || e.gen != me.gen {
			me.pc = pcClaimPlace
			return one()
		}
		*e = entry{st: writing, key: me.key, off: me.off, ln: me.ln, writer: uint8(p), winc: me.inc, gen: me.gen + 1}
		me.gen++
		me.pc = pcClaimCheck
		return one()
	case pcClaimCheck: // rescan for a conflicting key or extent
		for i := 0; i < x.cfg.Entries; i++ {
			e := s.e[i]
			if i == int(me.slot) || e.st == free {
				continue
			}
			if e.key == me.key || (e.off < me.off+me.ln && me.off < e.off+e.ln) {
				x.freeEntry(&s, int(me.slot))
				x.unlock(&s, p)
				me.pc = pcLookup
				return one()
			}
		}
		me.pc = pcClaimUnlock
		return one()
	case pcClaimUnlock:
		x.unlock(&s, p)
		me.pc = pcWrite
		return one()
	case pcWrite: // write the image, then publish (maybe shrinking) or abort
		var outs []State
		for ln := uint8(1); ln <= me.ln; ln++ {
			t := s
			t.p[p].ln = ln
			t.p[p].pc = pcPubSetBit
			outs = append(outs, t)
		}
		if int(me.aborted) < x.cfg.MaxAborts {
			t := s
			t.p[p].pc = pcAbort
			t.p[p].aborted++
			outs = append(outs, t)
		}
		return outs
	case pcPubSetBit: // shrink the extent, set our bit
		e := &s.e[me.slot]
		if e.st == writing && e.gen == me.gen {
			e.ln = me.ln
			e.refs |= 1 << p
		}
		me.pc = pcPubCAS
		return one()
	case pcPubCAS:
		e := &s.e[me.slot]
		if e.st == writing && e.gen == me.gen {
			e.st, e.gen = ready, e.gen+1
			me.holds |= 1 << me.key
			me.claimsPublished++
		}
		me.pc = pcNext
		return one()
	case pcAbort:
		if e := s.e[me.slot]; e.st == writing && e.gen == me.gen {
			x.freeEntry(&s, int(me.slot))
		}
		me.pc = pcLookup // try again
		return one()
	case pcWait:
		i := x.findKey(&s, me.key)
		if i < 0 {
			me.pc = pcLookup
			return one()
		}
		e := s.e[i]
		switch {
		case e.st == ready:
			me.pc = pcRefFind
		case e.st == writing && x.liveAs(&s, int(e.writer), e.winc):
			return nil // blocked until it publishes, aborts or dies
		default:
			me.pc = pcLookup
		}
		return one()
	case pcRefFind:
		i := x.findKey(&s, me.key)
		if i < 0 || s.e[i].st == writing {
			me.pc = pcLookup
			return one()
		}
		if s.e[i].st == dying {
			me.slot, me.gen = uint8(i), s.e[i].gen
			me.pc, me.ret = pcLock, pcRefResolve
			return one()
		}
		me.slot, me.gen = uint8(i), s.e[i].gen
		me.pc = pcRefSetBit
		return one()
	case pcRefSetBit:
		e := &s.e[me.slot]
		me.prevBit = e.refs&(1<<p) != 0
		e.refs |= 1 << p
		me.pc = pcRefCheck
		return one()
	case pcRefCheck:
		e := s.e[me.slot]
		switch {
		case e.st == ready && e.gen == me.gen:
			me.holds |= 1 << me.key
			me.pc = pcNext
		case e.st == dying:
			// keep the bit; GC restores or frees; resolve it ourselves
			// under the lock if the GC died
			me.gen = e.gen
			me.pc, me.ret = pcLock, pcRefResolve
		case e.st == ready && e.key == me.key && e.refs&(1<<p) != 0:
			me.holds |= 1 << me.key // restored by GC with our bit
			me.pc = pcNext
		default:
			if !me.prevBit {
				s.e[me.slot].refs &^= 1 << p
			}
			me.pc = pcLookup
		}
		return one()
	case pcRefResolve: // holding the lock: a DYING entry is orphaned
		e := &s.e[me.slot]
		if e.st == dying && e.gen == me.gen {
			if e.refs != 0 {
				e.st, e.gen = ready, e.gen+1
			} else {
				x.freeEntry(&s, int(me.slot))
			}
		}
		x.unlock(&s, p)
		me.pc = pcRefFind
		return one()
	case pcGCParticipants:
		// Reclaim every dead participant: clear its bits, free its
		// claims, free its slot (the code does this per participant in
		// RECLAIMING state under the lock; nobody else touches those
		// bits meanwhile, so one step is faithful).
		for q := 0; q < x.cfg.Participants; q++ {
			if q == p || !s.t[q].alive || x.liveAs(&s, q, s.t[q].inc) {
				continue
			}
			for i := 0; i < x.cfg.Entries; i++ {
				s.e[i].refs &^= 1 << q
				if s.e[i].st == writing && int(s.e[i].writer) == q {
					x.freeEntry(&s, i)
				}
			}
			s.t[q].alive = false
		}
		me.gcEntry = 0
		me.pc = pcGCEntry
		return one()
	case pcGCEntry:
		if int(me.gcEntry) >= x.cfg.Entries {
			me.pc = pcGCUnlock
			return one()
		}
		i := int(me.gcEntry)
		e := s.e[i]
		switch {
		case e.st == writing && !x.liveAs(&s, int(e.writer), e.winc):
			x.freeEntry(&s, i)
			me.gcEntry++
		case e.st == dying:
			if e.refs != 0 {
				s.e[i].st, s.e[i].gen = ready, e.gen+1
			} else {
				x.freeEntry(&s, i)
			}
			me.gcEntry++
		case e.st == ready && e.refs == 0:
			if x.cfg.Bug == BugGCNoRecheck {
				// read refs == 0 ... and free later, without DYING
				me.gen = e.gen
				me.pc = pcGCRecheck
				return one()
			}
			s.e[i].st, s.e[i].gen = dying, e.gen+1
			me.gen = e.gen + 1
			me.pc = pcGCRecheck
		default:
			me.gcEntry++
		}
		return one()
	case pcGCRecheck:
		i := int(me.gcEntry)
		e := &s.e[i]
		if x.cfg.Bug == BugGCNoRecheck {
			if e.st == ready && e.gen == me.gen {
				x.freeEntry(&s, i)
			}
		} else if e.st == dying && e.gen == me.gen {
			if e.refs != 0 {
				e.st, e.gen = ready, e.gen+1
			} else {
				x.freeEntry(&s, i)
			}
		}
		me.gcEntry++
		me.pc = pcGCEntry
		return one()
	case pcGCUnlock:
		x.unlock(&s, p)
		me.pc = pcNext
		return one()
	}
	panic(fmt.Sprintf("bad pc %d", me.pc))
}
