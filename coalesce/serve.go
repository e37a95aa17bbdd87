package coalesce

import (
	"errors"
	"net/http"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// Serve handles one request: from the micro-cache, as a follower of an
// identical request in flight, as the leader that calls next, or as a
// subscriber of an event stream.
func (e *Engine) Serve(w http.ResponseWriter, r *http.Request, next Next) error {
	if e.hooks.Disabled != nil && e.hooks.Disabled() {
		return e.bypass(w, r, next, "disabled", fwdBypass)
	}
	if e.fansOut(r) {
		sub, err := e.joinStream(w, r, next)
		if sub == nil {
			return err
		}
		// The subscriber's goroutine waits here for as long as the client
		// stays, under small frames (0.7 KiB with Serve's; joinStream's
		// and serve's are 1.5 and 0.5 KiB): the runtime halves a stack
		// only while less than a quarter of it is in use, and below
		// Caddy's 5.7 KiB of frames that keeps a stack that grew to 32 KiB
		// shrinkable to 16 KiB.
		_ = sub.Serve(w, r) // a write error is the client going away
		return nil
	}
	return e.serve(w, r, next)
}

// serve answers a request that is not an event stream's subscriber.
func (e *Engine) serve(w http.ResponseWriter, r *http.Request, next Next) error {
	if detail, fwd := bypassReason(r); detail != "" {
		return e.bypass(w, r, next, detail, fwd)
	}
	now := time.Now()
	key := e.keys.derive(r, r.Method)
	noCache := requestCacheControl(r.Header).noCache
	// alone: r carries Authorization under public, and the key's last
	// response to such a request was its requester's alone. It may still
	// use a stored copy or a flight in progress (of a request without
	// Authorization, or whose answer says it may be shared).
	alone := e.keys.authorizedUnderPublic(r) && e.hitForMiss.has(key.authorized(), now)
	// fwd says why the request goes upstream (RFC 9211): no usable copy, or
	// one stored for a request that differs in a field the response varies on.
	fwd := fwdURIMiss

	var getKey Key // a HEAD's GET: its entry and its flight answer the HEAD too
	if r.Method == http.MethodHead {
		getKey = e.keys.derive(r, http.MethodGet)
	}

	if !noCache {
		lookup := key
		var ent *entry
		if r.Method == http.MethodHead {
			// A HEAD is answered from the GET's entry when there is one.
			if ent = e.cache.get(getKey, now); ent != nil {
				lookup = getKey
			}
		}
		if ent == nil {
			ent = e.cache.get(lookup, now)
		}
		varyOK := ent != nil && ent.resp.matchesVary(r)
		if ent != nil && !varyOK && now.Before(ent.stale) {
			fwd = fwdVaryMiss
			if e.cfg.HitForMiss > 0 && e.variants.fields(lookup, now) == nil {
				// The copy says what its key varies on: this request's
				// flight is its variant's (variants.go).
				e.variants.learn(lookup, ent.resp.varyFields, now.Add(e.cfg.HitForMiss))
			}
		} else if varyOK {
			// fresh == stored (ttl 0, kept for stale alone) is never a fresh
			// hit, even for a request that took its time before it looked.
			if now.Before(ent.fresh) && ent.fresh.After(ent.stored) {
				e.cache.hit(ent)
				ent.resp.write(w, r, cacheStatus{hit: true, ttl: ent.fresh.Sub(now), withTTL: true, detailTTL: true}, now.Sub(ent.stored))
				e.observe(r, Event{Outcome: OutcomeHit, Key: key})
				return nil
			}
			if now.Before(ent.stale) {
				if !alone {
					e.refresh(r, lookup, next)
				}
				e.cache.hit(ent)
				ent.resp.write(w, r, cacheStatus{hit: true, fwd: fwdStale, ttl: ent.ttlLeft(now), withTTL: true, detail: detailStaleWhileRevalidate}, now.Sub(ent.stored))
				e.observe(r, Event{Outcome: OutcomeStale, Key: key, Detail: detailStaleWhileRevalidate})
				return nil
			}
		}
	}

	if r.Method == http.MethodHead {
		// A GET in flight answers a HEAD as well as a HEAD of its own would;
		// it never leads one, so no GET waits for a body-less answer.
		gk := e.flightKey(r, getKey, now)
		if f, ok := e.reg.Follow(string(gk[:])); ok {
			return e.follow(w, r, next, f, getKey, fwd)
		}
	}
	if e.hitForMiss.has(key, now) {
		return e.uncollapsible(w, r, next, key, detailUncollapsible, fwdURIMiss, nil)
	}
	note := flightNote{method: r.Method, path: r.URL.Path}
	fk := e.flightKey(r, key, now)
	if fk != key {
		// A variant's flight (variants.go), listed under its key. Under
		// public, a request with Authorization never leads one: its answer
		// may be its own, and the variant's requests would queue behind it.
		base := key
		note.base = &base
		alone = alone || e.keys.authorizedUnderPublic(r)
	}
	if alone {
		if f, ok := e.reg.Follow(string(fk[:])); ok {
			return e.follow(w, r, next, f, key, fwd)
		}
		return e.uncollapsible(w, r, next, key, detailAuthorization, fwdURIMiss, nil)
	}

	f, role := e.reg.JoinUnwatched(r.Context(), string(fk[:]), note)
	switch role {
	case registry.Follower:
		return e.follow(w, r, next, f, key, fwd)
	case registry.Leader:
		return e.lead(w, r, next, f, key, fwd, nil)
	default:
		return e.uncollapsible(w, r, next, key, "registry-full", fwdURIMiss, nil)
	}
}

// follow waits for the leader and writes its response, or goes upstream
// alone when the response cannot be used for this request.
func (e *Engine) follow(w http.ResponseWriter, r *http.Request, next Next, f *registry.Flight[*result], key Key, fwd string) error {
	return e.followFor(w, r, next, f, key, fwd, e.cfg.MaxWait)
}

// followFor is follow waiting at most maxWait (0: no bound).
func (e *Engine) followFor(w http.ResponseWriter, r *http.Request, next Next, f *registry.Flight[*result], key Key, fwd string, maxWait time.Duration) error {
	start := time.Now()
	res, err := f.Wait(r.Context(), maxWait)
	waited := time.Since(start)
	switch {
	case errors.Is(err, registry.ErrWaitTimeout):
		w.Header().Add("Cache-Status", cacheStatus{fwd: fwd, collapsed: true, detail: "wait-timeout"}.String())
		e.observe(r, Event{Outcome: OutcomeTimeout, Key: key, Wait: waited})
		return &StatusError{Status: http.StatusGatewayTimeout, Err: ErrWaitTimeout}
	case err != nil && r.Context().Err() != nil:
		// This client went away; nobody is left to answer.
		e.observe(r, Event{Outcome: OutcomeCollapsed, Key: key, Wait: waited, Detail: "client-gone"})
		return r.Context().Err()
	case err != nil:
		// The leader left without publishing (it panicked or was aborted).
		w.Header().Add("Cache-Status", cacheStatus{fwd: fwd, collapsed: true, detail: "leader-failed"}.String())
		e.observe(r, Event{Outcome: OutcomeError, Key: key, Wait: waited})
		return &StatusError{Status: http.StatusBadGateway, Err: ErrLeaderFailed}
	case res.err != nil && errors.Is(res.err, ErrUpstreamTimeout):
		w.Header().Add("Cache-Status", cutStatus(fwd, true).String())
		e.observe(r, Event{Outcome: OutcomeError, Key: key, Wait: waited, Detail: detailUpstreamTimeout})
		return res.err
	case res.err != nil:
		w.Header().Add("Cache-Status", cacheStatus{fwd: fwd, collapsed: true, detail: detailUpstreamError}.String())
		e.observe(r, Event{Outcome: OutcomeError, Key: key, Wait: waited})
		return res.err
	case res.stale != nil && res.stale.resp.matchesVary(r):
		res.stale.writeStale(w, r, true, time.Now())
		e.observe(r, Event{Outcome: OutcomeStaleIfError, Key: key, Wait: waited, Detail: detailStaleIfError})
		return nil
	case res.stale != nil:
		return e.uncollapsible(w, r, next, key, detailVaryMismatch, fwdVaryMiss, nil)
	case !res.openUntil.IsZero():
		writeOpen(w, r, true, res.openUntil)
		e.observe(r, Event{Outcome: OutcomeBreakerOpen, Key: key, Wait: waited, Detail: detailBreakerOpen})
		return nil
	case res.resp == nil:
		return e.uncollapsible(w, r, next, key, res.reason, fwdURIMiss, res.admitted)
	case !res.resp.matchesVary(r):
		return e.followVariant(w, r, next, f.Key(), key, res, waited)
	}
	res.resp.write(w, r, cacheStatus{fwd: fwd, fwdStatus: res.resp.Status, collapsed: true, detail: res.fleet}, 0)
	e.observe(r, Event{Outcome: OutcomeCollapsed, Key: key, Wait: waited})
	return nil
}
