package daxmem

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Options configure Create and Open. Zero values take the defaults.
type Options struct {
	// Backend is "file" (default), "hugetlbfs", "devdax" or "fsdax".
	Backend string
	// Path is the backing file or device (default for "file": DefaultPath).
	Path string
	// Size of a new region in bytes (default DefaultSize; device DAX: the
	// whole device). Open takes the size from the header.
	Size int64
	// Entries is the number of index slots of a new region (default 4096).
	Entries int
	// Participants is the number of participant slots of a new region
	// (default and maximum 64).
	Participants int
	// Align is the alignment a new region records (a power of two from
	// 4 KiB to 1 GiB; 0: the backend's own). Its size is rounded up to it.
	// A region made on a file that device DAX will map later (the file
	// shared as guest memory, or copied to the device) needs the device's
	// alignment, 2 MiB by default: Open refuses a region whose alignment
	// is not a multiple of the backend's.
	Align int64
	// ViewArea is the size of a new region's view area: the bottom of the
	// data area, kept for views, which must lie below the layers they
	// reference (default: an eighth of the data area).
	ViewArea int64
	// HeartbeatInterval is how often a joined participant stamps its slot
	// (default 1s). LeaseTimeout is how old a heartbeat may get before the
	// participant counts as dead (default 10s, at least 3 heartbeats).
	HeartbeatInterval, LeaseTimeout time.Duration
	// NoCreate makes Open fail on a missing file instead of creating it
	// (operator commands that only look).
	NoCreate bool
	// SysRoot is where sysfs is mounted (default "/sys"); tests point it at
	// a fake tree.
	SysRoot string
}

// Defaults. DefaultSize is the one default region size: of Create and
// Open, of the daemon's config and of `region init`. A file region is
// sparse: it takes memory only as images fill it.
const (
	DefaultSize              = 8 << 30
	DefaultEntries           = 4096
	DefaultParticipants      = MaxParticipants
	DefaultHeartbeatInterval = time.Second
	DefaultLeaseTimeout      = 10 * time.Second
)

func (o Options) withDefaults() (Options, error) {
	if o.Backend == "" {
		o.Backend = BackendFile
	}
	if o.Path == "" {
		if o.Backend != BackendFile {
			return o, fmt.Errorf("region backend %s needs a path", o.Backend)
		}
		o.Path = DefaultPath
	}
	if o.Size == 0 && o.Backend != BackendDevDAX {
		o.Size = DefaultSize
	}
	if o.Size < 0 {
		return o, fmt.Errorf("region size %d: %w", o.Size, ErrInvalidSize)
	}
	if o.Align != 0 && (o.Align < pageSize || o.Align&(o.Align-1) != 0 || o.Align > 1<<30) {
		return o, fmt.Errorf("region alignment %d: %w: want a power of two from 4 KiB to 1 GiB", o.Align, ErrInvalidSize)
	}
	if o.Entries == 0 {
		o.Entries = DefaultEntries
	}
	if o.Participants == 0 {
		o.Participants = DefaultParticipants
	}
	if o.HeartbeatInterval <= 0 {
		o.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if o.LeaseTimeout <= 0 {
		o.LeaseTimeout = DefaultLeaseTimeout
	}
	if o.LeaseTimeout < 3*o.HeartbeatInterval {
		return o, fmt.Errorf("lease timeout %v must be at least three heartbeat intervals (%v)", o.LeaseTimeout, o.HeartbeatInterval)
	}
	if o.SysRoot == "" {
		o.SysRoot = "/sys"
	}
	return o, nil
}

// Region is one mapped region. Its methods are safe for concurrent use.
type Region struct {
	opts  Options
	be    *backend
	full  []byte // the whole mapping, for munmap
	mem   []byte // [0, size) as the header says
	g     geometry
	self  identity
	close sync.Once

	lockMu sync.Mutex // serialises this process's use of the region lock word
	refMu  sync.Mutex // serialises this participant's reference bit changes

	hbMu   sync.Mutex
	hbSeen map[int]hbObservation // heartbeat values seen, for clock-skew-proof liveness

	mu      sync.Mutex // guards the fields below
	id      ParticipantID
	inc     uint32
	stopHB  chan struct{}
	hbDone  chan struct{}
	evicted atomic.Bool
	closed  atomic.Bool
}

// identity is what tells this process apart from others sharing the region.
type identity struct {
	bootID [16]byte
	pidNS  uint64
	pid    int
}

func selfIdentity() identity {
	id := identity{pid: os.Getpid()}
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		id.bootID = parseBootID(string(b))
	}
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/pid", &st); err == nil {
		id.pidNS = st.Ino
	}
	return id
}

func parseBootID(s string) [16]byte {
	var out [16]byte
	j := 0
	for i := 0; i < len(s) && j < 32; i++ {
		c := s[i]
		var v byte
		switch {
		case c >= '0' && c <= '9':
			v = c - '0'
		case c >= 'a' && c <= 'f':
			v = c - 'a' + 10
		case c >= 'A' && c <= 'F':
			v = c - 'A' + 10
		default:
			continue
		}
		out[j/2] |= v << (4 * uint(1-j%2))
		j++
	}
	return out
}

// Create initialises a new region. It refuses to touch a path that already
// holds a valid region (ErrExist) or any other existing file.
func Create(ctx context.Context, opts Options) (*Region, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if o.Backend == BackendDevDAX {
		return createDevDAX(o)
	}
	if o.Backend == BackendFile {
		if err := os.MkdirAll(filepath.Dir(o.Path), 0o700); err != nil {
			return nil, fmt.Errorf("create region %s: %w", o.Path, err)
		}
	}
	if _, err := os.Lstat(o.Path); err == nil {
		if r, oerr := openExisting(o); oerr == nil {
			r.Close()
			return nil, fmt.Errorf("create region %s: %w", o.Path, ErrExist)
		} else {
			return nil, fmt.Errorf("create region %s: path exists and is not a usable region (%v); remove it first", o.Path, oerr)
		}
	}
	// Build the region in a temporary file and link it into place, so no
	// participant ever sees a half-initialised region and two racing
	// creators cannot both win.
	var nonce [6]byte
	_, _ = rand.Read(nonce[:])
	tmp := fmt.Sprintf("%s.tmp-%d-%x", o.Path, os.Getpid(), nonce)
	if o.Align > 0 {
		o.Size = alignUp(o.Size, o.Align)
	}
	be, n, err := openBackend(o.Backend, tmp, o.Size, true, o.SysRoot)
	if err != nil {
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	defer os.Remove(tmp)
	if n, err = be.raiseAlign(n, o.Align); err != nil {
		be.close()
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	r, err := initRegion(be, n, o)
	if err != nil {
		be.close()
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	if err := os.Link(tmp, o.Path); err != nil {
		r.Close()
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("create region %s: %w", o.Path, ErrExist)
		}
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	r.be.path = o.Path
	return r, nil
}

func createDevDAX(o Options) (*Region, error) {
	be, n, err := openBackend(o.Backend, o.Path, o.Size, false, o.SysRoot)
	if err != nil {
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	if n, err = be.raiseAlign(n, o.Align); err != nil {
		be.close()
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	mem, err := be.mapRegion(n)
	if err != nil {
		be.close()
		return nil, err
	}
	if _, err := parseHeader(o.Path, mem, n); err == nil {
		be.unmap(mem)
		be.close()
		return nil, fmt.Errorf("create region %s: %w", o.Path, ErrExist)
	}
	be.unmap(mem)
	r, err := initRegion(be, n, o)
	if err != nil {
		be.close()
		return nil, fmt.Errorf("create region %s: %w", o.Path, err)
	}
	return r, nil
}

// initRegion maps a fresh backing object of n bytes and writes an empty
// region into it: zeroed tables, the header, and the magic last.
func initRegion(be *backend, n int64, o Options) (*Region, error) {
	g, err := layout(n, be.align, o.Participants, o.Entries, o.ViewArea)
	if err != nil {
		return nil, err
	}
	g.created = time.Now().UnixNano()
	_, _ = rand.Read(g.uuid[:])
	mem, err := be.mapRegion(n)
	if err != nil {
		return nil, err
	}
	r := &Region{opts: o, be: be, full: mem, mem: mem[:g.size], g: g, self: selfIdentity(), id: NoParticipant}
	// A device may hold anything: zero every metadata word.
	for off := int64(0); off < g.dataOff; off += 8 {
		if load(mem, off) != 0 {
			store(mem, off, 0)
		}
	}
	var h [headerSize]byte
	encodeHeader(h[:], g)
	for off := int64(8); off < hImmutableEnd+8; off += 8 {
		store(mem, off, leUint64(h[off:]))
	}
	if err := be.flush(mem, 0, g.dataOff); err != nil {
		r.Close()
		return nil, err
	}
	store(mem, hMagic, Magic)
	if err := be.flush(mem, 0, pageSize); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// Open maps an existing region. With the file backend a missing file is
// created (Create with opts). A damaged header, another version or a
// truncated file is refused with a *HeaderError: never reinitialised.
func Open(ctx context.Context, opts Options) (*Region, error) {
	o, err := opts.withDefaults()
	if err != nil {
		return nil, err
	}
	if o.Backend == BackendFile && !o.NoCreate {
		if _, err := os.Stat(o.Path); errors.Is(err, os.ErrNotExist) {
			r, err := Create(ctx, o)
			if errors.Is(err, ErrExist) {
				return openExisting(o) // lost a creation race: use the winner's
			}
			return r, err
		}
	}
	return openExisting(o)
}

func openExisting(o Options) (*Region, error) {
	// An existing region's size is in its header: map the whole device
	// (file backends take the file's size anyway). A size meant for
	// creating a region, such as the daemon's configured default, must
	// not make a smaller device unusable.
	size := o.Size
	if o.Backend == BackendDevDAX {
		size = 0
	}
	be, n, err := openBackend(o.Backend, o.Path, size, false, o.SysRoot)
	if err != nil {
		return nil, fmt.Errorf("open region %s: %w", o.Path, err)
	}
	if n < headerSize {
		be.close()
		return nil, &HeaderError{Path: o.Path, Reason: fmt.Sprintf("only %d bytes, too small for a region", n)}
	}
	mem, err := be.mapRegion(n)
	if err != nil {
		be.close()
		return nil, fmt.Errorf("open region %s: %w", o.Path, err)
	}
	g, err := parseHeader(o.Path, mem[:headerSize], n)
	if err == nil {
		err = checkAlign(o.Path, g.align, be)
	}
	if err != nil {
		be.unmap(mem)
		be.close()
		return nil, err
	}
	return &Region{opts: o, be: be, full: mem, mem: mem[:g.size], g: g, self: selfIdentity(), id: NoParticipant}, nil
}

// AlignError reports a region whose recorded alignment the backend
// mapping it cannot honour: a region made on a file with 4 KiB alignment
// and opened as device DAX, which maps whole 2 MiB pages.
type AlignError struct {
	Path           string
	Region, Needed int64
	Backend        string
}

func (e *AlignError) Error() string {
	return fmt.Sprintf("region %s was made with %s alignment but the %s backend maps it in %s units: "+
		"make regions meant for device DAX with `containerd-daxfs-grpc region init --align %s` "+
		"(or region.align = %q in the daemon's config when it creates the region), "+
		"or set the device's alignment to %d while it is unbound (daxctl reconfigure-device --align)",
		e.Path, sizeName(e.Region), e.Backend, sizeName(e.Needed), sizeName(e.Needed), sizeName(e.Needed)+"iB", e.Region)
}

func (e *AlignError) Unwrap() error { return ErrInvalidSize }

// checkAlign refuses a region whose alignment is not a multiple of the
// backend's.
func checkAlign(path string, regionAlign int64, be *backend) error {
	if regionAlign%be.align != 0 {
		return &AlignError{Path: path, Region: regionAlign, Needed: be.align, Backend: be.name}
	}
	return nil
}

// sizeName writes a power-of-two size as 4K, 2M or 1G.
func sizeName(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return strconv.FormatInt(n>>30, 10) + "G"
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.FormatInt(n>>20, 10) + "M"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.FormatInt(n>>10, 10) + "K"
	}
	return strconv.FormatInt(n, 10)
}

// Close stops the heartbeat and unmaps the region. It does not give up the
// participant slot: a restarted daemon re-claims it (and its references)
// through its participant file; if it does not come back within the lease,
// the next GC reclaims them. Use Leave to give the slot up now.
// Close unmaps the memory: no other method may run concurrently with it,
// and slices from Bytes or Slice must not be used after it.
func (r *Region) Close() error {
	var err error
	r.close.Do(func() {
		r.stopHeartbeat()
		r.closed.Store(true)
		if e := r.be.unmap(r.full); e != nil {
			err = e
		}
		if e := r.be.close(); e != nil && err == nil {
			err = e
		}
	})
	return err
}

// Path is the backing file or device.
// SameHeader reports whether b starts with this region's header as it
// was written at creation (geometry, UUID, creation time): whether a
// device read by other means (a block device over the same memory) holds
// this region.
func (r *Region) SameHeader(b []byte) bool {
	return len(b) >= hImmutableEnd && string(b[:hImmutableEnd]) == string(r.mem[:hImmutableEnd])
}

func (r *Region) Path() string { return r.be.path }

// Backend is the backend name.
func (r *Region) Backend() string { return r.be.name }

// PhysAddr is the physical address of region offset 0, when the backend
// knows it (device DAX read as root): the kernel mounter needs it.
func (r *Region) PhysAddr() (uint64, bool) { return r.be.phys, r.be.physKnown }

// Size is the region size; DataOffset/DataSize the data area.
func (r *Region) Size() int64       { return r.g.size }
func (r *Region) DataOffset() int64 { return r.g.dataOff }
func (r *Region) DataSize() int64   { return r.g.dataSize }

// Slice returns [off, off+length) of the mapping (region offsets, inside the
// data area). The slice aliases shared memory: do not write to a READY image.
func (r *Region) Slice(off, length int64) ([]byte, error) {
	if r.closed.Load() {
		return nil, ErrClosed
	}
	if length < 0 || off < r.g.dataOff || off > r.g.size || length > r.g.size-off {
		return nil, fmt.Errorf("slice [%d,+%d) outside the data area [%d,%d) of region %s", off, length, r.g.dataOff, r.g.size, r.be.path)
	}
	return r.mem[off : off+length : off+length], nil
}

func leUint64(b []byte) uint64 {
	return uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
		uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
}

func (r *Region) bumpGen() { atomic.AddUint64(word(r.mem, hGen), 1) }

// Generation changes whenever the index changes; a cheap "anything new?".
func (r *Region) Generation() uint64 { return load(r.mem, hGen) }

func (r *Region) String() string {
	return r.be.name + ":" + r.be.path + " (" + strconv.FormatInt(r.g.size, 10) + " bytes)"
}
