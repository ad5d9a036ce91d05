package snapshotter

import (
	"sync"
	"time"
)

// warmDelay is how long a freshly committed snapshot waits before its view
// is warmed when no layer is known to follow it. A sequential unpack
// prepares the next layer's snapshot over it a few milliseconds after the
// commit, which cancels the warming; the image's top layer is the one
// nothing follows. Short, because the first container often follows the
// unpack at once (ctr image pull && ctr run): the warming must be under
// way, if not done, when its Prepare comes.
const warmDelay = 50 * time.Millisecond

// warmer schedules the warming of views: mounting the view of an image's
// top layer after its unpack, ahead of its first container. It holds only
// the timers; which extractions are in flight is read from the metadata
// store by the caller (see schedule). A nil warmer warms nothing.
type warmer struct {
	delay time.Duration
	// warm is called, in a goroutine of its own, with the name of a
	// committed snapshot whose warming was not cancelled.
	warm func(name string)

	mu      sync.Mutex
	pending map[string]*pendingWarm // committed snapshot name -> its timer
	closed  bool
}

type pendingWarm struct {
	timer *time.Timer
	chain string // the chain ID the unpacker committed, if known
}

func newWarmer(delay time.Duration, warm func(name string)) *warmer {
	return &warmer{delay: delay, warm: warm, pending: map[string]*pendingWarm{}}
}

// schedule warms committed snapshot name (chain ID chain for the unpacker,
// "" if it has none) after the delay, unless awaited reports that an
// extraction in flight will be committed over chain: a parallel unpack
// prepares every layer before it commits the first, so such a commit is
// not the image's top. awaited runs under the warmer's lock, as does
// cancelChain: an extraction recorded before awaited reads is seen by it,
// and one recorded after cancels the warming.
func (w *warmer) schedule(name, chain string, awaited func() bool) {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || (chain != "" && awaited()) {
		return
	}
	w.cancelLocked(name)
	p := &pendingWarm{chain: chain}
	w.pending[name] = p
	p.timer = time.AfterFunc(w.delay, func() {
		w.mu.Lock()
		if w.pending[name] != p || w.closed {
			// Cancelled (or replaced) after the timer fired but
			// before we got the lock.
			w.mu.Unlock()
			return
		}
		delete(w.pending, name)
		w.mu.Unlock()
		w.warm(name)
	})
}

// cancel cancels the warming of snapshot name: something was built on it,
// or it was removed.
func (w *warmer) cancel(name string) {
	if w == nil || name == "" {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.cancelLocked(name)
}

// cancelChain cancels the warming of the snapshot committed as chain ID
// chain: an extraction to be committed over it was recorded.
func (w *warmer) cancelChain(chain string) {
	if w == nil || chain == "" {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for name, p := range w.pending {
		if p.chain == chain {
			w.cancelLocked(name)
		}
	}
}

func (w *warmer) cancelLocked(name string) {
	if p, ok := w.pending[name]; ok {
		p.timer.Stop()
		delete(w.pending, name)
	}
}

// stop cancels every pending warming; nothing is scheduled after it.
func (w *warmer) stop() {
	if w == nil {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.closed = true
	for name := range w.pending {
		w.cancelLocked(name)
	}
}
