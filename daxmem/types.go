package daxmem

import (
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"
)

// Kind says what an image is.
type Kind uint8

const (
	// KindLayer is a layer image keyed by the layer's diffID.
	KindLayer Kind = 1
	// KindView is a merged view image keyed by a chain ID.
	KindView Kind = 2
	// KindAlias is another digest a layer image is known by: the digest
	// of a blob it was made from, or of an image with the same bytes. It
	// has no extent: its Target is the layer's key. Aliases are made only
	// from what a participant checked (it made the image from that blob,
	// or hashed the blob's content to the layer's diffID), so finding a
	// layer through an alias is as good as converting the blob again.
	KindAlias Kind = 3
)

func (k Kind) String() string {
	switch k {
	case KindLayer:
		return "layer"
	case KindView:
		return "view"
	case KindAlias:
		return "alias"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

func (k Kind) valid() bool { return k == KindLayer || k == KindView || k == KindAlias }

// hasExtent says whether entries of kind k hold bytes of the data area.
func (k Kind) hasExtent() bool { return k == KindLayer || k == KindView }

// Key is the sha256 digest an image is looked up by: the layer's diffID or
// the snapshot's chain ID.
type Key [32]byte

// KeyFromDigest parses "sha256:<64 hex>" (or the bare hex).
func KeyFromDigest(d string) (Key, error) {
	var k Key
	h := strings.TrimPrefix(d, "sha256:")
	if strings.Contains(h, ":") {
		return k, fmt.Errorf("digest %q: only sha256 is supported", d)
	}
	if len(h) != 64 {
		return k, fmt.Errorf("digest %q: want 64 hex digits, got %d", d, len(h))
	}
	if _, err := hex.Decode(k[:], []byte(h)); err != nil {
		return k, fmt.Errorf("digest %q: %w", d, err)
	}
	return k, nil
}

// String returns the key as an OCI digest, "sha256:<hex>".
func (k Key) String() string { return "sha256:" + hex.EncodeToString(k[:]) }

// Short is the first 12 hex digits, for tables and messages.
func (k Key) Short() string { return hex.EncodeToString(k[:6]) }

// State is an index entry's state.
type State uint8

const (
	StateFree    State = 0
	StateWriting State = 1
	StateReady   State = 2
	StateDying   State = 3
)

func (s State) String() string {
	switch s {
	case StateFree:
		return "FREE"
	case StateWriting:
		return "WRITING"
	case StateReady:
		return "READY"
	case StateDying:
		return "DYING"
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// ParticipantID is a participant's slot in the participant table.
type ParticipantID int

// NoParticipant is the ID of a Region that has not joined.
const NoParticipant ParticipantID = -1

// Entry is a snapshot of one index entry.
type Entry struct {
	Slot     int
	State    State
	Kind     Kind
	Key      Key
	Offset   int64  // region offset of the image (page aligned)
	Length   int64  // image bytes (for WRITING: the claimed upper bound)
	Extent   int64  // bytes allocated to the entry, Length rounded up to the page
	Checksum uint64 // CRC-32C of the Length image bytes (READY only)
	Writer   ParticipantID
	// WriterIncarnation tells a restarted writer's old claims from new ones.
	WriterIncarnation uint32
	Refs              uint64 // bit i set: participant i references the entry
	Created           time.Time
	Published         time.Time
	Generation        uint64
	// Target is an alias's layer key.
	Target Key
}

// End is the region offset just past the image.
func (e Entry) End() int64 { return e.Offset + e.Length }

// RefList returns the participants referencing the entry.
func (e Entry) RefList() []ParticipantID {
	var l []ParticipantID
	for i := range MaxParticipants {
		if e.Refs&(1<<uint(i)) != 0 {
			l = append(l, ParticipantID(i))
		}
	}
	return l
}

// Errors. Test with errors.Is; messages name the key.
var (
	ErrExists      = errors.New("image already published")
	ErrBusy        = errors.New("image is being written by another live participant")
	ErrFull        = errors.New("region full")
	ErrNotFound    = errors.New("no such image in region")
	ErrAbandoned   = errors.New("writer died before publishing")
	ErrCorrupt     = errors.New("image checksum mismatch")
	ErrBadHeader   = errors.New("invalid region header")
	ErrExist       = errors.New("a valid region already exists")
	ErrNotJoined   = errors.New("region not joined: call Join first")
	ErrEvicted     = errors.New("this participant was declared dead and evicted from the region")
	ErrClaimLost   = errors.New("claim lost: reclaimed after our lease expired")
	ErrClaimDone   = errors.New("claim already published or aborted")
	ErrNoSlot      = errors.New("participant table full")
	ErrInUse       = errors.New("participant slot in use by a live process")
	ErrClosed      = errors.New("region closed")
	ErrInvalidSize = errors.New("invalid size")
)

// KeyError wraps an error about one image with its kind and key and, where
// there is one, the entry (for ErrExists: the READY entry to use).
type KeyError struct {
	Op    string
	Kind  Kind
	Key   Key
	Entry *Entry
	Err   error
	// Detail is extra text, e.g. the sizes of a "region full" error.
	Detail string
}

func (e *KeyError) Error() string {
	s := fmt.Sprintf("%s %s %s: %v", e.Op, e.Kind, e.Key, e.Err)
	if e.Detail != "" {
		s += ": " + e.Detail
	}
	return s
}

func (e *KeyError) Unwrap() error { return e.Err }

// EntryOf returns the entry carried by an error from Claim (ErrExists: the
// READY entry; ErrBusy: the WRITING entry).
func EntryOf(err error) (Entry, bool) {
	var ke *KeyError
	if errors.As(err, &ke) && ke.Entry != nil {
		return *ke.Entry, true
	}
	return Entry{}, false
}
