package fanout

import (
	"context"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strings"
	"time"
)

// start begins a run for owner o.
func (s *stream) start(o *Owner, open Open) {
	ctx, cancel := context.WithCancel(context.Background())
	s.owner, s.state = o, connecting
	s.cur = &run{ready: make(chan struct{}), cancel: cancel}
	if s.handoverAt != nil {
		s.handoverAt.Stop()
		s.handoverAt = nil
	}
	s.hub.wg.Add(1)
	go s.loop(ctx, s.cur, o, open)
}

// loop sends the upstream request, and again whenever the connection ends,
// until the run is cancelled or the upstream is given up.
func (s *stream) loop(ctx context.Context, r *run, o *Owner, open Open) {
	defer s.hub.wg.Done()
	failures := 0
	for attempt := 0; ; attempt++ {
		s.mu.Lock()
		lastID := s.lastID
		s.mu.Unlock()
		w := &upstreamWriter{s: s, run: r, owner: o, ctx: ctx, first: attempt == 0, header: http.Header{},
			split: newSplitter(s.hub.cfg.MaxEvent, lastID)}
		err := callOpen(open, ctx, lastID, w)
		if ctx.Err() != nil {
			return // ended or handed over; the subscribers were told
		}
		switch {
		case attempt == 0 && !w.live:
			// Nobody has a header yet: the waiting subscribers get this
			// answer, as any other response.
			var ans *Answer
			if w.wroteHeader {
				ans = &Answer{Status: w.status, Header: w.header, Body: w.body, Truncated: w.truncated}
			} else if err == nil {
				err = errors.New("fanout: the upstream request returned without a response")
			}
			s.fail(r, ans, err)
			return
		case !w.live && (w.wroteHeader || errors.Is(err, ErrRefused)):
			// A reconnect met another answer than a stream, or a refusal:
			// the subscribers reconnect on their own and meet it.
			s.end(ReasonUpstream)
			return
		case w.events > 0:
			failures = 0
		default:
			failures++
		}
		if failures >= maxFailures {
			s.end(ReasonUpstream)
			return
		}
		t := time.NewTimer(s.retryDelay(failures))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		s.mu.Lock()
		s.reconnects++
		s.mu.Unlock()
		o.tally.Reconnect()
	}
}

// callOpen runs open, turning a panic (http.ErrAbortHandler is how a proxy
// aborts a response whose upstream broke) into an error.
func callOpen(open Open, ctx context.Context, lastID string, w http.ResponseWriter) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("fanout: upstream request panicked: %v", p)
		}
	}()
	return open(ctx, lastID, w)
}

func (s *stream) retryDelay(failures int) time.Duration {
	s.mu.Lock()
	d := s.retry
	s.mu.Unlock()
	if d < 0 {
		d = defaultRetry
	}
	for i := 1; i < failures && d < maxRetry; i++ {
		d *= 2
	}
	return min(d, maxRetry)
}

// goLive records the first event-stream response of run r.
func (s *stream) goLive(r *run, header http.Header) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != r || s.state != connecting {
		return
	}
	r.live, r.header = true, header
	s.state = live
	if hb := s.hub.cfg.Heartbeat; hb > 0 && s.beat == nil {
		s.beat = time.AfterFunc(hb, s.heartbeat)
	}
	close(r.ready)
}

// fail answers the subscribers waiting for run r's first response and ends
// the stream.
func (s *stream) fail(r *run, ans *Answer, err error) {
	h := s.hub
	h.mu.Lock()
	s.mu.Lock()
	r.answer, r.err = ans, err
	close(r.ready)
	subs := s.endLocked()
	for _, sub := range subs {
		// They read the answer; nobody dropped them.
		sub.removed = true
	}
	s.mu.Unlock()
	h.mu.Unlock()
}

// upstreamWriter receives one upstream connection's response.
type upstreamWriter struct {
	s     *stream
	run   *run
	owner *Owner
	ctx   context.Context
	first bool

	header      http.Header
	wroteHeader bool
	status      int
	live        bool
	split       *splitter
	events      int

	body      []byte
	truncated bool
}

func (w *upstreamWriter) Header() http.Header { return w.header }

func (w *upstreamWriter) WriteHeader(code int) {
	if w.wroteHeader || code < 200 {
		return // 1xx: informational, not the answer
	}
	w.wroteHeader, w.status = true, code
	if code == http.StatusOK && isEventStream(w.header) {
		w.live = true
		if w.first {
			w.s.goLive(w.run, w.header.Clone())
		}
	}
}

func (w *upstreamWriter) Write(p []byte) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.live {
		if room := w.s.hub.cfg.MaxEvent - len(w.body); room < len(p) {
			w.truncated = true
			w.body = append(w.body, p[:max(room, 0)]...)
		} else {
			w.body = append(w.body, p...)
		}
		return len(p), nil
	}
	var stale bool
	err := w.split.feed(p, func(ev *event) {
		if !stale && !w.s.publish(w.run, ev) {
			stale = true
		}
		w.events++
	})
	if err != nil {
		return 0, err
	}
	if stale {
		return 0, context.Canceled
	}
	return len(p), nil
}

// Flush is a no-op: events are handed on as soon as they are complete.
func (w *upstreamWriter) Flush() {}

// isEventStream: a 200 whose body can be cut into events (not compressed).
func isEventStream(h http.Header) bool {
	mt, _, err := mime.ParseMediaType(h.Get("Content-Type"))
	if err != nil || mt != "text/event-stream" {
		return false
	}
	ce := strings.TrimSpace(h.Get("Content-Encoding"))
	return ce == "" || strings.EqualFold(ce, "identity")
}
