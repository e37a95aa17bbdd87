package coalesce

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// How an engine decides, before a request goes upstream, which breaker
// guards it.
//
// The upstream that answers a request is known only afterwards
// (Hooks.Upstream), so each engine (each WithHooks: in Caddy, each handler
// of each config load) remembers the upstreams its requests went to
// (seenUpstreams) and guards the next request with them:
//
//   - One upstream seen (a route with one upstream, the common case): its
//     breaker must let the request through before next is called. While it
//     is open the engine answers itself (stale copy or 503 + Retry-After);
//     when it is half-open only Probes requests get through.
//   - Several seen (a pool without `lb_policy breaker`): the engine cannot
//     tell which member will be chosen, so it answers itself only when every
//     one of them refuses; otherwise the request goes on and its outcome is
//     reported afterwards.
//   - A load-balancing policy that knows the breakers (a Pick in the
//     request's context was used): the policy chooses among the members
//     whose breakers let the request through and takes the probe slots, and
//     the engine only reports the outcome to the breaker the policy chose.
//     Once a policy has been seen, the engine stops guessing for a while
//     (steerForget), so that probe slots are never taken twice. The policy
//     needs no learning: it is exact from the first request.
//   - Nothing seen yet (the first requests of an engine): requests go on,
//     and teach it.
//
// What an engine learned is never inherited, not even by the next config
// load's handler in front of the same route: the reload may be the very
// edit that moved the route off a dead upstream, and an inherited guess
// would answer 503 for the new upstream until the old one's breaker
// half-opened. The cost: after a reload, the requests that arrive before
// the first answer go upstream even if its breaker (which the reload keeps)
// is open; the first answer teaches the engine. `lb_policy breaker` avoids
// even that. An upstream that has answered none of the engine's requests
// for forgetUpstream, while another one did, is forgotten.
const (
	maxSeen        = 16
	forgetUpstream = time.Minute
	steerForget    = time.Minute
)

// defaultUpstream names the one upstream of an engine without
// Hooks.Upstream.
const defaultUpstream = "default"

// statusClientClosed is the status reverse proxies (NGINX, Caddy) log when
// the client went away before the answer.
const statusClientClosed = 499

// guard is the breaker side of an engine, shared by engines made with
// WithHooks.
type guard struct {
	cfg      BreakerConfig
	set      *Breakers
	settings string
}

func newGuard(cfg Config) *guard {
	if cfg.Breaker.Disabled {
		return nil
	}
	set := cfg.Breakers
	if set == nil {
		set = NewBreakers(nil)
	}
	return &guard{cfg: cfg.Breaker, set: set, settings: cfg.Breaker.fingerprint()}
}

func (g *guard) breaker(upstream string) *Breaker { return g.set.get(upstream, g.settings, g.cfg) }

// seenUpstreams is a small copy-on-write list: read on every upstream
// request, written when an upstream is seen for the first time.
type seenUpstreams struct {
	mu        sync.Mutex
	list      atomic.Pointer[[]*seenUpstream]
	pruned    atomic.Int64 // unix ns
	steeredAt atomic.Int64 // unix ns of the last request a policy steered
}

type seenUpstream struct {
	b    *Breaker
	last atomic.Int64 // unix ns of its last answer
}

func (s *seenUpstreams) load() []*seenUpstream {
	if p := s.list.Load(); p != nil {
		return *p
	}
	return nil
}

// saw records that b's upstream answered a request.
func (s *seenUpstreams) saw(b *Breaker, now time.Time) {
	list := s.load()
	for _, u := range list {
		if u.b == b {
			u.last.Store(now.UnixNano())
			if len(list) > 1 && now.UnixNano()-s.pruned.Load() > int64(forgetUpstream) {
				s.update(nil, now)
			}
			return
		}
	}
	s.update(b, now)
}

// update adds b (if not nil and not there) and forgets upstreams that have
// not answered for forgetUpstream; at most maxSeen stay, the most recent.
func (s *seenUpstreams) update(b *Breaker, now time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pruned.Store(now.UnixNano())
	old := s.load()
	next := make([]*seenUpstream, 0, len(old)+1)
	for _, u := range old {
		if u.b == b {
			u.last.Store(now.UnixNano())
			b = nil
		}
		if now.UnixNano()-u.last.Load() <= int64(forgetUpstream) {
			next = append(next, u)
		}
	}
	if b != nil {
		u := &seenUpstream{b: b}
		u.last.Store(now.UnixNano())
		next = append(next, u)
	}
	if len(next) > maxSeen {
		slices.SortFunc(next, func(a, b *seenUpstream) int { return int(b.last.Load() - a.last.Load()) })
		next = next[:maxSeen]
	}
	s.list.Store(&next)
}

// passage is one upstream request's way through the breakers: what was let
// through before next, and where the outcome goes afterwards.
type passage struct {
	e       *Engine
	pick    *Pick
	pre     *Breaker // the one known upstream, asked before next
	preDone ticket
	settled bool
}

// admit is asked before r goes upstream. It returns the request to send
// (carrying a Pick for a load-balancing policy) and its passage, or, when
// the upstream's breaker refuses, the time it lets requests through again.
// The passage (nil when breakers are off) must be settled or released.
func (e *Engine) admit(r *http.Request) (*http.Request, *passage, time.Time) {
	g := e.guard
	if g == nil {
		return r, nil, time.Time{}
	}
	now := time.Now()
	p := &passage{e: e, pick: &Pick{set: g.set, cfg: g.cfg, settings: g.settings}}
	if now.UnixNano()-e.seen.steeredAt.Load() > int64(steerForget) {
		if e.hooks.Upstream == nil {
			p.pre = g.breaker(defaultUpstream)
		} else if seen := e.seen.load(); len(seen) == 1 {
			p.pre = seen[0].b
		} else if until := refusingUntil(seen, now); !until.IsZero() {
			return r, nil, until
		}
		if p.pre != nil {
			done, retry, ok := p.pre.allow(now)
			if !ok {
				return r, nil, retry
			}
			p.preDone = done
		}
	}
	return r.WithContext(context.WithValue(r.Context(), pickKey{}, p.pick)), p, time.Time{}
}

// refusingUntil returns, when every one of several upstreams refuses
// requests, the time the first lets them through again; zero otherwise.
func refusingUntil(seen []*seenUpstream, now time.Time) time.Time {
	if len(seen) < 2 {
		return time.Time{}
	}
	var first time.Time
	for _, u := range seen {
		if u.b.ready() {
			return time.Time{}
		}
		if at := u.b.retryAt(now); first.IsZero() || at.Before(first) {
			first = at
		}
	}
	return first
}

// settle reports the outcome of the request r that next answered with err
// and status. When a load-balancing policy found every member refusing, it
// returns the time the first one lets requests through again: the caller
// answers as for an open breaker.
func (p *passage) settle(r *http.Request, err error, status int) time.Time {
	if p == nil || p.settled {
		return time.Time{}
	}
	p.settled = true
	e, g := p.e, p.e.guard
	v := e.verdict(r, err, status)
	now := time.Now()
	if pk := p.pick; pk.used {
		// The policy decided; what the engine let through is not counted.
		e.seen.steeredAt.Store(now.UnixNano())
		p.preDone.report(excluded)
		if pk.done != nil {
			pk.done.report(v)
			pk.done = nil
			e.seen.saw(pk.chosen, now)
		}
		if err != nil && !pk.none.IsZero() {
			return pk.none
		}
		return time.Time{}
	}
	up := defaultUpstream
	if e.hooks.Upstream != nil {
		up = e.hooks.Upstream(r)
	}
	if up == "" {
		// The request reached no upstream.
		p.preDone.report(excluded)
		return time.Time{}
	}
	b := g.breaker(up)
	e.seen.saw(b, now)
	if b == p.pre {
		p.preDone.report(v)
		return time.Time{}
	}
	// Another upstream answered than the one guessed (the engine is still
	// learning, or serves a pool without the policy): the guess is not
	// counted, and the outcome goes to the upstream that answered, if its
	// breaker takes it (an open one does not).
	p.preDone.report(excluded)
	if done, _, ok := b.allow(now); ok {
		done.report(v)
	}
	return time.Time{}
}

// release reports a request that ended without settle (a panic) as not
// counted, so that no probe slot stays taken.
func (p *passage) release() {
	if p == nil || p.settled {
		return
	}
	p.settled = true
	p.preDone.report(excluded)
	p.pick.done.report(excluded)
	p.pick.done = nil
}

// verdict classifies an upstream request: its context ended (every client
// went away, or a refresh's own timeout) or it was the client's cancel:
// excluded; an error that Hooks.UpstreamFailed calls a failure, or a status
// in Statuses: failure; anything else: success.
func (e *Engine) verdict(r *http.Request, err error, status int) verdict {
	if r.Context().Err() != nil {
		return excluded
	}
	if err != nil {
		if e.hooks.UpstreamFailed != nil {
			if e.hooks.UpstreamFailed(err) {
				return failure
			}
			return excluded
		}
		if errors.Is(err, context.Canceled) {
			return excluded
		}
		return failure
	}
	if status == statusClientClosed {
		return excluded
	}
	if slices.Contains(e.guard.cfg.Statuses, status) {
		return failure
	}
	return success
}

// forward sends r upstream on its own (bypassed, or not collapsible) under
// the breaker. cacheStatus is its Cache-Status member; key is zero for a
// bypassed request (no stored copy can stand in for it).
func (e *Engine) forward(w http.ResponseWriter, r *http.Request, next Next, key Key, cacheStatus string, ev Event) error {
	ur, pass, until := e.admit(r)
	if !until.IsZero() {
		return e.refuse(w, r, key, until)
	}
	sw := &statusWriter{ResponseWriter: w, cacheStatus: cacheStatus}
	if pass == nil {
		e.observe(r, ev)
		err := next(sw, r)
		sw.tag()
		return err
	}
	defer pass.release()
	err := next(sw, ur)
	if until := pass.settle(ur, err, sw.status); !until.IsZero() && err != nil && sw.status == 0 {
		return e.refuse(w, r, key, until)
	}
	sw.tag()
	e.observe(r, ev)
	return err
}

// refuse answers for an upstream whose breaker is open: the last good copy
// when stale_if_error allows, else 503 with Retry-After.
func (e *Engine) refuse(w http.ResponseWriter, r *http.Request, key Key, until time.Time) error {
	if key != (Key{}) {
		if ent := e.spare(key, r); ent != nil {
			ent.writeStale(w, r, "", time.Now())
			e.observe(r, Event{Outcome: OutcomeStale, Key: key, Detail: detailBreakerOpen})
			return nil
		}
	}
	writeOpen(w, r, "", until)
	e.observe(r, Event{Outcome: OutcomeBreakerOpen, Key: key, Detail: detailBreakerOpen})
	return nil
}

// refuseFlight is refuse for a leader: its followers get the same answer.
func (e *Engine) refuseFlight(w http.ResponseWriter, r *http.Request, f *registry.Flight[*result], key Key, until time.Time) error {
	ev := Event{Outcome: OutcomeBreakerOpen, Key: key, Detail: detailBreakerOpen, Waiters: f.Waiters()}
	if ent := e.spare(key, r); ent != nil {
		f.Publish(&result{stale: ent}, nil)
		ent.writeStale(w, r, "", time.Now())
		ev.Outcome = OutcomeStale
		e.observe(r, ev)
		return nil
	}
	f.Publish(&result{openUntil: until}, nil)
	writeOpen(w, r, "", until)
	e.observe(r, ev)
	return nil
}

const detailBreakerOpen = "breaker-open"

// writeOpen answers 503 for an open breaker; collapsed is "collapsed; " for
// a follower.
func writeOpen(w http.ResponseWriter, r *http.Request, collapsed string, until time.Time) {
	h := w.Header()
	h.Set("Retry-After", strconv.FormatInt(RetryAfter(until, time.Now()), 10))
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Add("Cache-Status", fmt.Sprintf("%s; fwd=bypass; %sdetail=%s", CacheName, collapsed, detailBreakerOpen))
	w.WriteHeader(http.StatusServiceUnavailable)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, "503 Service Unavailable: the upstream is failing; retry later\n")
	}
}

// statusWriter notes the status of a response that goes straight to the
// client, for the breaker. http.ResponseController reaches the writer
// beneath (flushes, hijacking for WebSocket, deadlines) through Unwrap.
//
// It appends cacheStatus to Cache-Status when the header goes out (or, if
// nothing was written, when next returns, for the error response): after
// the members of caches behind it, which reverse_proxy adds to the header
// map while it copies the upstream's header (RFC 9211: each cache appends).
type statusWriter struct {
	http.ResponseWriter
	status      int
	cacheStatus string
	tagged      bool
}

func (w *statusWriter) tag() {
	if !w.tagged {
		w.tagged = true
		w.ResponseWriter.Header().Add("Cache-Status", w.cacheStatus)
	}
}

func (w *statusWriter) WriteHeader(code int) {
	if w.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		w.status = code
		w.tag()
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *statusWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
		w.tag()
	}
	return w.ResponseWriter.Write(p)
}

func (w *statusWriter) Flush() {
	if w.status == 0 {
		w.status = http.StatusOK
		w.tag()
	}
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *statusWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
