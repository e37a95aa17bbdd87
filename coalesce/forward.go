package coalesce

import (
	"io"
	"net/http"
	"strconv"
	"time"
)

// Requests that go upstream on their own, outside any flight: bypassed
// (not eligible, or the kill switch is on) and uncollapsible (their answer
// could not be shared). Both reach the upstream through forward, under its
// breaker.

// bypass hands the request on untouched, except that an open breaker
// answers for its upstream. The kill switch ("disabled") passes everything
// straight through.
func (e *Engine) bypass(w http.ResponseWriter, r *http.Request, next Next, detail, fwd string) error {
	w = e.invalidating(w, r)
	member := cacheStatus{fwd: fwd, detail: detail}
	ev := Event{Outcome: OutcomeBypass, Detail: detail, Upstream: true}
	if detail == "disabled" {
		e.observe(r, ev)
		sw := &statusWriter{ResponseWriter: w, member: member}
		err := next(sw, r)
		sw.tag()
		return err
	}
	return e.forward(w, r, next, Key{}, member, ev, nil)
}

// uncollapsible sends the request upstream by itself, as the followers of a
// response that cannot be shared do, and requests for a key marked
// hit-for-miss. admitted is the breaker that let a follower's flight
// through (see admit).
func (e *Engine) uncollapsible(w http.ResponseWriter, r *http.Request, next Next, key Key, detail, fwd string, admitted *Breaker) error {
	member := cacheStatus{fwd: fwd, detail: detail}
	return e.forward(w, r, next, key, member, Event{Outcome: OutcomeUncollapsible, Key: key, Detail: detail, Upstream: true}, admitted)
}

// forward sends r upstream on its own under the breaker. member is its
// Cache-Status member; key is zero for a bypassed request (no stored copy
// can stand in for it).
func (e *Engine) forward(w http.ResponseWriter, r *http.Request, next Next, key Key, member cacheStatus, ev Event, admitted *Breaker) error {
	pass, until := e.admit(nil, admitted, time.Now())
	if !until.IsZero() {
		return e.refuse(w, r, key, until)
	}
	sw := &statusWriter{ResponseWriter: w, member: member}
	if pass == nil {
		e.observe(r, ev)
		err := next(sw, r)
		sw.tag()
		return err
	}
	defer pass.release()
	err := pass.send(next, sw, r)
	if pass.timedOut() {
		pass.settle(r, err, 0)
		w.Header().Add("Cache-Status", cutStatus(member.fwd, false).String())
		ev.Detail = detailUpstreamTimeout
		e.observe(r, ev)
		return errCut
	}
	if until := pass.settle(r, err, sw.status); !until.IsZero() && err != nil && sw.status == 0 {
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
		if ent := e.staleIfErrorCopy(key, r); ent != nil {
			ent.writeStale(w, r, false, time.Now())
			e.observe(r, Event{Outcome: OutcomeStaleIfError, Key: key, Detail: detailBreakerOpen})
			return nil
		}
	}
	writeOpen(w, r, false, until)
	e.observe(r, Event{Outcome: OutcomeBreakerOpen, Key: key, Detail: detailBreakerOpen})
	return nil
}

// writeOpen answers 503 for an open breaker; collapsed for a follower.
func writeOpen(w http.ResponseWriter, r *http.Request, collapsed bool, until time.Time) {
	h := w.Header()
	h.Set("Retry-After", strconv.FormatInt(RetryAfter(until, time.Now()), 10))
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Add("Cache-Status", cacheStatus{fwd: fwdBypass, collapsed: collapsed, detail: detailBreakerOpen}.String())
	w.WriteHeader(http.StatusServiceUnavailable)
	if r.Method != http.MethodHead {
		_, _ = io.WriteString(w, "503 Service Unavailable: the upstream is failing; retry later\n")
	}
}

// statusWriter notes the status of a response that goes straight to the
// client, for the breaker. http.ResponseController reaches the writer
// beneath (flushes, hijacking for WebSocket, deadlines) through Unwrap.
//
// It appends member to Cache-Status when the header goes out (or, if
// nothing was written, when next returns, for the error response): after
// the members of caches behind it, which reverse_proxy adds to the header
// map while it copies the upstream's header (RFC 9211: each cache appends).
type statusWriter struct {
	http.ResponseWriter
	status int
	member cacheStatus
	tagged bool
}

func (w *statusWriter) tag() {
	if !w.tagged {
		w.tagged = true
		w.ResponseWriter.Header().Add("Cache-Status", w.member.String())
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
