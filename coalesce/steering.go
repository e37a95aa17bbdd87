package coalesce

// The pool-steering protocol: which breaker guards a request before it goes
// upstream (admit), and where its outcome is counted afterwards (settle). The
// slot a load-balancing policy that knows the breakers uses to choose among a
// pool's members (Pick) is in pick.go.

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"
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
//     (steerForget). When it guesses again and the guess took a probe slot,
//     the slot passes to the policy if it picks that member, and goes back
//     if it picks another: a request never competes with itself for a
//     probe. The policy needs no learning: it is exact from the first
//     request.
//   - A follower whose flight's answer it cannot use goes upstream on its
//     own, on its flight's account (admitted): the breaker that let the
//     flight through lets it through too, without a probe slot of its own,
//     unless it is open, so that no client is refused because its own
//     flight holds the probe.
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

// guard is the breaker side of an engine, shared by engines made with
// WithHooks.
type guard struct {
	cfg      BreakerConfig
	set      *Breakers
	settings string
	due      *dueHeaders // nil without a timeout
}

func newGuard(cfg Config) *guard {
	if cfg.Breaker.Disabled {
		return nil
	}
	set := cfg.Breakers
	if set == nil {
		set = NewBreakers(nil)
	}
	g := &guard{cfg: cfg.Breaker, set: set, settings: cfg.Breaker.fingerprint()}
	if cfg.Breaker.Timeout > 0 {
		g.due = newDueHeaders(cfg.Breaker.Timeout)
	}
	return g
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
	e    *Engine
	pick *Pick
	pre  *Breaker // the one known upstream, asked before next; its ticket is pick.held
	// cut: the breaker's timeout cut the request (see send). Set when
	// next returns, while the recorder's timer may report a stream (settle)
	// from its own goroutine.
	cut     atomic.Bool
	settled bool
	// answered is the breaker the outcome went to, and ok whether the
	// outcome was not a failure: then the flight's followers may go on its
	// account (admitted).
	answered *Breaker
	ok       bool

	// Where pick, and send's context and header watch, live: one
	// allocation with the passage on every upstream request.
	slot  Pick
	ctx   pickContext
	watch headerWatch
	// cancel ends ctx's parent, when that is the caller's own (see
	// context): the breaker's timeout cuts the request with it.
	cancel canceller
}

// canceller ends a context with a cause: a flight (its Cancel), or a
// cancelFunc. An interface rather than a func, so that a flight's is not a
// method value allocated on every request.
type canceller interface{ Cancel(cause error) }

type cancelFunc context.CancelCauseFunc

func (c cancelFunc) Cancel(cause error) { c(cause) }

// context returns parent with the passage's Pick in it, for the request
// that send sends. cancel ends parent, a context that is the request's alone
// (a flight's): the breaker's timeout cuts the request with it rather than
// with a context of its own (one context and one copy of the request fewer
// on every flight). Only send calls it with a nil cancel, for a request it
// does not time.
func (p *passage) context(parent context.Context, cancel canceller) context.Context {
	if p == nil {
		return parent
	}
	p.ctx.Context, p.ctx.pick, p.cancel = parent, p.pick, cancel
	return &p.ctx
}

// admit is asked before a request goes upstream. It returns the request's
// passage (send sends the request with the passage's Pick for a
// load-balancing policy), or, when the upstream's breaker refuses, the time
// it lets requests through again. into is where the passage is made (a
// part of a larger value: one allocation fewer), nil for one of its own.
// admitted is the breaker that let the request's flight through, for a
// follower that goes upstream on its own (nil otherwise). The passage (nil
// when breakers are off) must be settled or released. now is the time
// of the request (a flight's start: one clock read fewer).
func (e *Engine) admit(into *passage, admitted *Breaker, now time.Time) (*passage, time.Time) {
	g := e.guard
	if g == nil {
		return nil, time.Time{}
	}
	p := into
	if p == nil {
		p = new(passage)
	}
	p.e = e
	p.slot = Pick{g: g, admitted: admitted}
	p.pick = &p.slot
	if now.UnixNano()-e.seen.steeredAt.Load() > int64(steerForget) {
		if e.hooks.Upstream == nil {
			p.pre = g.breaker(defaultUpstream)
		} else if seen := e.seen.load(); len(seen) == 1 {
			p.pre = seen[0].b
		} else if until := refusingUntil(seen, now); !until.IsZero() && !p.pick.onFlightsAccount(admitted) {
			return nil, until
		}
		if p.pre != nil {
			done, retry, ok := p.pre.allow(now)
			if !ok && !p.pick.onFlightsAccount(p.pre) {
				return nil, retry
			}
			p.pick.held, p.pick.heldDone = p.pre, done
		}
	}
	return p, time.Time{}
}

// admitted is the breaker that let this request through on a healthy
// answer, for the followers of its flight that go upstream on their own;
// nil when the answer was a failure or reached no upstream.
func (p *passage) admitted() *Breaker {
	if p == nil || !p.ok {
		return nil
	}
	return p.answered
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
	if p.cut.Load() {
		v = failure
	}
	now := time.Now()
	pk := p.pick
	if pk.used {
		// The policy decided; a guess it did not take is not counted.
		e.seen.steeredAt.Store(now.UnixNano())
		pk.releaseHeld()
		if pk.chosen != nil {
			p.count(pk.chosen, pk.done, v, now)
			pk.done = ticket{}
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
		pk.releaseHeld()
		return time.Time{}
	}
	b := pk.held // the guess, most often right: no lookup
	if b == nil || b.upstream != up {
		b = g.breaker(up)
	}
	var done ticket
	if b == pk.held {
		done, pk.held, pk.heldDone = pk.heldDone, nil, ticket{}
	} else {
		// Another upstream answered than the one guessed (the engine is
		// still learning, or serves a pool without the policy): the guess
		// is not counted.
		pk.releaseHeld()
	}
	p.count(b, done, v, now)
	return time.Time{}
}

// count reports v to b with the ticket done that b gave the request; with
// none (the request went on its flight's account, or to another upstream
// than the one guessed), the outcome is counted if b takes it now (an open
// breaker, or a half-open one with its probe slots taken, does not).
func (p *passage) count(b *Breaker, done ticket, v verdict, now time.Time) {
	p.e.seen.saw(b, now)
	p.answered, p.ok = b, v != failure
	if !done.taken() {
		var ok bool
		if done, _, ok = b.allow(now); !ok {
			return
		}
	}
	done.report(v)
	p.e.tellFleet(b, v)
}

// release reports a request that ended without settle (a panic) as not
// counted, so that no probe slot stays taken.
func (p *passage) release() {
	if p == nil || p.settled {
		return
	}
	p.settled = true
	p.pick.releaseHeld()
	p.pick.done.report(excluded)
	p.pick.done = ticket{}
}

// verdict classifies an upstream request (one the breaker's timeout cut is
// a failure before it gets here): its context ended (every client went
// away, or a refresh's own timeout) or it was the client's cancel:
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
	if status == StatusClientClosed {
		return excluded
	}
	if e.failureStatus(status) {
		return failure
	}
	return success
}

// failureStatus reports whether the breaker counts status as a failure.
func (e *Engine) failureStatus(status int) bool {
	return e.guard != nil && slices.Contains(e.guard.cfg.Statuses, status)
}
