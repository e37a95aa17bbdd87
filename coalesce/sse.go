package coalesce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fanout"
)

// SSEConfig turns on the fan-out of server-sent event streams: every GET
// with Accept: text/event-stream joins the one upstream stream of its key.
// The zero value of each field means its default.
type SSEConfig struct {
	// Replay is how many recent events a stream keeps for Last-Event-ID.
	// 0: 256. Negative: none (a subscriber with a Last-Event-ID other than
	// the last event's goes upstream on its own). At most MaxSSEReplay.
	Replay int
	// Buffer is how many events may wait for one subscriber; a subscriber
	// further behind is dropped (its connection closed). 0: 64.
	Buffer int
	// Linger keeps the upstream stream open this long after the last
	// subscriber left. 0: 2s. Off: it closes at once.
	Linger time.Duration
	// Heartbeat writes a ":" comment to a stream's subscribers after this
	// much silence. 0: 15s. Off: never.
	Heartbeat time.Duration
	// MaxSubscribers is the most subscribers of one stream; more go
	// upstream on their own. 0: 10000.
	MaxSubscribers int
}

// Defaults and limits of SSEConfig.
const (
	DefaultSSEReplay         = 256
	DefaultSSEBuffer         = 64
	DefaultSSELinger         = 2 * time.Second
	DefaultSSEHeartbeat      = 15 * time.Second
	DefaultSSEMaxSubscribers = 10_000

	MaxSSEReplay         = 100_000
	MaxSSEBuffer         = 100_000
	MaxSSELinger         = 10 * time.Minute
	MinSSEHeartbeat      = 100 * time.Millisecond
	MaxSSEHeartbeat      = time.Hour
	MaxSSEMaxSubscribers = 1_000_000
)

// WithDefaults returns c with each zero field set to its default.
func (c SSEConfig) WithDefaults() SSEConfig {
	if c.Replay == 0 {
		c.Replay = DefaultSSEReplay
	}
	if c.Buffer == 0 {
		c.Buffer = DefaultSSEBuffer
	}
	if c.Linger == 0 {
		c.Linger = DefaultSSELinger
	}
	if c.Heartbeat == 0 {
		c.Heartbeat = DefaultSSEHeartbeat
	}
	if c.MaxSubscribers == 0 {
		c.MaxSubscribers = DefaultSSEMaxSubscribers
	}
	return c
}

// Validate explains what is wrong with c (after WithDefaults), in words
// for an operator.
func (c SSEConfig) Validate() error {
	c = c.WithDefaults()
	var errs []error
	if c.Replay > MaxSSEReplay {
		errs = append(errs, fmt.Errorf("sse replay must be at most %d events (got %d)", MaxSSEReplay, c.Replay))
	}
	if c.Buffer < 1 || c.Buffer > MaxSSEBuffer {
		errs = append(errs, fmt.Errorf("sse buffer must be from 1 to %d events (got %d)", MaxSSEBuffer, c.Buffer))
	}
	if c.Linger > MaxSSELinger {
		errs = append(errs, fmt.Errorf("sse linger must be at most %s (got %s)", MaxSSELinger, c.Linger))
	}
	if c.Heartbeat > 0 && (c.Heartbeat < MinSSEHeartbeat || c.Heartbeat > MaxSSEHeartbeat) {
		errs = append(errs, fmt.Errorf("sse heartbeat must be 0 (off) or from %s to %s (got %s)", MinSSEHeartbeat, MaxSSEHeartbeat, c.Heartbeat))
	}
	if c.MaxSubscribers < 1 || c.MaxSubscribers > MaxSSEMaxSubscribers {
		errs = append(errs, fmt.Errorf("sse max_subscribers must be from 1 to %d (got %d)", MaxSSEMaxSubscribers, c.MaxSubscribers))
	}
	return errors.Join(errs...)
}

// newHub builds the fan-out of an engine, or nil when sse is off.
func newHub(cfg Config) *fanout.Hub {
	if cfg.SSE == nil {
		return nil
	}
	return fanout.NewHub(fanout.Config{
		Replay:         max(cfg.SSE.Replay, 0),
		Buffer:         cfg.SSE.Buffer,
		Linger:         max(cfg.SSE.Linger, 0),
		Heartbeat:      max(cfg.SSE.Heartbeat, 0),
		MaxSubscribers: cfg.SSE.MaxSubscribers,
		MaxEvent:       int(min(cfg.MaxBody, 1<<30)),
		HeaderWait:     max(cfg.MaxWait, 0),
	})
}

// fansOut reports whether r joins an event stream: sse is on and r is a
// GET for an event stream that nothing else excludes.
func (e *Engine) fansOut(r *http.Request) bool {
	if e.hub == nil || r.Method != http.MethodGet {
		return false
	}
	detail, _ := bypassReason(r)
	return detail == "event-stream"
}

// CloseStreams closes the event streams this engine (this WithHooks) started
// and the subscribers it serves: a server that shuts down or reloads its
// configuration calls it so that long-lived streams do not hold it up. Each
// stream hands its recent events over to the next engine that serves its
// key, so the subscribers, which reconnect with Last-Event-ID, are replayed.
func (e *Engine) CloseStreams() {
	if e.owner != nil {
		e.owner.Close()
	}
}

// StreamInfo describes an event stream being fanned out.
type StreamInfo struct {
	Key         string    `json:"key"` // short hash
	Path        string    `json:"path"`
	Subscribers int       `json:"subscribers"`
	Events      uint64    `json:"events"`
	Since       time.Time `json:"since"`
	Reconnects  int       `json:"upstream_reconnects"`
	// State: "connecting" (waiting for the upstream's answer), "live", or
	// "handover" (its configuration was reloaded; kept for its
	// subscribers to come back to).
	State string `json:"state"`
}

// Streams lists up to limit streams (limit <= 0: all).
func (e *Engine) Streams(limit int) []StreamInfo {
	if e.hub == nil {
		return nil
	}
	var out []StreamInfo
	for _, s := range e.hub.Streams(limit) {
		var k Key
		copy(k[:], s.Key)
		out = append(out, StreamInfo{Key: k.String(), Path: s.Note, Subscribers: s.Subscribers, Events: s.Events,
			Since: s.Since, Reconnects: s.Reconnects, State: s.State})
	}
	return out
}

// detailReplay and detailReplayMiss say, in Cache-Status, that a subscriber
// sent Last-Event-ID and was answered from the stream's recent events, or
// went upstream on its own because they do not reach back that far.
const (
	detailEventStream = "event-stream"
	detailReplay      = "replay"
	detailReplayMiss  = "replay-miss"
)

// joinStream joins r to the event stream of its key. It returns the
// subscription when the caller is to Serve it (the stream's header is in w),
// and nil when r has been answered otherwise.
func (e *Engine) joinStream(w http.ResponseWriter, r *http.Request, next Next) (*fanout.Subscription, error) {
	key := e.keys.derive(r, http.MethodGet)
	lastID := r.Header.Get("Last-Event-ID")
	sub := e.hub.Join(r.Context(), e.owner, string(key[:]), r.URL.Path, lastID, e.openStream(r, next, w.Header()["Server"]))
	collapsed := !sub.Started
	outcome := OutcomeLeader
	if collapsed {
		outcome = OutcomeCollapsed
	}
	switch sub.Outcome {
	case fanout.Started, fanout.Joined:
		h := w.Header()
		if _, kept := sub.Header["Server"]; !kept {
			// The handler dropped the Server field it was given (see
			// openStream), as reverse_proxy drops Caddy's.
			delete(h, "Server")
		}
		copyHeader(h, sub.Header)
		h.Del("Content-Length")
		detail := detailEventStream
		if lastID != "" && (sub.Outcome == fanout.Joined || sub.Replayed > 0) {
			detail = detailReplay
		}
		h.Add("Cache-Status", cacheStatus{fwd: fwdURIMiss, fwdStatus: http.StatusOK, collapsed: collapsed, detail: detail}.String())
		e.observe(r, Event{Outcome: outcome, Key: key, Detail: detail, Upstream: sub.Started})
		return sub, nil
	case fanout.ReplayMiss:
		return nil, e.uncollapsible(w, r, next, key, detailReplayMiss, fwdURIMiss, nil)
	case fanout.Full:
		return nil, e.uncollapsible(w, r, next, key, "max-subscribers", fwdURIMiss, nil)
	case fanout.Answered:
		a := sub.Answer
		if a.Truncated {
			// Too large to share: everybody asks for it on their own.
			return nil, e.uncollapsible(w, r, next, key, "too-large", fwdURIMiss, nil)
		}
		resp := newResponse(a.Status, a.Header.Clone(), a.Body, r)
		if ok, reason := shareable(resp.Status, resp.Header, resp.cc); !ok {
			if !sub.Started {
				return nil, e.uncollapsible(w, r, next, key, reason, fwdURIMiss, nil)
			}
			resp.write(w, r, cacheStatus{fwd: fwdURIMiss, fwdStatus: resp.Status, detail: reason}, 0)
			e.observe(r, Event{Outcome: outcome, Key: key, Detail: reason, Upstream: true})
			return nil, nil
		}
		resp.write(w, r, cacheStatus{fwd: fwdURIMiss, fwdStatus: resp.Status, collapsed: collapsed}, 0)
		e.observe(r, Event{Outcome: outcome, Key: key, Upstream: sub.Started})
		return nil, nil
	case fanout.Failed:
		var refused *refusedError
		if errors.Is(sub.Err, ErrUpstreamTimeout) {
			w.Header().Add("Cache-Status", cutStatus(fwdURIMiss, collapsed).String())
			e.observe(r, Event{Outcome: outcome, Key: key, Detail: detailUpstreamTimeout, Upstream: sub.Started})
			return nil, sub.Err
		}
		if errors.As(sub.Err, &refused) {
			writeOpen(w, r, collapsed, refused.until)
			e.observe(r, Event{Outcome: OutcomeBreakerOpen, Key: key, Detail: detailBreakerOpen})
			return nil, nil
		}
		w.Header().Add("Cache-Status", cacheStatus{fwd: fwdURIMiss, collapsed: collapsed, detail: "upstream-error"}.String())
		if sub.Started {
			e.observe(r, Event{Outcome: OutcomeLeader, Key: key, Detail: "upstream-error", Upstream: true})
		} else {
			e.observe(r, Event{Outcome: OutcomeError, Key: key})
		}
		return nil, sub.Err
	case fanout.TimedOut:
		w.Header().Add("Cache-Status", cacheStatus{fwd: fwdURIMiss, collapsed: collapsed, detail: "wait-timeout"}.String())
		e.observe(r, Event{Outcome: OutcomeTimeout, Key: key})
		return nil, &StatusError{Status: http.StatusGatewayTimeout, Err: ErrWaitTimeout}
	case fanout.Closed:
		// The server is reloading or shutting down: an empty stream, which
		// EventSource answers by reconnecting.
		h := w.Header()
		h.Set("Content-Type", "text/event-stream")
		h.Set("Cache-Control", "no-store")
		h.Add("Cache-Status", cacheStatus{fwd: fwdBypass, detail: "closing"}.String())
		w.WriteHeader(http.StatusOK)
		e.observe(r, Event{Outcome: OutcomeBypass, Key: key, Detail: "closing"})
		return nil, nil
	default: // fanout.Gone
		e.observe(r, Event{Outcome: outcome, Key: key, Detail: "client-gone"})
		return nil, r.Context().Err()
	}
}

// refusedError: the upstream's breaker refused the stream's request.
type refusedError struct{ until time.Time }

func (e *refusedError) Error() string { return "coalesce: the upstream's breaker is open" }
func (e *refusedError) Unwrap() error { return fanout.ErrRefused }

// openStream returns how the stream of r's key sends its upstream request:
// through next, detached from every client, as a GET with the stream's
// Last-Event-ID and without compression (events are cut from the body),
// under the upstream's breaker.
//
// The stream's handler is given the first subscriber's Server field, as a
// recorder gives it the leader's (recorder.init): a handler that drops it
// (reverse_proxy drops Caddy's "Server: Caddy") drops it for every
// subscriber.
func (e *Engine) openStream(r *http.Request, next Next, server []string) fanout.Open {
	var once sync.Once
	var base *http.Request
	return func(ctx context.Context, lastEventID string, w http.ResponseWriter) error {
		// The first connection copies the subscriber's request once (its
		// values, not its cancellation); each connection gets its own copy
		// of that, so that what one connection's handlers set stays theirs.
		once.Do(func() {
			if e.hooks.Detach != nil {
				base = e.hooks.Detach(r, context.WithoutCancel(r.Context()))
			} else {
				base = r.Clone(context.WithoutCancel(r.Context()))
			}
		})
		cctx, cancel := context.WithCancel(base.Context())
		defer cancel()
		stop := context.AfterFunc(ctx, cancel)
		defer stop()
		var ur *http.Request
		if e.hooks.Detach != nil {
			ur = e.hooks.Detach(base, cctx)
		} else {
			ur = base.Clone(cctx)
		}
		ur.Method = http.MethodGet
		h := ur.Header
		h.Del("Last-Event-ID")
		if lastEventID != "" {
			h.Set("Last-Event-ID", lastEventID)
		}
		h.Set("Accept-Encoding", "identity")
		h.Del("If-None-Match")
		h.Del("If-Modified-Since")

		if len(server) > 0 {
			w.Header()["Server"] = slices.Clone(server)
		}
		pass, until := e.admit(nil, nil, time.Now())
		if !until.IsZero() {
			return &refusedError{until: until}
		}
		defer pass.release()
		// The breaker hears the outcome when the header arrives: a stream
		// lasts for hours, and a half-open breaker's probe must not.
		hw := &headerWriter{ResponseWriter: w, onHeader: func(status int) { pass.settle(ur, nil, status) }}
		// Under the breaker's timeout: an upstream that sends no header in
		// time is cut, counted as a failure and answered 504.
		err := pass.send(next, hw, ur)
		if pass.timedOut() {
			pass.settle(ur, err, 0)
			return errCut
		}
		if !hw.wrote {
			if until := pass.settle(ur, err, 0); !until.IsZero() && err != nil {
				return &refusedError{until: until}
			}
		}
		return err
	}
}

// headerWriter calls onHeader when the final response header is written.
type headerWriter struct {
	http.ResponseWriter
	onHeader func(status int)
	wrote    bool
}

func (w *headerWriter) WriteHeader(code int) {
	if !w.wrote && code >= 200 {
		w.wrote = true
		w.onHeader(code)
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *headerWriter) Write(p []byte) (int, error) {
	if !w.wrote {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

func (w *headerWriter) Flush() {
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (w *headerWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }
