package coalesce

import (
	"context"
	"slices"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
)

// Shared breakers: with a shared tier, every failure an upstream's breaker
// counts here also counts toward the fleet's tally of that upstream's
// failures; when the tally reaches the breaker's failures, the breaker opens
// on every server for its open period. The tally outlives the opening, so
// that after it the first failed probe of any server opens it again, and a
// success on a server that saw the failures clears it. A breaker that trips
// on a ratio alone (failures 0) is not shared.

// tellFleet counts one verdict of b's upstream toward the fleet's tally.
func (e *Engine) tellFleet(b *Breaker, v verdict) {
	t := e.tier
	if t == nil || b == nil || b.cfg.Failures <= 0 {
		return
	}
	switch v {
	case failure:
		b.fleetFailing.Store(true)
		_, _ = t.Failure(context.Background(), b.upstream, b.cfg.Failures, b.cfg.Window+b.cfg.Open, b.cfg.Open)
	case success:
		if b.fleetFailing.Swap(false) {
			_ = t.Success(context.Background(), b.upstream)
		}
	}
}

// fleetOpen opens every breaker of upstream until then: the fleet's tally
// of its failures reached the failures of its breakers.
func (s *Breakers) fleetOpen(upstream string, until time.Time) {
	s.mu.RLock()
	opened := slices.Clone(s.byUpstream[upstream])
	s.mu.RUnlock()
	for _, b := range opened {
		if b.cfg.Failures <= 0 {
			continue // trips on a ratio alone: not shared
		}
		b.fleetFailing.Store(true)
		if until.UnixNano() > b.fleetUntil.Load() {
			b.fleetUntil.Store(until.UnixNano())
		}
		b.tripByFleet()
	}
}

// tripByFleet opens b itself, as its own failures would: the fleet's
// opening is then b's, with its log line, its metric and its counts, and
// when it ends b is half-open and lets its probes through, where a breaker
// still closed underneath would let every request through at once. The
// trip is told to gobreaker as one failed request (in half-open, the probe
// slot it takes fails); an open breaker, or a half-open one whose probes
// are all out, stays as it is, with the fleet's deadline over it.
func (b *Breaker) tripByFleet() {
	b.fleetTrips.Add(1)
	done, err := b.cb.Allow()
	if err == nil {
		done(errFailed)
	}
	b.fleetTrips.Add(-1)
	b.deliver()
}

// fleetOpenUntil is when the fleet's opening of b ends, or zero when the
// fleet has not opened it (or no longer does).
func (b *Breaker) fleetOpenUntil(now time.Time) time.Time {
	ns := b.fleetUntil.Load()
	if ns == 0 || now.UnixNano() >= ns {
		return time.Time{}
	}
	return time.Unix(0, ns)
}

// openTier opens the shared tier of an engine; breaker trips the fleet
// announces open the engine's breakers.
func (c *core) openTier(opts fleet.Options) (*fleet.Tier, error) {
	if c.guard != nil {
		set, user := c.guard.set, opts.OnBreakerOpen
		opts.OnBreakerOpen = func(upstream string, until time.Time) {
			set.fleetOpen(upstream, until)
			if user != nil {
				user(upstream, until)
			}
		}
	}
	return fleet.Open(opts)
}

// upstream is the upstream that answered the passage's request, or "".
func (p *passage) upstream() string {
	if p == nil || p.answered == nil {
		return ""
	}
	return p.answered.upstream
}
