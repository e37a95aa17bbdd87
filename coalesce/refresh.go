package coalesce

import (
	"context"
	"net/http"
	"time"
)

// refresh starts one background flight for key unless one is running: the
// stale-while-revalidate refresh. It runs the leader pipeline (fly) on
// nobody's behalf, detached from every client and bounded by its own
// timeout; requests that cannot use the stale copy join it as followers.
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
	br := e.detach(r)
	ctx, cancelCtx := context.WithTimeout(br.Context(), timeout)
	f, ok := e.reg.Lead(ctx, string(key[:]), flightNote{method: br.Method, path: br.URL.Path, refresh: true})
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
	go func() {
		defer func() {
			unwatch()
			cancelCtx()
			e.refreshes.Done()
		}()
		defer f.Leave()
		defer func() {
			// fly has released the followers; a refresh has nobody to hand
			// the panic to, and must not take the server down.
			_ = recover()
		}()
		e.fly(discard{}, br, next, f, key, fwdStale, nil).done()
	}()
}

// detach is the copy of r a refresh sends: a GET with a context that no
// client's cancel ends, and (through Hooks.Detach) the host server's
// per-request values of its own.
func (e *Engine) detach(r *http.Request) *http.Request {
	var br *http.Request
	if e.hooks.Detach != nil {
		br = e.hooks.Detach(r, context.WithoutCancel(r.Context()))
	} else {
		br = r.Clone(context.WithoutCancel(r.Context()))
	}
	br.Method = http.MethodGet
	return br
}

// discard is the ResponseWriter of a background refresh.
type discard struct{}

// Header is a client's header as the handler is given it: with a Server
// field (never sent anywhere), so that the refreshed copy, like the one
// that a client's flight stored, knows whether the handler drops that field
// (recorder.init).
func (discard) Header() http.Header { return http.Header{"Server": {CacheName}} }

func (discard) Write(p []byte) (int, error) { return len(p), nil }
func (discard) WriteHeader(int)             {}
