package coalesce

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// The leader pipeline: a flight's one upstream request, sent, classified,
// published to the followers and stored. A client's leader (lead) and a
// background refresh (refresh.go) both run it (fly); only what they do
// with its answer differs.

// result is what a leader publishes to its followers.
type result struct {
	resp *Response // nil when not shareable or on error
	// stale is set instead of resp when the upstream failed (or its breaker
	// is open) and the stale-if-error copy answers.
	stale  *entry
	err    error
	reason string // why followers cannot use resp
	// admitted is the breaker that let the flight through, when its upstream
	// answered with no failure: followers that cannot use the answer go
	// upstream on its account (see admit).
	admitted *Breaker
	// openUntil: the upstream's breaker is open until then; followers are
	// answered 503 with Retry-After.
	openUntil time.Time
	// fleet: resp came from the shared tier (a Cache-Status detail).
	fleet string
}

// answer is what a flight came to, for whoever leads it: the one response
// its leader's client gets (a refresh has no client and drops it).
type answer struct {
	// resp is the upstream's complete response; stored when it went into
	// the micro-cache.
	resp   *Response
	stored bool
	// detail says why resp was not shared (its followers went upstream on
	// their own), why the response was streamed, or why the flight failed.
	detail string
	// streamed: the response went to the leader's client as it arrived.
	streamed bool
	// stale is the stale-if-error copy that answers instead of a failed
	// upstream or an open breaker.
	stale *entry
	// refused: the upstream's breaker refused the request; it lets requests
	// through again at this time.
	refused time.Time
	// abandoned: the flight's context ended before its upstream answered
	// (every client of a client's flight went away; a refresh's timeout).
	abandoned bool
	err       error
	// waiters are the followers that waited for the flight; flight is how
	// long it ran until the upstream answered or failed.
	waiters int
	flight  time.Duration
	// rec holds resp's body against the flights' memory budget until done.
	rec *recorder
	// shared is the entry the shared tier answered with (shared.go), and
	// fleet says how (a Cache-Status detail).
	shared *entry
	fleet  string
}

// done tells that the answer has been written: its buffer no longer counts
// against the flights' memory budget.
func (a answer) done() {
	if a.rec != nil {
		a.rec.releaseMemory()
	}
}

// lead runs the flight for its client and writes the answer to it.
func (e *Engine) lead(w http.ResponseWriter, r *http.Request, next Next, f *registry.Flight[*result], key Key, fwd string, admitted *Breaker) error {
	defer f.Leave()
	a := e.fly(w, r, next, f, key, fwd, admitted)
	defer a.done()
	if !a.refused.IsZero() {
		ev := Event{Outcome: OutcomeBreakerOpen, Key: key, Detail: detailBreakerOpen, Waiters: a.waiters}
		if a.stale != nil {
			a.stale.writeStale(w, r, false, time.Now())
			ev.Outcome = OutcomeStaleIfError
		} else {
			writeOpen(w, r, false, a.refused)
		}
		e.observe(r, ev)
		return nil
	}
	ev := Event{Outcome: OutcomeLeader, Key: key, Upstream: true, Waiters: a.waiters, Flight: a.flight, Detail: a.detail, Abandoned: a.abandoned}
	defer func() { e.observe(r, ev) }()
	switch {
	case a.fleet == detailSharedHit:
		now := time.Now()
		a.resp.write(w, r, cacheStatus{hit: true, ttl: a.shared.fresh.Sub(now), withTTL: true, detail: detailSharedHit}, now.Sub(a.shared.stored))
		ev = Event{Outcome: OutcomeSharedHit, Key: key, Waiters: a.waiters, Detail: detailSharedHit}
		return nil
	case a.fleet == detailFleetFollower:
		a.resp.write(w, r, cacheStatus{fwd: fwd, fwdStatus: a.resp.Status, collapsed: true, detail: detailFleetFollower}, 0)
		ev = Event{Outcome: OutcomeFleetFollower, Key: key, Waiters: a.waiters, Wait: a.flight, Detail: detailFleetFollower}
		return nil
	case a.streamed, a.abandoned:
		return a.err
	case a.stale != nil:
		a.stale.writeStale(w, r, false, time.Now())
		ev.Outcome, ev.Detail = OutcomeStaleIfError, detailStaleIfError
		return nil
	case errors.Is(a.err, ErrUpstreamTimeout):
		w.Header().Add("Cache-Status", cutStatus(fwd, false).String())
		return a.err
	case a.err != nil:
		w.Header().Add("Cache-Status", cacheStatus{fwd: fwd, detail: a.detail}.String())
		return a.err
	}
	ev.Stored = a.stored
	a.resp.write(w, r, cacheStatus{fwd: fwd, fwdStatus: a.resp.Status, stored: a.stored, detail: a.detail}, 0)
	return nil
}

// fly sends the flight's request upstream under the breaker, records the
// response, classifies it, publishes the result to the followers and
// stores the response when allowed. w is the leader's client (the response
// streams to it when it cannot be buffered); r is the request the flight
// was started for, which for a refresh is already detached from the client
// that asked. fly publishes on every path, also when next panics (the panic
// goes on); the caller leaves the flight.
func (e *Engine) fly(w http.ResponseWriter, r *http.Request, next Next, f *registry.Flight[*result], key Key, fwd string, admitted *Breaker) answer {
	var rec *recorder
	defer func() {
		if p := recover(); p != nil {
			if rec != nil {
				rec.releaseMemory()
			}
			// Release the followers with an error before the panic goes on
			// (http.ErrAbortHandler, for one, is how reverse_proxy aborts a
			// response whose upstream broke mid-body).
			f.Publish(&result{err: &StatusError{Status: http.StatusBadGateway, Err: ErrLeaderFailed}}, nil)
			panic(p)
		}
	}()

	if !e.watchesLater(r) {
		f.WatchLeader()
	}
	// Only a local leader asks the fleet (shared.go).
	ent, how, lock := e.askFleet(f.Context(), r, key, fleetKey(f, key))
	if ent != nil {
		f.Publish(&result{resp: ent.resp, fleet: how}, nil)
		return answer{resp: ent.resp, shared: ent, fleet: how, waiters: f.Waiters(), flight: time.Since(f.Started())}
	}
	// Whatever the flight comes to, the fleet's followers are woken;
	// shareFlight below gives them the stored answer.
	defer lock.Finish(context.Background(), nil, time.Time{}, time.Time{})

	fr := &flightRecorder{e: e, f: f, key: key, fwd: fwd, lone: fwd != fwdStale && lock == nil && !conditional(r)}
	pass, until := e.admit(&fr.passage, admitted, f.Started())
	if !until.IsZero() {
		return e.refuseFlight(f, key, r, until)
	}
	defer pass.release()
	// The flight's context is its upstream request's alone: the breaker's
	// timeout cuts the request by ending it.
	ur := upstreamRequest(r, pass.context(f.Context(), f))
	fr.pass, fr.ur = pass, ur
	rec = &fr.rec
	rec.init(w, e.cfg.MaxBody, fr)
	rec.memory = &e.flightMemory
	defer rec.finish() // also when next panics: no late flush after the handler
	err := pass.send(next, rec, ur)
	rec.finish()
	if pass.timedOut() {
		err = errCut
	}
	a := answer{waiters: f.Waiters(), flight: time.Since(f.Started()), rec: rec}

	if rec.streaming {
		pass.settle(ur, err, rec.status)
		a.streamed, a.detail, a.err = true, rec.streamReason, err
		if a.detail == detailLoneMiss {
			a.detail = "" // an unbuffered miss is a miss (its Cache-Status says no more)
		}
		return a
	}
	if err == nil && !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
	}
	if err == nil && r.Method != http.MethodHead && bodyAllowed(rec.status) && !rec.complete() {
		err = &StatusError{Status: http.StatusBadGateway, Err: errIncomplete}
	}
	if until := pass.settle(ur, err, rec.status); !until.IsZero() && err != nil {
		// A load-balancing policy found every member's breaker open.
		return e.refuseFlight(f, key, r, until)
	}
	if f.Context().Err() != nil && !errors.Is(context.Cause(f.Context()), ErrUpstreamTimeout) {
		// Besides a cut (above), the flight's context ends before Leave only
		// when every client of a client's flight has gone (nobody is left to
		// answer), or at a refresh's own timeout. A handler that returned no
		// error after the cancel (a plain http.Handler) may have written
		// nothing or a part: not stored. The followers of a refresh that timed out get the
		// stale-if-error copy, or 504. Those of a refresh that Close
		// cancelled (the engine's config is being unloaded while its
		// requests finish) go upstream on their own, as if nothing had
		// happened: they never asked for the refresh.
		if e.stop.Err() != nil {
			f.Publish(&result{reason: detailClosed}, nil)
		} else if ent := e.staleIfErrorCopy(key, r); ent != nil {
			f.Publish(&result{stale: ent}, nil)
		} else {
			f.Publish(&result{err: &StatusError{Status: http.StatusGatewayTimeout, Err: ErrWaitTimeout}}, nil)
		}
		if err == nil {
			err = f.Context().Err()
		}
		a.abandoned, a.detail, a.err = true, detailAbandoned, err
		return a
	}
	if err != nil || rec.status >= 500 {
		// A failed answer leaves the stored copy alone: the stale-if-error
		// copy answers everybody, now or for a later failure.
		if ent := e.staleIfErrorCopy(key, r); ent != nil {
			f.Publish(&result{stale: ent}, nil)
			a.stale = ent
			return a
		}
	}
	if err != nil {
		f.Publish(&result{err: err}, nil)
		a.detail, a.err = detailUpstreamError, err
		if pass.timedOut() {
			a.detail = detailUpstreamTimeout
		}
		return a
	}

	a.resp = newResponse(rec.status, rec.header, rec.buf.Bytes(), r)
	a.resp.dropServer = rec.dropServer
	if ok, reason := shareable(a.resp.Status, a.resp.Header, a.resp.cc); !ok {
		f.Publish(&result{reason: reason, admitted: pass.admitted()}, nil)
		e.markHitForMiss(key)
		a.detail = reason
		return a
	}
	if e.keys.authorizedUnderPublic(r) {
		if ok, reason := shareableAuthorized(a.resp.Status, a.resp.Header, a.resp.cc); !ok {
			// Its requester's alone. The stored copy (of a request without
			// Authorization) stays, and the requests without Authorization
			// go on collapsing: only the next ones with it go alone.
			f.Publish(&result{reason: reason}, nil)
			e.hitForMiss.set(key.authorized(), time.Now().Add(e.cfg.HitForMiss))
			a.detail = reason
			return a
		}
	}
	if a.resp.Status < 500 {
		// A flight with followers, or a refresh of a stored copy, is for a
		// key in demand: stored whatever the doorkeeper says.
		a.stored = e.store(key, a.resp, r, f.Started(), a.waiters > 0 || fwd == fwdStale)
	}
	f.Publish(&result{resp: a.resp, admitted: pass.admitted()}, nil)
	if a.stored && lock != nil {
		e.shareFlight(lock, key, pass.upstream())
		if a.detail == "" {
			a.detail = detailFleetLeader
		}
	}
	return a
}

// flightRecorder is a flight's recorder, with what the flight does when its
// response turns into a stream.
type flightRecorder struct {
	rec  recorder
	e    *Engine
	f    *registry.Flight[*result]
	pass *passage // &passage, or nil when breakers are off
	// passage and res are where the flight's passage and a streamed
	// response's result live: one allocation with the recorder.
	passage passage
	res     result
	ur      *http.Request
	key     Key
	fwd     string
	// lone: the flight is a client's, not the fleet's, and the client's
	// answer is the response itself (no validators to answer 304 from):
	// it may pass to the client unbuffered (passes).
	lone bool
}

// streaming: a response that cannot be buffered is healthy but cannot be
// shared or stored: the followers go on their own, the copy it replaces
// goes, and so do the next requests for a while. It is judged now, by its
// status: a stream may last for hours, and a half-open probe would keep its
// slot as long. (rec.mu is held: rec.status is set.) A full flight memory
// budget says nothing about the response: the followers go, the copy and
// the key stay as they are.
func (fr *flightRecorder) streaming(reason string) {
	fr.pass.settle(fr.ur, nil, fr.rec.status)
	fr.res = result{reason: reason, admitted: fr.pass.admitted()}
	fr.f.Publish(&fr.res, nil)
	if reason != detailFlightMemory && reason != detailLoneMiss {
		fr.e.markHitForMiss(fr.key)
	}
}

func (fr *flightRecorder) streamStatus(reason string) string {
	if reason == detailLoneMiss {
		// As the buffered answer the cache did not keep says.
		return cacheStatus{fwd: fr.fwd, fwdStatus: fr.rec.status}.String()
	}
	return cacheStatus{fwd: fr.fwd, detail: reason}.String()
}

// passes: a client's flight that nobody joined, whose response the cache
// would not keep (its lone copies go unread and the key was not asked for
// before: microCache.passesLone), needs no buffer. Its response goes to
// the client as it arrives, as reverse_proxy alone would send it, with no
// copy, store or publish; a follower that joins after this goes upstream
// on its own. Statuses that a stale_if_error copy or the breaker's failure
// accounting answer otherwise are buffered as before.
func (fr *flightRecorder) passes(status int) bool {
	return fr.lone && status < 500 && !fr.e.failureStatus(status) &&
		fr.f.Waiters() == 0 && fr.e.cache.passesLone(fr.key)
}

// lends: passes is likely to let the response through (nobody has joined
// and the cache would not keep it), so the handler may as well write into
// the client's header. A follower that joins meanwhile costs the header a
// copy when it is written (recorder.unlend).
func (fr *flightRecorder) lends() bool {
	return fr.lone && fr.f.Waiters() == 0 && fr.e.cache.mayPassLone(fr.key)
}

// refuseFlight answers a flight whose upstream's breaker refused it: its
// followers get the stale-if-error copy, or 503 until then.
func (e *Engine) refuseFlight(f *registry.Flight[*result], key Key, r *http.Request, until time.Time) answer {
	a := answer{refused: until, waiters: f.Waiters()}
	if ent := e.staleIfErrorCopy(key, r); ent != nil {
		f.Publish(&result{stale: ent}, nil)
		a.stale = ent
		return a
	}
	f.Publish(&result{openUntil: until}, nil)
	return a
}

// upstreamRequest is the request a flight sends: r with the flight's
// context and without the client's own validators, so that the response is
// complete and can answer every follower.
func upstreamRequest(r *http.Request, ctx context.Context) *http.Request {
	ur := r.WithContext(ctx)
	if conditional(r) {
		ur.Header = r.Header.Clone()
		ur.Header.Del("If-None-Match")
		ur.Header.Del("If-Modified-Since")
	}
	return ur
}

// conditional reports whether r carries validators: its answer may be a
// 304 that the module works out from the full response.
func conditional(r *http.Request) bool {
	return fieldValue(r.Header, "If-None-Match") != "" || fieldValue(r.Header, "If-Modified-Since") != ""
}

// markHitForMiss sends key's next requests upstream on their own for
// HitForMiss (its response could not be shared) and drops its stored copy.
func (e *Engine) markHitForMiss(key Key) {
	e.hitForMiss.set(key, time.Now().Add(e.cfg.HitForMiss))
	e.cache.remove(key)
}

// staleIfErrorCopy returns the entry for key that may stand in for a failed
// upstream response (stale_if_error), or nil.
func (e *Engine) staleIfErrorCopy(key Key, r *http.Request) *entry {
	if e.cfg.StaleIfError <= 0 {
		return nil
	}
	now := time.Now()
	ent := e.cache.get(key, now)
	if ent == nil || !now.Before(ent.staleIfError) || !ent.resp.matchesVary(r) {
		return nil
	}
	return ent
}

// store keeps resp, the answer to r sent upstream at requested, under key
// when the origin and the configuration allow. inDemand: more than one
// client wanted it; otherwise the cache's doorkeeper decides (admits).
func (e *Engine) store(key Key, resp *Response, r *http.Request, requested time.Time, inDemand bool) bool {
	lt := entryLifetimes{ttl: e.cfg.TTL, stale: e.cfg.Stale, staleIfError: e.cfg.StaleIfError}
	if lt == (entryLifetimes{}) {
		return false // collapse only
	}
	if ok, _, _ := storable(resp.Status, resp.cc); ok && !inDemand && !e.cache.admits(key, resp.size()) {
		return false // before the entry is built: the all-miss path
	}
	ent, _ := newEntry(resp, lt, requested, time.Now())
	if ent == nil {
		e.cache.remove(key)
		return false
	}
	ent.url, ent.lone = requestURL(r), !inDemand
	e.hitForMiss.clear(key)
	return e.cache.put(key, ent)
}
