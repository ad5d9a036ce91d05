package daxmem

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Participant slot states.
const (
	pFree       = 0
	pJoining    = 1
	pAlive      = 2
	pReclaiming = 3
)

func pWord(state uint8, inc uint32) uint64 { return uint64(state) | uint64(inc)<<8 }
func pStateOf(w uint64) uint8              { return uint8(w) }
func pIncOf(w uint64) uint32               { return uint32(w >> 8) }

// ParticipantInfo identifies a joining process. Zero fields are filled in
// from this process (host name, boot ID, PID).
type ParticipantInfo struct {
	Host   string
	BootID string
	PID    int
}

// Participant is a snapshot of one participant slot.
type Participant struct {
	ID          ParticipantID
	State       string // free, joining, alive, reclaiming
	Incarnation uint32
	Host        string
	BootID      string
	PID         int
	Started     time.Time
	Heartbeat   time.Time
	Alive       bool
	Self        bool
}

func (r *Region) pOff(p int) int64 { return r.g.partOff + int64(p)*participantSize }

// alive says whether participant p (in the given incarnation, or any when
// inc is nil) is alive: its slot is joining or alive, its heartbeat is
// younger than the lease and, when it shares our kernel and PID namespace,
// its process exists. Dead is final for that incarnation.
func (r *Region) alive(p int, inc *uint32, now time.Time) bool {
	if p < 0 || p >= r.g.participants {
		return false
	}
	off := r.pOff(p)
	w := load(r.mem, off+pState)
	if st := pStateOf(w); st != pAlive && st != pJoining {
		return false
	}
	if inc != nil && pIncOf(w) != *inc {
		return false
	}
	r.mu.Lock()
	self := ParticipantID(p) == r.id && pIncOf(w) == r.inc
	r.mu.Unlock()
	if self && !r.evicted.Load() {
		return true
	}
	hb := int64(load(r.mem, off+pHeartbeat))
	if now.UnixNano()-hb > int64(r.opts.LeaseTimeout) {
		return false
	}
	// A heartbeat stamped by a clock far ahead of ours (or garbage) would
	// look fresh forever: also count it dead when we have seen it stand
	// still for a whole lease.
	if r.staleByObservation(p, uint64(hb), now) {
		return false
	}
	pid := int(load(r.mem, off+pPID))
	if pid > 0 && pid != r.self.pid && load(r.mem, off+pPIDNS) == r.self.pidNS {
		var boot [16]byte
		loadBytes(r.mem, off+pBootID, boot[:])
		if boot == r.self.bootID && unix.Kill(pid, 0) == unix.ESRCH {
			return false
		}
	}
	return true
}

// participantFile is what Join keeps in its stable participant file.
type participantFile struct {
	region [16]byte
	slot   int
	token  [16]byte
}

func readParticipantFile(path string) (participantFile, error) {
	var pf participantFile
	b, err := os.ReadFile(path)
	if err != nil {
		return pf, err
	}
	f := strings.Fields(string(b))
	if len(f) != 3 {
		return pf, fmt.Errorf("participant file %s: want \"REGION-UUID SLOT TOKEN\"", path)
	}
	u, err1 := hex.DecodeString(f[0])
	slot, err2 := strconv.Atoi(f[1])
	tok, err3 := hex.DecodeString(f[2])
	if err := errors.Join(err1, err2, err3); err != nil || len(u) != 16 || len(tok) != 16 {
		return pf, fmt.Errorf("participant file %s: malformed (%v)", path, err)
	}
	copy(pf.region[:], u)
	copy(pf.token[:], tok)
	pf.slot = slot
	return pf, nil
}

func writeParticipantFile(path string, pf participantFile) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	s := fmt.Sprintf("%s %d %s\n", hex.EncodeToString(pf.region[:]), pf.slot, hex.EncodeToString(pf.token[:]))
	if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Join makes this process a participant: it re-claims the slot named in
// idFile (when the file exists, names this region and the slot still
// carries its token and no live process holds it), else takes a free slot
// (or a dead participant's), and writes idFile. Re-claiming bumps the
// incarnation: the previous process's WRITING claims count as dead, its
// reference bits are kept. A heartbeat goroutine runs until Close or Leave.
// idFile may be empty (no stable identity: e.g. operator commands).
func (r *Region) Join(ctx context.Context, info ParticipantInfo, idFile string) (ParticipantID, error) {
	r.mu.Lock()
	if r.id != NoParticipant {
		id := r.id
		r.mu.Unlock()
		return id, nil
	}
	r.mu.Unlock()
	if r.closed.Load() {
		return NoParticipant, ErrClosed
	}
	if info.Host == "" {
		info.Host, _ = os.Hostname()
	}
	boot := r.self.bootID
	if info.BootID != "" {
		boot = parseBootID(info.BootID)
	}
	if info.PID == 0 {
		info.PID = r.self.pid
	}
	var pf participantFile
	havePF := false
	if idFile != "" {
		got, err := readParticipantFile(idFile)
		switch {
		case err == nil && got.region == r.g.uuid && got.slot >= 0 && got.slot < r.g.participants:
			pf, havePF = got, true
		case err == nil:
			log.G(ctx).WithField("file", idFile).Info("participant file names another region or slot; joining afresh")
		case !errors.Is(err, os.ErrNotExist):
			return NoParticipant, fmt.Errorf("join region %s: %w", r.be.path, err)
		}
	}
	fill := func(p int, token [16]byte) {
		off := r.pOff(p)
		store(r.mem, off+pHeartbeat, uint64(time.Now().UnixNano()))
		store(r.mem, off+pPID, uint64(info.PID))
		store(r.mem, off+pStarted, uint64(time.Now().UnixNano()))
		storeBytes(r.mem, off+pBootID, boot[:], 16)
		store(r.mem, off+pPIDNS, r.self.pidNS)
		storeBytes(r.mem, off+pToken, token[:], 16)
		host := []byte(info.Host)
		if len(host) > hostMax {
			host = host[:hostMax]
		}
		storeBytes(r.mem, off+pHost, host, hostMax)
	}
	// take moves slot p from old to ours; keepRefs says whether its
	// reference bits are ours (re-claim) or a dead stranger's (clear them).
	// It fails when another participant changed the slot first.
	take := func(p int, old uint64, token [16]byte, keepRefs bool) bool {
		inc := pIncOf(old) + 1
		if inc == 0 {
			inc = 1
		}
		joining := pWord(pJoining, inc)
		// Stamp the heartbeat first so nobody mistakes our joining slot
		// for a dead one by its previous owner's heartbeat.
		store(r.mem, r.pOff(p)+pHeartbeat, uint64(time.Now().UnixNano()))
		if !cas(r.mem, r.pOff(p)+pState, old, joining) {
			return false
		}
		fill(p, token)
		if !keepRefs {
			r.clearBits(p, func() bool { return load(r.mem, r.pOff(p)+pState) == joining })
		}
		if !cas(r.mem, r.pOff(p)+pState, joining, pWord(pAlive, inc)) {
			return false // reclaimed while joining: try again
		}
		r.mu.Lock()
		r.id, r.inc = ParticipantID(p), inc
		r.mu.Unlock()
		r.evicted.Store(false)
		return true
	}
	for attempt := 0; ; attempt++ {
		if err := ctx.Err(); err != nil {
			return NoParticipant, err
		}
		now := time.Now()
		if havePF {
			p := pf.slot
			off := r.pOff(p)
			w := load(r.mem, off+pState)
			var tok [16]byte
			loadBytes(r.mem, off+pToken, tok[:])
			st := pStateOf(w)
			if (st == pAlive || st == pJoining) && tok == pf.token {
				if r.aliveOther(p, now) {
					return NoParticipant, fmt.Errorf("join region %s as participant %d: %w (pid %d, heartbeat %v ago)",
						r.be.path, p, ErrInUse, load(r.mem, off+pPID), now.Sub(time.Unix(0, int64(load(r.mem, off+pHeartbeat)))).Round(time.Millisecond))
				}
				if take(p, w, pf.token, true) {
					log.G(ctx).WithField("participant", p).Info("re-joined region after restart")
					return r.joined(ctx), nil
				}
				continue
			}
			if st == pFree {
				if take(p, w, pf.token, false) {
					return r.joined(ctx), nil
				}
				continue
			}
			havePF = false // reclaimed or taken by someone else: join afresh
		}
		var token [16]byte
		_, _ = rand.Read(token[:])
		// Prefer free slots; then slots whose owner is dead.
		for pass := range 2 {
			for p := 0; p < r.g.participants; p++ {
				w := load(r.mem, r.pOff(p)+pState)
				st := pStateOf(w)
				if pass == 0 && st != pFree {
					continue
				}
				if pass == 1 && (st != pAlive || r.alive(p, nil, now)) {
					continue
				}
				if !take(p, w, token, false) {
					continue
				}
				if idFile != "" {
					if err := writeParticipantFile(idFile, participantFile{region: r.g.uuid, slot: p, token: token}); err != nil {
						r.leaveSlot(ctx)
						return NoParticipant, fmt.Errorf("join region %s: write participant file: %w", r.be.path, err)
					}
				}
				return r.joined(ctx), nil
			}
		}
		if attempt > 3 {
			return NoParticipant, fmt.Errorf("join region %s: %w (%d slots, all held by live participants)", r.be.path, ErrNoSlot, r.g.participants)
		}
		time.Sleep(time.Millisecond)
	}
}

// aliveOther is alive() for a slot that is not ours even if it has our
// pid (a second Region in this process): then it is alive.
func (r *Region) aliveOther(p int, now time.Time) bool {
	off := r.pOff(p)
	if int(load(r.mem, off+pPID)) == r.self.pid {
		var boot [16]byte
		loadBytes(r.mem, off+pBootID, boot[:])
		if boot == r.self.bootID && load(r.mem, off+pPIDNS) == r.self.pidNS &&
			now.UnixNano()-int64(load(r.mem, off+pHeartbeat)) <= int64(r.opts.LeaseTimeout) {
			return true
		}
	}
	return r.alive(p, nil, now)
}

// ID is this process's participant ID (NoParticipant before Join).
// joined starts the heartbeat of a participant that just took its slot and
// frees the claims its earlier incarnations left WRITING: a daemon killed
// while converting a layer must not find, once restarted, that extent
// still taken (its images larger than the room left).
func (r *Region) joined(ctx context.Context) ParticipantID {
	id := r.startHeartbeat(ctx)
	lctx, cancel := context.WithTimeout(ctx, 2*r.opts.LeaseTimeout)
	defer cancel()
	if unlock, err := r.lock(lctx); err == nil {
		if n := r.reclaimDeadClaims(ctx, time.Now()); n > 0 {
			log.G(ctx).WithField("claims", n).Info("freed image claims left by dead participants")
		}
		unlock()
	} else {
		log.G(ctx).WithError(err).Warn("could not take the region lock to free dead claims; the next claim frees them")
	}
	return id
}

func (r *Region) ID() ParticipantID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.id
}

func (r *Region) me() (ParticipantID, uint32, error) {
	if r.closed.Load() {
		return NoParticipant, 0, ErrClosed
	}
	if r.evicted.Load() {
		return NoParticipant, 0, ErrEvicted
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.id == NoParticipant {
		return NoParticipant, 0, ErrNotJoined
	}
	return r.id, r.inc, nil
}

func (r *Region) startHeartbeat(ctx context.Context) ParticipantID {
	r.mu.Lock()
	defer r.mu.Unlock()
	id, inc := r.id, r.inc
	stop, done := make(chan struct{}), make(chan struct{})
	r.stopHB, r.hbDone = stop, done
	off := r.pOff(int(id))
	logger := log.G(ctx).WithField("participant", int(id))
	go func() {
		defer close(done)
		t := time.NewTicker(r.opts.HeartbeatInterval)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
			}
			if load(r.mem, off+pState) != pWord(pAlive, inc) {
				// Someone declared us dead (we stalled past the lease).
				// Our claims and references are gone: stop pretending.
				r.evicted.Store(true)
				logger.Error("evicted from the shared region: heartbeat lease expired")
				return
			}
			store(r.mem, off+pHeartbeat, uint64(time.Now().UnixNano()))
		}
	}()
	return id
}

func (r *Region) stopHeartbeat() {
	r.mu.Lock()
	stop, done := r.stopHB, r.hbDone
	r.stopHB, r.hbDone = nil, nil
	r.mu.Unlock()
	if stop != nil {
		close(stop)
		<-done
	}
}

// Leave gives the participant slot up now: our WRITING claims are freed,
// our reference bits cleared, the slot made free. Entries only we
// referenced are freed by the next GC.
func (r *Region) Leave(ctx context.Context) error {
	if _, _, err := r.me(); err != nil {
		return err
	}
	r.stopHeartbeat()
	return r.leaveSlot(ctx)
}

func (r *Region) leaveSlot(ctx context.Context) error {
	r.mu.Lock()
	id, inc := r.id, r.inc
	r.mu.Unlock()
	if id == NoParticipant {
		return nil
	}
	off := r.pOff(int(id))
	if cas(r.mem, off+pState, pWord(pAlive, inc), pWord(pReclaiming, inc)) {
		r.reclaimParticipant(int(id), inc)
	}
	r.mu.Lock()
	r.id, r.inc = NoParticipant, 0
	r.mu.Unlock()
	return nil
}

// reclaimParticipant finishes a slot in RECLAIMING(inc): clear its bits,
// free its claims, free the slot.
func (r *Region) reclaimParticipant(p int, inc uint32) (bits, claims int) {
	rec := pWord(pReclaiming, inc)
	still := func() bool { return load(r.mem, r.pOff(p)+pState) == rec }
	bits = r.clearBits(p, still)
	for s := 0; s < r.g.entries; s++ {
		w := load(r.mem, r.eOff(s)+eState)
		if eStateOf(w) == StateWriting && eWriterOf(w) == p {
			if r.freeEntry(s, w) {
				claims++
			}
		}
	}
	cas(r.mem, r.pOff(p)+pState, rec, pWord(pFree, inc))
	r.bumpGen()
	return bits, claims
}

// clearBits clears participant p's reference bit in every entry while
// still() holds.
func (r *Region) clearBits(p int, still func() bool) int {
	mask := uint64(1) << uint(p)
	n := 0
	for s := 0; s < r.g.entries; s++ {
		if !still() {
			break
		}
		if old := atomic.AndUint64(word(r.mem, r.eOff(s)+eRefs), ^mask); old&mask != 0 {
			n++
		}
	}
	return n
}

// Participants lists the participant table.
func (r *Region) Participants() []Participant {
	now := time.Now()
	myID := r.ID()
	var out []Participant
	for p := 0; p < r.g.participants; p++ {
		off := r.pOff(p)
		w := load(r.mem, off+pState)
		st := pStateOf(w)
		if st == pFree {
			continue
		}
		var boot [16]byte
		var host [hostMax]byte
		loadBytes(r.mem, off+pBootID, boot[:])
		loadBytes(r.mem, off+pHost, host[:])
		out = append(out, Participant{
			ID:          ParticipantID(p),
			State:       [...]string{"free", "joining", "alive", "reclaiming"}[st&3],
			Incarnation: pIncOf(w),
			Host:        string(bytes.TrimRight(host[:], "\x00")),
			BootID:      hex.EncodeToString(boot[:]),
			PID:         int(load(r.mem, off+pPID)),
			Started:     time.Unix(0, int64(load(r.mem, off+pStarted))),
			Heartbeat:   time.Unix(0, int64(load(r.mem, off+pHeartbeat))),
			Alive:       st != pFree && r.alive(p, nil, now),
			Self:        ParticipantID(p) == myID,
		})
	}
	return out
}

// lockWord packs the header lock: owner slot+1, 24 bits of its
// incarnation, and the lease deadline in seconds since region creation.
func (r *Region) lockWord(id ParticipantID, inc uint32, deadline time.Time) uint64 {
	// Round up: the stored deadline is never earlier than asked.
	d := deadline.Sub(time.Unix(0, r.g.created))
	secs := uint64(0)
	if d > 0 {
		secs = uint64((d + time.Second - 1) / time.Second)
	}
	return uint64(id+1)&0xff | uint64(inc&0xffffff)<<8 | (secs&0xffffffff)<<32
}

// lock takes the header lock word. A holder that is dead (or restarted),
// or whose lease deadline passed, loses it. Safety never rests on the lock
// alone (claims re-validate), so stealing from a slow holder costs at most
// a retried claim.
func (r *Region) lock(ctx context.Context) (func(), error) {
	unlock, _, err := r.lockClaim(ctx)
	if err != nil {
		return nil, err
	}
	return func() { unlock() }, nil
}

// lockClaim is lock for Claim: it also says whether we took the lock from
// a holder (stole), and its unlock reports whether the lock was still ours
// (false: someone took it from us meanwhile). In both cases the claim must
// re-validate against the whole index (see the package comment).
func (r *Region) lockClaim(ctx context.Context) (func() bool, bool, error) {
	id, inc, err := r.me()
	if err != nil {
		return nil, false, err
	}
	r.lockMu.Lock()
	backoff := 20 * time.Microsecond
	for {
		now := time.Now()
		mine := r.lockWord(id, inc, now.Add(r.opts.LeaseTimeout))
		w := load(r.mem, hLock)
		release := func() bool {
			ok := cas(r.mem, hLock, mine, 0)
			if !ok {
				log.G(ctx).Warn("region lock was taken from us while held (lease expired)")
			}
			r.lockMu.Unlock()
			return ok
		}
		if w == 0 {
			if cas(r.mem, hLock, 0, mine) {
				return release, false, nil
			}
			continue
		}
		owner := int(w&0xff) - 1
		ownerInc := uint32(w>>8) & 0xffffff
		deadline := time.Unix(0, r.g.created).Add(time.Duration(w>>32) * time.Second)
		ownerAlive := false
		if owner >= 0 && owner < r.g.participants {
			pw := load(r.mem, r.pOff(owner)+pState)
			full := pIncOf(pw)
			ownerAlive = full&0xffffff == ownerInc && r.alive(owner, &full, now)
		}
		if !ownerAlive || now.After(deadline) {
			if cas(r.mem, hLock, w, mine) {
				log.G(ctx).WithField("owner", owner).Warn("took over the region lock from a dead or expired holder")
				return release, true, nil
			}
			continue
		}
		if err := ctx.Err(); err != nil {
			r.lockMu.Unlock()
			return nil, false, err
		}
		time.Sleep(backoff)
		if backoff < 2*time.Millisecond {
			backoff *= 2
		}
	}
}

// hbObservation is when this process last saw a participant's heartbeat
// word change.
type hbObservation struct {
	value   uint64
	changed time.Time
}

func (r *Region) staleByObservation(p int, hb uint64, now time.Time) bool {
	r.hbMu.Lock()
	defer r.hbMu.Unlock()
	if r.hbSeen == nil {
		r.hbSeen = make(map[int]hbObservation)
	}
	o, ok := r.hbSeen[p]
	if !ok || o.value != hb {
		r.hbSeen[p] = hbObservation{hb, now}
		return false
	}
	return now.Sub(o.changed) > r.opts.LeaseTimeout
}
