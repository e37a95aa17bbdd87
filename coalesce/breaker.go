package coalesce

import (
	"errors"
	"fmt"
	"math"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/sony/gobreaker/v2"
)

// BreakerState is the state of one upstream's breaker.
type BreakerState string

const (
	BreakerClosed   BreakerState = "closed"    // requests go through
	BreakerOpen     BreakerState = "open"      // requests are answered without the upstream
	BreakerHalfOpen BreakerState = "half-open" // Probes requests go through to decide
)

func stateOf(s gobreaker.State) BreakerState {
	switch s {
	case gobreaker.StateOpen:
		return BreakerOpen
	case gobreaker.StateHalfOpen:
		return BreakerHalfOpen
	default:
		return BreakerClosed
	}
}

// BreakerCounts are a breaker's counts in its current state (in the closed
// state with a ratio, within the window).
type BreakerCounts struct {
	Requests            uint32 `json:"requests"`
	Successes           uint32 `json:"successes"`
	Failures            uint32 `json:"failures"`
	Excluded            uint32 `json:"excluded"`
	ConsecutiveFailures uint32 `json:"consecutive_failures"`
}

func countsOf(c gobreaker.Counts) BreakerCounts {
	return BreakerCounts{Requests: c.Requests, Successes: c.TotalSuccesses, Failures: c.TotalFailures,
		Excluded: c.TotalExclusions, ConsecutiveFailures: c.ConsecutiveFailures}
}

// BreakerChange is one state change of one upstream's breaker, for logs.
type BreakerChange struct {
	Upstream string
	From, To BreakerState
	// Reason says what caused the change, in words.
	Reason string
	// Counts: when the breaker opened from closed, the counts that tripped it.
	Counts BreakerCounts
	// Until: when the breaker opened, when probes begin.
	Until time.Time
}

// BreakerStatus describes one breaker now (for an admin API).
type BreakerStatus struct {
	Upstream  string        `json:"upstream"`
	State     BreakerState  `json:"state"`
	Counts    BreakerCounts `json:"counts"`
	OpenUntil *time.Time    `json:"open_until,omitempty"`
	Settings  string        `json:"settings"`
}

// Verdicts on one upstream request, as the breaker counts them.
type verdict uint8

const (
	success  verdict = iota
	failure          // a transport error or a status in Statuses
	excluded         // neither: the client went away, or the request never reached the upstream
)

var (
	errFailed   = errors.New("coalesce: upstream request failed")
	errExcluded = errors.New("coalesce: upstream request not counted")
)

// ticket is a request that a breaker let through; it must be reported
// exactly once, or a half-open breaker keeps its probe slot forever.
// Reporting it delivers the state changes it caused. The zero ticket is
// none: nothing to report.
type ticket struct {
	b    *Breaker
	done func(error) // gobreaker's
}

// taken reports whether t is a ticket a breaker gave.
func (t ticket) taken() bool { return t.done != nil }

func (t ticket) report(v verdict) {
	if t.done == nil {
		return
	}
	switch v {
	case success:
		t.done(nil)
	case failure:
		t.done(errFailed)
	default:
		t.done(errExcluded)
	}
	t.b.deliver()
}

// Breaker is the circuit breaker of one upstream (for one setting): a
// gobreaker.TwoStepCircuitBreaker with the time it stays open remembered for
// Retry-After.
type Breaker struct {
	upstream string
	settings string
	cfg      BreakerConfig
	cb       *gobreaker.TwoStepCircuitBreaker[struct{}]
	onChange func(BreakerChange)

	openUntil atomic.Int64 // unix ns: while open, when probes begin
	// fleetUntil (unix ns): the fleet opened this upstream's breaker until
	// then (sharedbreaker.go); fleetFailing: this server has seen the
	// fleet's tally of its failures grow since the last success.
	fleetUntil   atomic.Int64
	fleetFailing atomic.Bool
	// fleetTrips counts the fleet's openings being told to gobreaker as a
	// failure now (tripByFleet): readyToTrip trips on it.
	fleetTrips atomic.Int32
	lastUsed   atomic.Int64 // unix ns, to prune idle breakers

	// tripped are the counts ReadyToTrip saw when it said yes. Written and
	// read under gobreaker's lock (ReadyToTrip and OnStateChange both run
	// under it), never elsewhere.
	tripped gobreaker.Counts

	// changes are the state changes gobreaker made under its lock, waiting
	// to be told to onChange once it is released (see deliver).
	changesMu  sync.Mutex
	changes    []BreakerChange
	delivering bool
}

func newBreaker(upstream string, cfg BreakerConfig, onChange func(BreakerChange)) *Breaker {
	b := &Breaker{upstream: upstream, settings: cfg.fingerprint(), cfg: cfg, onChange: onChange}
	st := gobreaker.Settings{
		Name:          upstream,
		MaxRequests:   uint32(cfg.Probes),
		Timeout:       cfg.Open,
		ReadyToTrip:   b.readyToTrip,
		OnStateChange: b.stateChanged,
		IsExcluded:    func(err error) bool { return errors.Is(err, errExcluded) },
	}
	if cfg.Ratio > 0 {
		// A rolling window of ten buckets, so that the ratio forgets old
		// answers gradually rather than all at once.
		st.Interval = cfg.Window
		st.BucketPeriod = cfg.Window / 10
	}
	b.cb = gobreaker.NewTwoStepCircuitBreaker[struct{}](st)
	b.lastUsed.Store(time.Now().UnixNano())
	return b
}

// readyToTrip runs under gobreaker's lock after each failure in the closed
// state.
func (b *Breaker) readyToTrip(c gobreaker.Counts) bool {
	trip := b.fleetTrips.Load() > 0 || b.cfg.Failures > 0 && c.ConsecutiveFailures >= uint32(b.cfg.Failures)
	if !trip && b.cfg.Ratio > 0 {
		// The sample is the answered requests; Requests also counts those
		// still in flight.
		answered := c.TotalSuccesses + c.TotalFailures
		trip = answered >= uint32(b.cfg.MinRequests) && float64(c.TotalFailures) >= b.cfg.Ratio*float64(answered)
	}
	if trip {
		b.tripped = c
	}
	return trip
}

// stateChanged runs under gobreaker's lock: it must not call the breaker's
// methods (State would deadlock). It only queues the change: onChange (a
// log line, a metric) could take its time, and every request to the
// upstream would wait for it on that lock.
func (b *Breaker) stateChanged(_ string, from, to gobreaker.State) {
	ch := BreakerChange{Upstream: b.upstream, From: stateOf(from), To: stateOf(to)}
	switch {
	case to == gobreaker.StateOpen && b.fleetTrips.Load() > 0:
		ch.Reason = "the fleet's tally of failures reached the threshold"
	case to == gobreaker.StateOpen && from == gobreaker.StateClosed:
		ch.Counts = countsOf(b.tripped)
		if b.cfg.Failures > 0 && b.tripped.ConsecutiveFailures >= uint32(b.cfg.Failures) {
			ch.Reason = fmt.Sprintf("%d consecutive failures", b.tripped.ConsecutiveFailures)
		} else {
			answered := b.tripped.TotalSuccesses + b.tripped.TotalFailures
			ch.Reason = fmt.Sprintf("%d of %d requests failed within %s (ratio %g)", b.tripped.TotalFailures, answered, b.cfg.Window, b.cfg.Ratio)
		}
	case to == gobreaker.StateOpen:
		ch.Reason = "a half-open probe failed"
	case to == gobreaker.StateHalfOpen:
		ch.Reason = fmt.Sprintf("open for %s; letting %d probe(s) through", b.cfg.Open, b.cfg.Probes)
	case to == gobreaker.StateClosed:
		ch.Reason = fmt.Sprintf("%d probe(s) succeeded", b.cfg.Probes)
	}
	if to == gobreaker.StateOpen {
		// gobreaker's own expiry is a moment earlier, so Retry-After
		// computed from this never sends a client back too soon.
		ch.Until = time.Now().Add(b.cfg.Open)
		b.openUntil.Store(ch.Until.UnixNano())
	}
	if b.onChange != nil {
		b.changesMu.Lock()
		b.changes = append(b.changes, ch)
		b.changesMu.Unlock()
	}
}

// deliver tells onChange the queued state changes. It runs after each call
// into gobreaker, outside its lock. One caller delivers at a time and takes
// over the changes the others queue meanwhile, so that changes are told in
// the order they happened, and only the caller that delivers waits for a
// slow onChange (golang-lru calls its eviction callback after Unlock for
// the same reason).
func (b *Breaker) deliver() {
	b.changesMu.Lock()
	if b.delivering || len(b.changes) == 0 {
		b.changesMu.Unlock()
		return
	}
	b.delivering = true
	defer func() {
		// Also when onChange panics: the next caller delivers the rest.
		b.changesMu.Lock()
		b.delivering = false
		b.changesMu.Unlock()
	}()
	for len(b.changes) > 0 {
		batch := b.changes
		b.changes = nil
		b.changesMu.Unlock()
		for _, ch := range batch {
			b.onChange(ch)
		}
		b.changesMu.Lock()
	}
	b.changesMu.Unlock()
}

// state is gobreaker's state now; asking may turn an open breaker whose
// time is up half-open.
func (b *Breaker) state() gobreaker.State {
	s := b.cb.State()
	b.deliver()
	return s
}

// Upstream is the address the breaker is for.
func (b *Breaker) Upstream() string { return b.upstream }

// State is the breaker's state now (an open breaker whose time is up turns
// half-open here).
func (b *Breaker) State() BreakerState {
	if !b.fleetOpenUntil(time.Now()).IsZero() {
		return BreakerOpen
	}
	return stateOf(b.state())
}

// ready reports whether a request would be let through now: closed, or
// half-open with a probe slot free. Allow is the authoritative check.
func (b *Breaker) ready() bool {
	if !b.fleetOpenUntil(time.Now()).IsZero() {
		return false
	}
	switch b.state() {
	case gobreaker.StateClosed:
		return true
	case gobreaker.StateHalfOpen:
		c := b.cb.Counts()
		return c.Requests-min(c.Requests, c.TotalExclusions) < uint32(b.cfg.Probes)
	default:
		return false
	}
}

// allow lets a request through and returns its ticket, or says when to try
// again.
func (b *Breaker) allow(now time.Time) (ticket, time.Time, bool) {
	b.lastUsed.Store(now.UnixNano())
	if until := b.fleetOpenUntil(now); !until.IsZero() {
		return ticket{}, until, false
	}
	done, err := b.cb.Allow()
	b.deliver()
	if err == nil {
		return ticket{b: b, done: done}, time.Time{}, true
	}
	return ticket{}, b.retryAt(now), false
}

// retryAt is when a refused request may try again: when an open breaker
// starts probing, or in a second while half-open probes decide.
func (b *Breaker) retryAt(now time.Time) time.Time {
	if until := b.fleetOpenUntil(now); !until.IsZero() {
		return until
	}
	if until := time.Unix(0, b.openUntil.Load()); until.After(now) {
		return until
	}
	return now.Add(time.Second)
}

// status describes the breaker now.
func (b *Breaker) status(now time.Time) BreakerStatus {
	st := BreakerStatus{Upstream: b.upstream, State: b.State(), Counts: countsOf(b.cb.Counts()), Settings: b.settings}
	if st.State == BreakerOpen {
		until := b.retryAt(now)
		st.OpenUntil = &until
	}
	return st
}

// RetryAfter is the value of a Retry-After header for an answer given
// instead of the upstream's until at: whole seconds, rounded up, at least 1.
func RetryAfter(until, now time.Time) int64 {
	return max(1, int64(math.Ceil(until.Sub(now).Seconds())))
}

// maxBreakers is where Breakers starts pruning: upstream addresses come from
// configuration, but dynamic upstreams (SRV, A records) can churn.
const maxBreakers = 4096

// pruneIdle is how long a closed breaker must have been unused to be pruned.
const pruneIdle = 10 * time.Minute

// Breakers is a set of breakers keyed by upstream address and settings, so
// that handlers in front of one upstream with the same settings share its
// state. A server keeps one for the whole process, so that a configuration
// reload keeps every breaker's state.
type Breakers struct {
	onChange func(BreakerChange)

	mu         sync.RWMutex
	byID       map[breakerID]*Breaker
	byUpstream map[string][]*Breaker
}

type breakerID struct{ upstream, settings string }

// NewBreakers makes an empty set. onChange (may be nil) is told of every
// state change of every breaker, once, in order, after the breaker's lock
// is released, by the request that caused the change (or by the next one
// to ask the breaker, while that one is still telling an earlier change).
func NewBreakers(onChange func(BreakerChange)) *Breakers {
	return &Breakers{onChange: onChange, byID: map[breakerID]*Breaker{}, byUpstream: map[string][]*Breaker{}}
}

// Breaker returns the breaker of upstream for cfg (zero fields: their
// defaults), made on first use.
func (s *Breakers) Breaker(upstream string, cfg BreakerConfig) *Breaker {
	cfg = cfg.WithDefaults()
	return s.get(upstream, cfg.fingerprint(), cfg)
}

func (s *Breakers) get(upstream, settings string, cfg BreakerConfig) *Breaker {
	id := breakerID{upstream, settings}
	s.mu.RLock()
	b := s.byID[id]
	s.mu.RUnlock()
	if b != nil {
		return b
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if b = s.byID[id]; b != nil {
		return b
	}
	if len(s.byID) >= maxBreakers {
		s.pruneLocked(time.Now())
	}
	b = newBreaker(upstream, cfg, s.onChange)
	s.byID[id] = b
	s.byUpstream[upstream] = append(s.byUpstream[upstream], b)
	return b
}

// pruneLocked drops closed breakers nobody used for pruneIdle. An engine
// that still holds one keeps using it on its own; a new one starts closed,
// as the pruned one was.
func (s *Breakers) pruneLocked(now time.Time) {
	for id, b := range s.byID {
		// Not b.State(): that delivers changes, which must not wait under s.mu.
		if now.Sub(time.Unix(0, b.lastUsed.Load())) < pruneIdle || b.cb.State() != gobreaker.StateClosed {
			continue
		}
		delete(s.byID, id)
		list := s.byUpstream[id.upstream]
		for i, x := range list {
			if x == b {
				list = append(list[:i:i], list[i+1:]...)
				break
			}
		}
		if len(list) == 0 {
			delete(s.byUpstream, id.upstream)
		} else {
			s.byUpstream[id.upstream] = list
		}
	}
}

// Refusing reports whether some breaker of upstream (any settings) refuses
// requests now.
func (s *Breakers) Refusing(upstream string) bool {
	s.mu.RLock()
	list := s.byUpstream[upstream]
	s.mu.RUnlock()
	for _, b := range list {
		if !b.ready() {
			return true
		}
	}
	return false
}

// Snapshot describes every breaker, ordered by upstream.
func (s *Breakers) Snapshot() []BreakerStatus {
	s.mu.RLock()
	list := make([]*Breaker, 0, len(s.byID))
	for _, b := range s.byID {
		list = append(list, b)
	}
	s.mu.RUnlock()
	now := time.Now()
	out := make([]BreakerStatus, len(list))
	for i, b := range list {
		out[i] = b.status(now)
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].Upstream != out[j].Upstream {
			return out[i].Upstream < out[j].Upstream
		}
		return out[i].Settings < out[j].Settings
	})
	return out
}
