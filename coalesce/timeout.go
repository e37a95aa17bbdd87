package coalesce

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// The breaker's timeout: an upstream that accepts a request and never
// answers ends only when its clients give up, and a client giving up is
// not the upstream's failure. So the wait for response headers is bounded
// (BreakerConfig.Timeout); a request cut at the bound is answered 504 and
// counts as a failure.

// ErrUpstreamTimeout is the error of an upstream request cut because its
// response headers did not arrive within BreakerConfig.Timeout.
var ErrUpstreamTimeout = errors.New("coalesce: no response headers from the upstream within the breaker's timeout")

const detailUpstreamTimeout = "upstream-timeout"

// errCut is what a cut request answers its clients.
var errCut = &StatusError{Status: http.StatusGatewayTimeout, Err: ErrUpstreamTimeout}

// cutStatus is the Cache-Status member of an answer to a cut request; fwd
// says why it went upstream.
func cutStatus(fwd string, collapsed bool) cacheStatus {
	return cacheStatus{fwd: fwd, fwdStatus: http.StatusGatewayTimeout, collapsed: collapsed, detail: detailUpstreamTimeout, quoteDetail: true}
}

// cuttable reports whether the timeout may cut r: a GET or HEAD without a
// body. A request with a body (an upload, a write) may not be safe to send
// again and may take long for good reasons.
func cuttable(r *http.Request) bool {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return false
	}
	// As bypassReason tells a body: HTTP/1.1 chunked bodies come in
	// TransferEncoding, HTTP/2 bodies without a length as ContentLength -1.
	return r.ContentLength <= 0 && len(r.TransferEncoding) == 0 && len(r.Header["Transfer-Encoding"]) == 0 &&
		(r.ContentLength == 0 || r.ProtoMajor != 2)
}

// send calls next with r under the passage, its Pick in the context. A
// request the timeout may cut goes with a context that is cancelled, with
// ErrUpstreamTimeout as its cause, when the timeout passes before the
// response headers: the context passage.context was given with its cancel,
// or else one of send's own. Afterwards the passage knows (timedOut).
// Nothing the handler writes after the cut goes out (reverse_proxy writes
// 499 for its cancelled request): the caller answers. A passage sends one
// request.
func (p *passage) send(next Next, w http.ResponseWriter, r *http.Request) error {
	if p == nil {
		return next(w, r)
	}
	timed := p.e.guard.times(r)
	if r.Context() != context.Context(&p.ctx) {
		// r carries its client's context: a cut needs a context of its own.
		parent := r.Context()
		var cancel canceller
		if timed {
			var c context.CancelCauseFunc
			parent, c = context.WithCancelCause(parent)
			defer c(nil)
			cancel = cancelFunc(c)
		}
		r = r.WithContext(p.context(parent, cancel))
	}
	if !timed {
		return next(w, r)
	}
	hw := &p.watch
	hw.ResponseWriter = w
	if _, buffers := w.(*recorder); !buffers {
		hw.header = w.Header().Clone()
	}
	hw.cancel = p.cancel
	hw.leader, _ = p.cancel.(leaderWatcher)
	due := p.e.guard.due
	due.add(hw)
	defer func() {
		due.remove(hw)
		// A cut already under way has either cut the request
		// (headersLate) or loses to this: the cut and the cancel always
		// agree, and no late cancel ends a flight that was not cut.
		hw.state.CompareAndSwap(headersDue, headersIn)
		p.cut.Store(hw.state.Load() == headersLate)
	}()
	return next(hw, r)
}

// dueHeaders cuts the requests whose response headers are late: one timer
// for all of an engine's requests rather than one each. Arming a timer
// that is the earliest of its P wakes another thread (the runtime's
// wakeNetPoller): on a busy server, a timer per request cost more than the
// rest of the module's work on a miss. With one timeout, the order requests
// are sent in is the order of their deadlines, so the queue is a list and
// the timer waits only for its head. An armed timer is no goroutine, and
// it fires once more at most after the queue has emptied: nothing to stop
// when the engine closes (requests of an unloaded configuration may still
// be waiting for their headers).
type dueHeaders struct {
	timeout time.Duration
	epoch   time.Time // deadlines are monotonic nanoseconds since then

	mu         sync.Mutex
	head, tail *headerWatch
	// unwatched is the first queued request whose leader's client is not
	// watched yet (see leaderWatchDelay), nil for none.
	unwatched *headerWatch
	timer     *time.Timer
	armed     bool  // the timer will fire ...
	at        int64 // ... then
}

func newDueHeaders(timeout time.Duration) *dueHeaders {
	return &dueHeaders{timeout: timeout, epoch: time.Now()}
}

func (d *dueHeaders) now() int64 { return int64(time.Since(d.epoch)) }

// add queues w, whose request has just been sent.
func (d *dueHeaders) add(w *headerWatch) {
	w.sent = d.now()
	w.deadline = w.sent + int64(d.timeout)
	d.mu.Lock()
	w.prev, w.next, w.queued = d.tail, nil, true
	if d.tail != nil {
		d.tail.next = w
	} else {
		d.head = w
	}
	d.tail = w
	if d.unwatched == nil && w.leader != nil {
		d.unwatched = w
	}
	if at, ok := d.next(); ok && (!d.armed || at < d.at) {
		d.arm(at)
	}
	d.mu.Unlock()
}

// next is the time of the queue's next event: the head's deadline, or the
// first unwatched request's watch if that comes earlier (called under mu).
func (d *dueHeaders) next() (int64, bool) {
	if d.head == nil {
		return 0, false
	}
	at := d.head.deadline
	if d.unwatched != nil {
		at = min(at, d.unwatched.sent+int64(leaderWatchDelay))
	}
	return at, true
}

// withLeader is w or the first request after it that leads a flight.
func withLeader(w *headerWatch) *headerWatch {
	for w != nil && w.leader == nil {
		w = w.next
	}
	return w
}

// remove takes w out of the queue, if it is still there.
func (d *dueHeaders) remove(w *headerWatch) {
	d.mu.Lock()
	d.unlink(w)
	d.mu.Unlock()
}

func (d *dueHeaders) unlink(w *headerWatch) {
	if !w.queued {
		return
	}
	if d.unwatched == w {
		d.unwatched = withLeader(w.next)
	}
	if w.prev != nil {
		w.prev.next = w.next
	} else {
		d.head = w.next
	}
	if w.next != nil {
		w.next.prev = w.prev
	} else {
		d.tail = w.prev
	}
	w.prev, w.next, w.queued = nil, nil, false
}

// arm sets the timer for at (called under mu). Once armed it is left alone
// until it fires, unless something comes due earlier: a head that left
// early costs one early wake-up, not a timer change on every request.
func (d *dueHeaders) arm(at int64) {
	wait := time.Duration(at - d.now())
	if d.timer == nil {
		d.timer = time.AfterFunc(wait, d.fire)
	} else {
		d.timer.Reset(wait)
	}
	d.armed, d.at = true, at
}

// fire cuts every queued request past its deadline whose headers have not
// arrived, has the clients of the leaders queued for leaderWatchDelay
// watched, and arms the timer for what comes next.
func (d *dueHeaders) fire() {
	now := d.now()
	var late []*headerWatch
	var watch []leaderWatcher
	d.mu.Lock()
	d.armed = false
	for d.head != nil && d.head.deadline <= now {
		w := d.head
		d.unlink(w)
		if w.state.CompareAndSwap(headersDue, headersLate) {
			late = append(late, w)
		}
	}
	for w := d.unwatched; w != nil && w.sent+int64(leaderWatchDelay) <= now; w = d.unwatched {
		watch = append(watch, w.leader)
		d.unwatched = withLeader(w.next)
	}
	if at, ok := d.next(); ok {
		d.arm(at)
	}
	d.mu.Unlock()
	// Outside the lock: both may run context callbacks.
	for _, l := range watch {
		l.WatchLeader()
	}
	for _, w := range late {
		w.cancel.Cancel(ErrUpstreamTimeout)
	}
}

// leaderWatchDelay is how long a leader's request waits in the queue before
// the leader's client is watched (Flight.WatchLeader): a watch costs more
// than the rest of the flight's registration, and most requests are over
// long before. A client that leaves earlier ends a flight nobody else waits
// for (its upstream request is cancelled) when the delay has passed.
const leaderWatchDelay = 10 * time.Millisecond

// leaderWatcher is a flight, whose leader's client the queue watches.
type leaderWatcher interface{ WatchLeader() }

// watchesLater reports whether the queue of requests waiting for their
// headers watches the client of a flight led for r (after
// leaderWatchDelay): the request is one the timeout may cut, and the flight
// waits for nothing before it (a fleet's leader may wait for the fleet's
// lock first).
func (e *Engine) watchesLater(r *http.Request) bool {
	return e.guard != nil && e.guard.times(r) && e.tier == nil
}

// times reports whether the timeout applies to r, which send then queues.
func (g *guard) times(r *http.Request) bool { return g.cfg.Timeout > 0 && cuttable(r) }

// timedOut reports whether the timeout cut the request send sent.
func (p *passage) timedOut() bool { return p != nil && p.cut.Load() }

// States of a headerWatch.
const (
	headersDue  int32 = iota // waiting for the response headers; the timer runs
	headersIn                // they arrived in time; the timer is stopped
	headersLate              // the timer fired first: the request is cut
)

// headerWatch stops the timeout's timer when the response headers arrive
// (a final status: 1xx responses go through and the timer runs on), and
// drops what is written after a cut. http.ResponseController reaches the
// writer beneath through Unwrap.
type headerWatch struct {
	http.ResponseWriter
	state atomic.Int32
	// cancel cuts the request; leader is its flight when it leads one;
	// sent and deadline (dueHeaders' clock), prev, next and queued are its
	// place in the queue, under the queue's lock.
	cancel         canceller
	leader         leaderWatcher
	sent, deadline int64
	prev, next     *headerWatch
	queued         bool
	// header is the header the handler fills until the response headers go
	// out, when the writer beneath would send its own as it is (a recorder
	// keeps its own until it decides): the answer to a cut request must not
	// carry part of an upstream header that arrived too late.
	header http.Header
}

func (w *headerWatch) Header() http.Header {
	if w.header != nil && w.state.Load() != headersIn {
		return w.header
	}
	return w.ResponseWriter.Header()
}

// install makes h the header of the writer beneath.
func (w *headerWatch) install(h http.Header) {
	dst := w.ResponseWriter.Header()
	for k := range dst {
		if _, ok := h[k]; !ok {
			delete(dst, k)
		}
	}
	for k, v := range h {
		dst[k] = v
	}
}

// arrived reports whether the response may go out: its headers came before
// the cut.
func (w *headerWatch) arrived() bool {
	if w.state.CompareAndSwap(headersDue, headersIn) {
		if w.header != nil {
			w.install(w.header)
		}
		return true
	}
	return w.state.Load() == headersIn
}

func (w *headerWatch) WriteHeader(code int) {
	if code >= 100 && code < 200 && code != http.StatusSwitchingProtocols {
		switch w.state.Load() {
		case headersIn:
			w.ResponseWriter.WriteHeader(code)
		case headersDue:
			if w.header == nil {
				w.ResponseWriter.WriteHeader(code)
				return
			}
			// An interim response goes out with the header as the
			// handler set it; the header beneath is put back after.
			saved := w.ResponseWriter.Header().Clone()
			w.install(w.header)
			w.ResponseWriter.WriteHeader(code)
			w.install(saved)
		}
		return
	}
	if w.arrived() {
		w.ResponseWriter.WriteHeader(code)
	}
}

func (w *headerWatch) Write(b []byte) (int, error) {
	if w.arrived() {
		return w.ResponseWriter.Write(b)
	}
	return 0, ErrUpstreamTimeout
}

func (w *headerWatch) Flush() {
	if w.arrived() {
		_ = http.NewResponseController(w.ResponseWriter).Flush()
	}
}

func (w *headerWatch) Unwrap() http.ResponseWriter { return w.ResponseWriter }
