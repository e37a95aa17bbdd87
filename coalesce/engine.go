// Package coalesce collapses concurrent identical GET and HEAD requests into
// one upstream request and keeps the answer for a short TTL. It is plain
// net/http middleware: Engine.Handler wraps an http.Handler, Engine.Serve
// wraps a handler that returns an error (the shape of Caddy's handlers).
package coalesce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// CacheName is this cache's name in Cache-Status (RFC 9211).
const CacheName = "caddy-coalesce"

// Next is the rest of the handler chain. It returns an error instead of
// writing one, as Caddy's handlers do.
type Next func(w http.ResponseWriter, r *http.Request) error

// StatusError is an error answered with an HTTP status.
type StatusError struct {
	Status int
	Err    error
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%d %s: %v", e.Status, http.StatusText(e.Status), e.Err)
}
func (e *StatusError) Unwrap() error { return e.Err }

// Errors followers receive.
var (
	ErrLeaderFailed = errors.New("coalesce: the request this one was collapsed with failed")
	ErrWaitTimeout  = errors.New("coalesce: timed out waiting for the collapsed request")
	errIncomplete   = errors.New("coalesce: upstream body shorter or longer than its Content-Length")
)

// Outcome is what the engine did with a request.
type Outcome string

const (
	OutcomeHit           Outcome = "hit"           // fresh micro-cache entry
	OutcomeStale         Outcome = "stale"         // expired entry (stale or stale_if_error)
	OutcomeLeader        Outcome = "leader"        // went upstream for itself and its followers
	OutcomeCollapsed     Outcome = "collapsed"     // received the leader's response
	OutcomeUncollapsible Outcome = "uncollapsible" // could not share; went upstream on its own
	OutcomeBypass        Outcome = "bypass"        // not eligible (method, Range, stream, kill switch, ...)
	OutcomeBreakerOpen   Outcome = "breaker_open"  // answered for an open breaker
	OutcomeTimeout       Outcome = "timeout"       // follower gave up after max_wait
	OutcomeError         Outcome = "error"         // follower released with the leader's error
)

// Event describes the handling of one request, for logs and metrics.
type Event struct {
	Outcome Outcome
	// Key is the request's key (zero for bypassed requests). Only its
	// String form is meant to leave the process.
	Key Key
	// Detail is the reason behind the outcome, e.g. "set-cookie", "range".
	Detail string
	// Waiters: for a leader, the followers that waited for it.
	Waiters int
	// Wait: for a follower, how long it waited.
	Wait time.Duration
	// Upstream: whether this request caused an upstream request.
	Upstream bool
	// Stored: the response was put in the micro-cache.
	Stored bool
	// Flight: for a leader, how long its flight ran until the upstream
	// answered or failed.
	Flight time.Duration
}

// result is what a leader publishes to its followers.
type result struct {
	resp   *Response // nil when not shareable or on error
	stale  *entry    // set instead of resp when the upstream failed and a spare copy answers
	err    error
	reason string // why followers cannot use resp
	// openUntil: the upstream's breaker is open until then; followers are
	// answered 503 with Retry-After.
	openUntil time.Time
}

// Engine holds the registry and the micro-cache of one coalescing handler.
// Engines returned by WithHooks share them.
type Engine struct {
	*core
	hooks Hooks
	// seen: the upstreams this engine's requests went to, to guard the next
	// ones (see passage.go); per hooks, like what Hooks.Upstream reports.
	seen *seenUpstreams
}

type core struct {
	cfg   Config
	keys  *keyDeriver
	reg   *registry.Registry[*result]
	cache *microCache
	hfm   *marks
	guard *guard // nil when breakers are off

	// stop ends when the engine is closed: it cancels running refreshes.
	// closeMu orders a refresh's start (refreshes.Add) before Close's Wait.
	refreshes sync.WaitGroup
	closeOnce sync.Once
	closeMu   sync.Mutex
	stop      context.Context
	stopAll   context.CancelFunc
}

// New builds an engine; cfg must pass Validate.
func New(cfg Config) (*Engine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	stop, stopAll := context.WithCancel(context.Background())
	return &Engine{hooks: cfg.Hooks, seen: new(seenUpstreams), core: &core{
		cfg:     cfg,
		keys:    newKeyDeriver(cfg.IdentityHeaders, cfg.Public, cfg.KeyHeaders),
		reg:     registry.New[*result](registry.Options{MaxFlights: cfg.MaxFlights}),
		cache:   newMicroCache(cfg.MaxEntries, cfg.MaxMemory),
		hfm:     newMarks(cfg.MaxEntries),
		guard:   newGuard(cfg),
		stop:    stop,
		stopAll: stopAll,
	}}, nil
}

// WithHooks returns an engine that shares e's registry, cache, breakers and
// configuration but reports to other hooks and learns its upstreams anew. A
// server that keeps engines across configuration reloads gives each
// configuration's handler its own.
func (e *Engine) WithHooks(h Hooks) *Engine {
	return &Engine{core: e.core, hooks: h, seen: new(seenUpstreams)}
}

// Close stops new background refreshes, cancels the running ones and waits
// for them to end. (A server closes an engine while it reloads its
// configuration: it must not wait for a refresh on a hung upstream.)
func (e *Engine) Close() {
	e.closeOnce.Do(func() {
		e.closeMu.Lock()
		e.stopAll()
		e.closeMu.Unlock()
	})
	e.refreshes.Wait()
}

// Handler wraps a plain http.Handler.
func (e *Engine) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := e.Serve(w, r, func(w http.ResponseWriter, r *http.Request) error {
			next.ServeHTTP(w, r)
			return nil
		})
		var se *StatusError
		switch {
		case err == nil:
		case errors.As(err, &se):
			http.Error(w, http.StatusText(se.Status), se.Status)
		case errors.Is(err, context.Canceled):
		default:
			http.Error(w, http.StatusText(http.StatusBadGateway), http.StatusBadGateway)
		}
	})
}

// Stats summarise the engine's registry and cache.
type Stats struct {
	Registry      registry.Stats `json:"registry"`
	Cache         CacheStats     `json:"cache"`
	Uncollapsible int            `json:"uncollapsible_keys"`
}

// Stats returns a snapshot.
func (e *Engine) Stats() Stats {
	e.hfm.mu.RLock()
	n := e.hfm.lru.Len()
	e.hfm.mu.RUnlock()
	return Stats{Registry: e.reg.Stats(), Cache: e.cache.stats(), Uncollapsible: n}
}

// FlightInfo describes a flight in progress.
type FlightInfo struct {
	Key     string        `json:"key"` // short hash
	Request string        `json:"request"`
	Age     time.Duration `json:"age_ns"`
	Waiters int           `json:"waiters"`
}

// Inflight lists up to limit flights in progress.
func (e *Engine) Inflight(limit int) []FlightInfo {
	var out []FlightInfo
	now := time.Now()
	e.reg.Inflight(limit, func(f registry.FlightInfo) {
		var k Key
		copy(k[:], f.Key)
		out = append(out, FlightInfo{Key: k.String(), Request: f.Note, Age: now.Sub(f.Started), Waiters: f.Waiters})
	})
	return out
}

func (e *Engine) observe(r *http.Request, ev Event) {
	if e.hooks.Observe != nil {
		e.hooks.Observe(r, ev)
	}
}

// Serve handles one request: from the micro-cache, as a follower of an
// identical request in flight, or as the leader that calls next.
func (e *Engine) Serve(w http.ResponseWriter, r *http.Request, next Next) error {
	if e.hooks.Disabled != nil && e.hooks.Disabled() {
		return e.bypass(w, r, next, "disabled", "bypass")
	}
	if detail, fwd := bypassReason(r); detail != "" {
		return e.bypass(w, r, next, detail, fwd)
	}
	now := time.Now()
	key := e.keys.derive(r, r.Method)
	noCache := requestCacheControl(r.Header).noCache
	// fwd says why the request goes upstream (RFC 9211): no usable copy, or
	// one stored for a request that differs in a field the response varies on.
	fwd := "uri-miss"

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
			fwd = "vary-miss"
		} else if varyOK {
			// fresh == stored (ttl 0, kept for stale alone) is never a fresh
			// hit, even for a request that took its time before it looked.
			if now.Before(ent.fresh) && ent.fresh.After(ent.stored) {
				left := ent.fresh.Sub(now)
				ent.resp.write(w, r, CacheName+"; hit; ttl="+strconv.FormatInt(ttlSeconds(left), 10)+`; detail="ttl-ms=`+strconv.FormatInt(left.Milliseconds(), 10)+`"`, now.Sub(ent.stored))
				e.observe(r, Event{Outcome: OutcomeHit, Key: key})
				return nil
			}
			if now.Before(ent.stale) {
				e.refresh(r, lookup, next)
				ent.resp.write(w, r, CacheName+"; hit; "+ent.ttlField(now)+"; fwd=stale; detail=stale-while-revalidate", now.Sub(ent.stored))
				e.observe(r, Event{Outcome: OutcomeStale, Key: key, Detail: "stale-while-revalidate"})
				return nil
			}
		}
	}

	if r.Method == http.MethodHead {
		// A GET in flight answers a HEAD as well as a HEAD of its own would;
		// it never leads one, so no GET waits for a body-less answer.
		if f, ok := e.reg.Follow(string(getKey[:])); ok {
			return e.follow(w, r, next, f, getKey, fwd)
		}
	}
	if e.hfm.has(key, now) {
		return e.alone(w, r, next, key, OutcomeUncollapsible, "uncollapsible", "uri-miss")
	}

	f, role := e.reg.Join(r.Context(), string(key[:]), r.Method+" "+r.URL.Path)
	switch role {
	case registry.Follower:
		return e.follow(w, r, next, f, key, fwd)
	case registry.Leader:
		return e.lead(w, r, next, f, key, fwd)
	default:
		return e.alone(w, r, next, key, OutcomeUncollapsible, "registry-full", "uri-miss")
	}
}

// bypass hands the request on untouched, except that an open breaker
// answers for its upstream. The kill switch ("disabled") passes everything
// straight through.
func (e *Engine) bypass(w http.ResponseWriter, r *http.Request, next Next, detail, fwd string) error {
	cacheStatus := fmt.Sprintf("%s; fwd=%s; detail=%s", CacheName, fwd, detail)
	ev := Event{Outcome: OutcomeBypass, Detail: detail, Upstream: true}
	if detail == "disabled" {
		e.observe(r, ev)
		sw := &statusWriter{ResponseWriter: w, cacheStatus: cacheStatus}
		err := next(sw, r)
		sw.tag()
		return err
	}
	return e.forward(w, r, next, Key{}, cacheStatus, ev)
}

// alone sends the request upstream by itself (no flight), as the followers
// of a response that cannot be shared do.
func (e *Engine) alone(w http.ResponseWriter, r *http.Request, next Next, key Key, outcome Outcome, detail, fwd string) error {
	cacheStatus := fmt.Sprintf("%s; fwd=%s; detail=%s", CacheName, fwd, detail)
	return e.forward(w, r, next, key, cacheStatus, Event{Outcome: outcome, Key: key, Detail: detail, Upstream: true})
}

// follow waits for the leader and writes its response, or goes upstream
// alone when the response cannot be used for this request.
func (e *Engine) follow(w http.ResponseWriter, r *http.Request, next Next, f *registry.Flight[*result], key Key, fwd string) error {
	start := time.Now()
	res, err := f.Wait(r.Context(), e.cfg.MaxWait)
	waited := time.Since(start)
	switch {
	case errors.Is(err, registry.ErrWaitTimeout):
		w.Header().Add("Cache-Status", CacheName+"; fwd="+fwd+"; collapsed; detail=wait-timeout")
		e.observe(r, Event{Outcome: OutcomeTimeout, Key: key, Wait: waited})
		return &StatusError{Status: http.StatusGatewayTimeout, Err: ErrWaitTimeout}
	case err != nil && r.Context().Err() != nil:
		// This client went away; nobody is left to answer.
		e.observe(r, Event{Outcome: OutcomeCollapsed, Key: key, Wait: waited, Detail: "client-gone"})
		return r.Context().Err()
	case err != nil:
		// The leader left without publishing (it panicked or was aborted).
		w.Header().Add("Cache-Status", CacheName+"; fwd="+fwd+"; collapsed; detail=leader-failed")
		e.observe(r, Event{Outcome: OutcomeError, Key: key, Wait: waited})
		return &StatusError{Status: http.StatusBadGateway, Err: ErrLeaderFailed}
	case res.err != nil:
		w.Header().Add("Cache-Status", CacheName+"; fwd="+fwd+"; collapsed; detail=upstream-error")
		e.observe(r, Event{Outcome: OutcomeError, Key: key, Wait: waited})
		return res.err
	case res.stale != nil && res.stale.resp.matchesVary(r):
		res.stale.writeStale(w, r, "collapsed; ", time.Now())
		e.observe(r, Event{Outcome: OutcomeStale, Key: key, Wait: waited, Detail: "stale-if-error"})
		return nil
	case res.stale != nil:
		return e.alone(w, r, next, key, OutcomeUncollapsible, "vary-mismatch", "vary-miss")
	case !res.openUntil.IsZero():
		writeOpen(w, r, "collapsed; ", res.openUntil)
		e.observe(r, Event{Outcome: OutcomeBreakerOpen, Key: key, Wait: waited, Detail: detailBreakerOpen})
		return nil
	case res.resp == nil:
		return e.alone(w, r, next, key, OutcomeUncollapsible, res.reason, "uri-miss")
	case !res.resp.matchesVary(r):
		return e.alone(w, r, next, key, OutcomeUncollapsible, "vary-mismatch", "vary-miss")
	}
	res.resp.write(w, r, forwarded(fwd, res.resp.Status)+"; collapsed", 0)
	e.observe(r, Event{Outcome: OutcomeCollapsed, Key: key, Wait: waited})
	return nil
}

// lead calls next for the flight, shares the response with the followers,
// stores it when allowed and writes it to its own client.
func (e *Engine) lead(w http.ResponseWriter, r *http.Request, next Next, f *registry.Flight[*result], key Key, fwd string) (err error) {
	defer f.Leave()
	defer func() {
		if p := recover(); p != nil {
			// Release the followers with an error before the panic goes on
			// (http.ErrAbortHandler, for one, is how reverse_proxy aborts a
			// response whose upstream broke mid-body).
			f.Publish(&result{err: &StatusError{Status: http.StatusBadGateway, Err: ErrLeaderFailed}}, nil)
			panic(p)
		}
	}()

	ur, pass, until := e.admit(upstreamRequest(r, f.Context()))
	if !until.IsZero() {
		return e.refuseFlight(w, r, f, key, until)
	}
	defer pass.release()
	rec := newRecorder(w, e.cfg.MaxBody,
		func(reason string) {
			f.Publish(&result{reason: reason}, nil)
			e.hfm.set(key, time.Now().Add(e.cfg.HitForMiss))
		},
		func(reason string) string {
			return CacheName + "; fwd=" + fwd + "; detail=" + reason
		})
	defer rec.finish() // also when next panics: no late flush after the handler
	err = next(rec, ur)
	rec.finish()
	ev := Event{Outcome: OutcomeLeader, Key: key, Upstream: true, Waiters: f.Waiters(), Flight: time.Since(f.Started())}

	if rec.streaming {
		pass.settle(ur, err, rec.status)
		ev.Detail = rec.streamReason
		e.observe(r, ev)
		return err
	}
	if err == nil && !rec.wroteHeader {
		rec.WriteHeader(http.StatusOK)
	}
	if err == nil && r.Method != http.MethodHead && bodyAllowed(rec.status) && !rec.complete() {
		err = &StatusError{Status: http.StatusBadGateway, Err: errIncomplete}
	}
	if until := pass.settle(ur, err, rec.status); !until.IsZero() && err != nil {
		// A load-balancing policy found every member's breaker open.
		return e.refuseFlight(w, r, f, key, until)
	}
	if f.Context().Err() != nil {
		// The flight's context ends before Leave only when every client has
		// gone: nobody is left to answer, with a stale copy or otherwise.
		// A handler that returned no error after the cancel (a plain
		// http.Handler) may have written nothing or a part: not stored.
		if err == nil {
			err = f.Context().Err()
		}
		f.Publish(&result{err: err}, nil)
		ev.Detail = "abandoned"
		e.observe(r, ev)
		return err
	}
	if err != nil || rec.status >= 500 {
		// stale_if_error: the last good copy answers everybody.
		if ent := e.spare(key, r); ent != nil {
			f.Publish(&result{stale: ent}, nil)
			ent.writeStale(w, r, "", time.Now())
			ev.Outcome, ev.Detail = OutcomeStale, "stale-if-error"
			e.observe(r, ev)
			return nil
		}
	}
	if err != nil {
		f.Publish(&result{err: err}, nil)
		w.Header().Add("Cache-Status", CacheName+"; fwd="+fwd+"; detail=upstream-error")
		ev.Detail = "upstream-error"
		e.observe(r, ev)
		return err
	}

	resp := newResponse(rec.status, rec.header, rec.buf.Bytes(), r)
	ok, reason := shareable(resp.Status, resp.Header, resp.cc)
	if !ok {
		f.Publish(&result{reason: reason}, nil)
		e.hfm.set(key, time.Now().Add(e.cfg.HitForMiss))
		e.cache.remove(key)
		ev.Detail = reason
		resp.write(w, r, forwarded(fwd, resp.Status)+"; detail="+reason, 0)
		e.observe(r, ev)
		return nil
	}
	ev.Stored = e.store(key, resp)
	f.Publish(&result{resp: resp}, nil)
	status := forwarded(fwd, resp.Status)
	if ev.Stored {
		status += "; stored"
	}
	resp.write(w, r, status, 0)
	e.observe(r, ev)
	return nil
}

// spare returns the entry for key that may stand in for a failed upstream
// response (stale_if_error), or nil.
func (e *Engine) spare(key Key, r *http.Request) *entry {
	if e.cfg.StaleIfError <= 0 {
		return nil
	}
	now := time.Now()
	ent := e.cache.get(key, now)
	if ent == nil || !now.Before(ent.spare) || !ent.resp.matchesVary(r) {
		return nil
	}
	return ent
}

// writeStale writes an expired entry that stands in for a failed upstream.
func (ent *entry) writeStale(w http.ResponseWriter, r *http.Request, collapsed string, now time.Time) {
	ent.resp.write(w, r, CacheName+"; "+collapsed+"fwd=stale; "+ent.ttlField(now)+"; detail=stale-if-error", now.Sub(ent.stored))
}

// ttlField is the Cache-Status ttl parameter for the entry at now. An entry
// at or past its freshness lifetime is stale: its ttl is at most -1.
func (ent *entry) ttlField(now time.Time) string {
	ttl := ttlSeconds(ent.fresh.Sub(now))
	if !now.Before(ent.fresh) {
		ttl = min(ttl, -1)
	}
	return "ttl=" + strconv.FormatInt(ttl, 10)
}

// ttlSeconds is the Cache-Status ttl for a copy with left of its freshness
// lifetime left: whole seconds rounded down, so that a copy 0.3 s past its
// lifetime says -1 (stale), not 0 (RFC 9211 §2.5: negative when stale).
func ttlSeconds(left time.Duration) int64 {
	s := int64(left / time.Second)
	if left < 0 && left%time.Second != 0 {
		s--
	}
	return s
}

// forwarded is the Cache-Status of a response fetched from the upstream.
func forwarded(fwd string, status int) string {
	return CacheName + "; fwd=" + fwd + "; fwd-status=" + strconv.Itoa(status)
}

// store keeps resp under key when the origin and the configuration allow.
func (e *Engine) store(key Key, resp *Response) bool {
	if e.cfg.TTL <= 0 && e.cfg.Stale <= 0 && e.cfg.StaleIfError <= 0 {
		return false
	}
	ok, limit, _ := storable(resp.Status, resp.cc)
	// RFC 9111 §5.2.2.2, .8 and .10: a shared cache never serves such a
	// response stale, whatever stale and stale_if_error allow.
	staleAllowed := !resp.cc.mustRevalidate
	if ok && e.cfg.TTL <= 0 && !staleAllowed {
		ok = false // kept only to be served stale, which it may not be
	}
	if !ok {
		e.cache.remove(key)
		return false
	}
	now := time.Now()
	ttl := e.cfg.TTL
	if limit > 0 && limit < ttl {
		ttl = limit
	}
	ent := &entry{resp: resp, stored: now, fresh: now.Add(ttl), size: resp.size()}
	ent.stale, ent.spare = ent.fresh, ent.fresh
	if staleAllowed {
		ent.stale = ent.fresh.Add(e.cfg.Stale)
		ent.spare = ent.fresh.Add(e.cfg.StaleIfError)
	}
	e.hfm.clear(key)
	return e.cache.put(key, ent)
}

// refresh starts one background request for key unless one is running. It
// is detached from every client and bounded by its own timeout.
func (e *Engine) refresh(r *http.Request, key Key, next Next) {
	if e.stop.Err() != nil || e.reg.Running(string(key[:])) {
		// On a hot key every stale answer asks for a refresh while one runs:
		// no timer, context or detached request for those.
		return
	}
	timeout := e.cfg.MaxWait
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	// The refresh request is built first and the flight's context derived
	// from its context, not the client's: the values a host server keeps
	// in the context (Caddy's replacer and vars) must be the refresh's own,
	// or the refresh writes into maps the client's request still reads.
	var br *http.Request
	if e.hooks.Detach != nil {
		br = e.hooks.Detach(r, context.WithoutCancel(r.Context()))
	} else {
		br = r.Clone(context.WithoutCancel(r.Context()))
	}
	br.Method = http.MethodGet
	ctx, cancelCtx := context.WithTimeout(br.Context(), timeout)
	f, ok := e.reg.Lead(ctx, string(key[:]), "refresh "+r.Method+" "+r.URL.Path)
	if !ok {
		cancelCtx()
		return
	}
	e.closeMu.Lock()
	if e.stop.Err() != nil {
		e.closeMu.Unlock()
		f.Publish(&result{reason: "refresh-failed"}, nil)
		f.Leave()
		cancelCtx()
		return
	}
	e.refreshes.Add(1)
	e.closeMu.Unlock()
	unwatch := context.AfterFunc(e.stop, cancelCtx) // Close cancels it
	cancel := func() {
		unwatch()
		cancelCtx()
		e.refreshes.Done()
	}
	ur, pass, until := e.admit(upstreamRequest(br, f.Context()))
	if !until.IsZero() {
		// The breaker is open: no refresh. Whoever joined this flight gets
		// what a leader would have answered.
		if ent := e.spare(key, br); ent != nil {
			f.Publish(&result{stale: ent}, nil)
		} else {
			f.Publish(&result{openUntil: until}, nil)
		}
		f.Leave()
		cancel()
		return
	}
	go func() {
		defer cancel()
		defer f.Leave()
		defer pass.release()
		defer func() {
			if p := recover(); p != nil {
				f.Publish(&result{err: &StatusError{Status: http.StatusBadGateway, Err: ErrLeaderFailed}}, nil)
			}
		}()
		rec := newRecorder(discard{}, e.cfg.MaxBody, func(string) {}, func(string) string { return "" })
		defer rec.finish()
		err := next(rec, ur)
		rec.finish()
		pass.settle(ur, err, rec.status)
		// Cut off by its timeout, a handler may return no error with
		// nothing or a part written: not a response either.
		cut := ur.Context().Err() != nil
		if err != nil || cut || rec.streaming || !rec.complete() || rec.status >= 500 {
			// A failed refresh leaves the stored copy alone: stale_if_error
			// may still need it.
			if ent := e.spare(key, br); ent != nil {
				f.Publish(&result{stale: ent}, nil)
			} else if cut {
				f.Publish(&result{err: &StatusError{Status: http.StatusGatewayTimeout, Err: ErrWaitTimeout}}, nil)
			} else {
				f.Publish(&result{err: err, reason: "refresh-failed"}, nil)
			}
			return
		}
		if !rec.wroteHeader {
			rec.WriteHeader(http.StatusOK)
		}
		resp := newResponse(rec.status, rec.header, rec.buf.Bytes(), br)
		if ok, reason := shareable(resp.Status, resp.Header, resp.cc); !ok {
			e.cache.remove(key)
			f.Publish(&result{reason: reason}, nil)
			return
		}
		e.store(key, resp)
		f.Publish(&result{resp: resp}, nil)
	}()
}

// upstreamRequest is the request the leader sends: the client's request
// with the flight's context and without the client's own validators, so
// that the response is complete and can answer every follower.
func upstreamRequest(r *http.Request, ctx context.Context) *http.Request {
	ur := r.WithContext(ctx)
	if r.Header.Get("If-None-Match") != "" || r.Header.Get("If-Modified-Since") != "" {
		ur.Header = r.Header.Clone()
		ur.Header.Del("If-None-Match")
		ur.Header.Del("If-Modified-Since")
	}
	return ur
}

// discard is the ResponseWriter of a background refresh.
type discard struct{}

func (discard) Header() http.Header         { return http.Header{} }
func (discard) Write(p []byte) (int, error) { return len(p), nil }
func (discard) WriteHeader(int)             {}
