package coalesce

// The load-balancing policy's side of the pool-steering protocol: the Pick
// a request carries in its context, through which a policy that knows the
// breakers chooses among a pool's members (see steering.go).

import (
	"context"
	"net/http"
	"time"
)

// Pick is one request's slot for a load-balancing policy that knows the
// breakers: the engine puts it in the context of the request it sends
// upstream, the policy chooses a member whose breaker lets the request
// through (taking a probe slot when half-open), and the engine reports the
// outcome to that member's breaker when the request is done. Its methods are
// called from the request's goroutine, or, once the response headers are
// in, under the leader's recorder lock (a late flush that turns the
// response into a stream settles the passage).
type Pick struct {
	g *guard // the engine's breakers

	used   bool
	req    *http.Request // of the last selection, to tell a retry from another proxy
	chosen *Breaker
	done   ticket
	tried  []string
	// none is set when the last selection found every member refusing: when
	// the first of them lets requests through again.
	none time.Time

	// held is the breaker the engine guessed before the policy ran, and
	// heldDone the ticket it gave (none when it let the request through on
	// its flight's account): passed on when the policy takes that member,
	// given back when it takes another.
	held     *Breaker
	heldDone ticket
	// admitted is the breaker that let the request's flight through (see
	// passage.admitted).
	admitted *Breaker
}

// onFlightsAccount reports whether b, which refused the request, lets it
// through all the same: b let its flight through, and is half-open (its
// probe slots are taken, by that flight among others), not open.
func (p *Pick) onFlightsAccount(b *Breaker) bool {
	return b != nil && b == p.admitted && b.State() == BreakerHalfOpen
}

// releaseHeld gives the guessed ticket back, uncounted.
func (p *Pick) releaseHeld() {
	p.heldDone.report(excluded)
	p.held, p.heldDone = nil, ticket{}
}

type pickKey struct{}

// pickContext carries a passage's Pick to the load-balancing policy. It
// wraps the context the request is sent in (send's, with the timeout's
// cancel), so that each upstream request costs one context and one copy
// of the request rather than one for the Pick and one for the timeout.
// Every other value, Done and Err are its parent's: a context derived from
// it is registered with that parent as with any cancellable context.
type pickContext struct {
	context.Context
	pick *Pick
}

func (c *pickContext) Value(key any) any {
	if _, ok := key.(pickKey); ok {
		return c.pick
	}
	return c.Context.Value(key)
}

// PickFrom returns the request's slot, or nil when no engine with breakers
// sent the request.
func PickFrom(ctx context.Context) *Pick {
	p, _ := ctx.Value(pickKey{}).(*Pick)
	return p
}

// Begin starts a selection for req. A policy that selects again for the
// same req does so because the member it chose failed (reverse_proxy
// retries only after an error), so that member's breaker is told; a
// selection for another request (a second proxy in the same chain) leaves
// the first one uncounted.
func (p *Pick) Begin(req *http.Request) {
	if p.done.taken() {
		if req == p.req {
			p.done.report(failure)
		} else {
			p.done.report(excluded)
		}
		p.done = ticket{}
	}
	if req != p.req {
		p.tried = p.tried[:0]
	}
	p.used, p.req, p.chosen, p.none = true, req, nil, time.Time{}
}

// Ready reports whether upstream's breaker would let this request through.
func (p *Pick) Ready(upstream string) bool {
	b := p.g.breaker(upstream)
	return b == p.held || b.ready() || p.onFlightsAccount(b)
}

// Tried reports whether this request already went to upstream (and failed
// there) in this selection's retries.
func (p *Pick) Tried(upstream string) bool {
	for _, u := range p.tried {
		if u == upstream {
			return true
		}
	}
	return false
}

// Take asks upstream's breaker to let this request through; false means it
// refused (it opened meanwhile, or its probe slots are taken) and the policy
// should choose another member.
func (p *Pick) Take(upstream string) bool {
	b := p.g.breaker(upstream)
	var done ticket
	if b == p.held {
		// The engine's guess: its ticket is this request's.
		done, p.held, p.heldDone = p.heldDone, nil, ticket{}
	} else {
		p.releaseHeld()
		var ok bool
		if done, _, ok = b.allow(time.Now()); !ok && !p.onFlightsAccount(b) {
			return false
		}
	}
	p.chosen, p.done = b, done
	p.tried = append(p.tried, upstream)
	return true
}

// NoneReady records that no member of upstreams could take the request.
func (p *Pick) NoneReady(upstreams []string) {
	now := time.Now()
	var first time.Time
	for _, u := range upstreams {
		at := p.g.breaker(u).retryAt(now)
		if first.IsZero() || at.Before(first) {
			first = at
		}
	}
	if first.IsZero() {
		first = now.Add(time.Second)
	}
	p.none = first
}
