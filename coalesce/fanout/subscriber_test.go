package fanout

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
)

// liveStream is a stream whose upstream is live, with n subscribers that
// nobody serves: what publish does to their queues can be read directly.
func liveStream(cfg Config, n int, tally Tally) (*stream, []*subscriber) {
	h := NewHub(cfg)
	s := newStream(h, "key", "/events")
	ready := make(chan struct{})
	close(ready)
	s.cur = &run{ready: ready, cancel: func() {}, live: true}
	s.state = live
	s.owner = h.NewOwner(tally)
	for i := range n {
		s.subs = append(s.subs, &subscriber{stream: s, owner: s.owner, ctx: context.Background(), run: s.cur,
			wake: make(chan struct{}, 1), index: i})
	}
	return s, append([]*subscriber(nil), s.subs...)
}

func numbered(i int) *event {
	id := fmt.Sprint(i)
	return &event{raw: fmt.Appendf(nil, "id: %d\ndata: %d\n\n", i, i), id: id, hasID: true, retry: -1}
}

// A subscriber's queue holds nothing before its first event and grows with
// its backlog; one more event than Buffer behind drops it, as a queue of
// Buffer allocated up front did.
func TestQueueGrowsWithTheBacklogAndStillDropsBeyondBuffer(t *testing.T) {
	const buffer = 64
	tally := &counts{}
	s, subs := liveStream(Config{Replay: 16, Buffer: buffer, MaxSubscribers: 10, MaxEvent: 1 << 20}, 2, tally)
	stalled, reader := subs[0], subs[1]
	for _, sub := range subs {
		if c := cap(sub.queue); c != 0 {
			t.Fatalf("a new subscriber's queue has room for %d events; want none until an event waits", c)
		}
	}

	var spare []*event
	for i := 1; i <= buffer; i++ {
		s.publish(s.cur, numbered(i))
		// The reader takes each event as it comes, as Serve does.
		batch, closed, _ := reader.take(spare)
		if len(batch) != 1 || batch[0].id != fmt.Sprint(i) || closed {
			t.Fatalf("event %d: the reader took %d events (closed %v), want event %d alone", i, len(batch), closed, i)
		}
		clear(batch)
		spare = batch[:0]
	}
	if c := cap(reader.queue) + cap(spare); c > 2 {
		t.Errorf("a reader that keeps up holds room for %d events, want at most 2", c)
	}
	if got := len(stalled.queue); got != buffer || stalled.isClosed() {
		t.Fatalf("after %d events the stalled subscriber has %d queued (closed %v); want %d queued, still open", buffer, got, stalled.isClosed(), buffer)
	}

	s.publish(s.cur, numbered(buffer+1))
	select {
	case <-stalled.wake:
	default:
		t.Fatal("the stalled subscriber was not woken when dropped")
	}
	if !stalled.isClosed() || stalled.reason != ReasonSlow || !stalled.removed {
		t.Errorf("one event more than buffer behind: closed %v, reason %q, removed %v; want dropped as slow", stalled.isClosed(), stalled.reason, stalled.removed)
	}
	if got := tally.dropped(ReasonSlow); got != 1 {
		t.Errorf("slow drops: %d, want 1", got)
	}
	if len(s.subs) != 1 || s.subs[0] != reader {
		t.Errorf("subscribers left: %d, want the reader alone", len(s.subs))
	}
	if batch, closed, _ := reader.take(nil); len(batch) != 1 || closed {
		t.Errorf("the reader got %d events (closed %v) of the last publish, want 1", len(batch), closed)
	}
}

// bufferingWriter stands for a writer that holds the response back (Caddy's
// recorder when a log wants the body): a subscriber behind it is never
// detached, or what it holds would never reach the client.
type bufferingWriter struct {
	http.ResponseWriter
	buffered bool
}

func (w *bufferingWriter) Buffered() bool              { return w.buffered }
func (w *bufferingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func TestDetachableOnlyWhenTheBodyGoesOutAsWritten(t *testing.T) {
	req := func(major int) *http.Request {
		r := httptest.NewRequest("GET", "/events", nil)
		r.ProtoMajor = major
		return r
	}
	withHeader := func(k, v string) http.ResponseWriter {
		w := httptest.NewRecorder()
		if k != "" {
			w.Header().Set(k, v)
		}
		return w
	}
	for _, c := range []struct {
		name string
		r    *http.Request
		w    http.ResponseWriter
		want bool
	}{
		{"HTTP/1.1", req(1), withHeader("", ""), true},
		{"HTTP/2", req(2), withHeader("", ""), false},
		{"compressed", req(1), withHeader("Content-Encoding", "gzip"), false},
		{"with a length", req(1), withHeader("Content-Length", "10"), false},
		{"behind a writer that streams", req(1), &bufferingWriter{ResponseWriter: httptest.NewRecorder()}, true},
		{"behind a writer that buffers", req(1), &bufferingWriter{ResponseWriter: httptest.NewRecorder(), buffered: true}, false},
		{"deeper behind one that buffers", req(1), &bufferingWriter{ResponseWriter: &bufferingWriter{ResponseWriter: httptest.NewRecorder(), buffered: true}}, false},
	} {
		if got := detachable(c.r, c.w); got != c.want {
			t.Errorf("%s: detachable %v, want %v", c.name, got, c.want)
		}
	}
}
