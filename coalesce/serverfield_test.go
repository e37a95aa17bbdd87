package coalesce

import (
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// The server in front of the engine gives every response a Server field
// (Caddy's "Server: Caddy"). A handler that deletes it (reverse_proxy does)
// deletes it for every client of its response; one that leaves it alone
// leaves each client its own. That holds for the copy a background refresh
// stores, which no client's header lent the field to.
func TestServerFieldIsWhatTheHandlerMadeOfIt(t *testing.T) {
	for _, drops := range []bool{true, false} {
		t.Run(fmt.Sprintf("handler drops it: %v", drops), func(t *testing.T) {
			var n atomic.Int64
			upstream := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if drops {
					delete(w.Header(), "Server")
				}
				fmt.Fprintf(w, "v%d", n.Add(1))
			})
			e := newEngine(t, func(c *Config) {
				c.TTL = 50 * time.Millisecond
				c.Stale = 10 * time.Second
			})
			h := e.Handler(upstream)
			srv := newServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Server", "front")
				h.ServeHTTP(w, r)
			}))
			want := []string{"front"}
			if drops {
				want = nil
			}
			check := func(what string, r reply) {
				t.Helper()
				if got := r.header.Values("Server"); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("%s (%q, Cache-Status %q): Server %q, want %q", what, r.body, r.cacheStatus(), got, want)
				}
			}
			check("the miss", get(t, srv, "/x"))
			check("the hit", get(t, srv, "/x"))
			// Once the copy is stale, each request starts a refresh until
			// one has stored v2.
			var refreshed reply
			waitFor(t, "the refreshed copy", func() bool {
				refreshed = get(t, srv, "/x")
				return refreshed.body == "v2"
			})
			check("the refreshed copy", refreshed)
		})
	}
}

// A miss nobody else asked for lends its handler the client's own header,
// so that the response passes through with no copy (recorder.lend). When a
// follower joins before the response header arrives, or the breaker's
// timeout cuts the request, that header is given back as it was: the
// leader's client gets its own fields once, the follower none of them, and
// a cut answer carries nothing of the upstream's.
func TestALentHeaderGoesBackWhenTheResponseIsNotPassedThrough(t *testing.T) {
	e := newEngine(t, func(c *Config) {
		c.TTL = time.Second
		c.Breaker.Timeout = 300 * time.Millisecond
	})
	passLoneMisses(t, e)
	front := func() *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		w.Header().Set("Server", "front")
		w.Header().Set("X-Front", "set before")
		return w
	}
	g := newGate(t)
	var calls atomic.Int64
	upstream := func(w http.ResponseWriter, r *http.Request) error {
		calls.Add(1)
		h := w.Header()
		delete(h, "Server") // as reverse_proxy does, and sends Via instead
		h.Set("Via", "1.1 Caddy")
		h.Set("X-Upstream", "u")
		h.Set("Content-Length", "4")
		g.wait(r)
		if r.Context().Err() != nil {
			return r.Context().Err()
		}
		w.WriteHeader(http.StatusOK)
		_, err := w.Write([]byte("body"))
		return err
	}
	leader, follower := front(), front()
	leadAndFollow(t, e, g, "http://api.example/new", leader, follower, upstream)
	if n := calls.Load(); n != 1 {
		t.Errorf("%d upstream calls, want 1", n)
	}
	want := map[string]string{
		"leader":   "map[Cache-Status:[caddy-coalesce; fwd=uri-miss; fwd-status=200; stored] Content-Length:[4] Via:[1.1 Caddy] X-Front:[set before] X-Upstream:[u]]",
		"follower": "map[Cache-Status:[caddy-coalesce; fwd=uri-miss; fwd-status=200; collapsed] Content-Length:[4] Via:[1.1 Caddy] X-Front:[set before] X-Upstream:[u]]",
	}
	for name, w := range map[string]*httptest.ResponseRecorder{"leader": leader, "follower": follower} {
		if got := fmt.Sprint(w.Result().Header); got != want[name] || w.Body.String() != "body" {
			t.Errorf("%s: header %s, body %q; want %s, body \"body\"", name, got, w.Body, want[name])
		}
	}

	// A request the timeout cuts is answered by the engine alone.
	cut := front()
	err := e.Serve(cut, httptest.NewRequest(http.MethodGet, "http://api.example/hangs", nil), func(w http.ResponseWriter, r *http.Request) error {
		delete(w.Header(), "Server")
		w.Header().Set("X-Upstream", "too late")
		<-r.Context().Done()
		return r.Context().Err()
	})
	if !errors.Is(err, ErrUpstreamTimeout) {
		t.Fatalf("the cut request: %v, want %v", err, ErrUpstreamTimeout)
	}
	if got, want := fmt.Sprint(cut.Header()), `map[Cache-Status:[caddy-coalesce; fwd=uri-miss; fwd-status=504; detail="upstream-timeout"] Server:[front] X-Front:[set before]]`; got != want {
		t.Errorf("the cut request's header %s, want %s", got, want)
	}
}

// A field the client's header held before the engine (a per-request value,
// as Caddy's header directive sets it) stays that client's when the lent
// header's response is buffered after an interim response: the 1xx copies
// every field of the header (reverse_proxy clones and restores it), which
// must not make the leader's own value part of the shared response.
func TestALentHeadersOwnFieldsStayOutOfTheResponseAfterAnInterimResponse(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	passLoneMisses(t, e)
	front := func(id string) *httptest.ResponseRecorder {
		w := httptest.NewRecorder()
		w.Header().Set("X-Req", id)
		return w
	}
	g := newGate(t)
	upstream := func(w http.ResponseWriter, r *http.Request) error {
		h := w.Header()
		own := h.Clone()
		h.Set("Link", "</app.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		clear(h)
		maps.Copy(h, own)
		h.Set("X-Upstream", "u")
		h.Set("Content-Length", "4")
		g.wait(r)
		w.WriteHeader(http.StatusOK)
		_, err := w.Write([]byte("body"))
		return err
	}
	leader, follower := front("leader"), front("follower")
	leadAndFollow(t, e, g, "http://api.example/hints", leader, follower, upstream)
	hit := front("hit")
	if err := e.Serve(hit, httptest.NewRequest(http.MethodGet, "http://api.example/hints", nil), upstream); err != nil {
		t.Fatal(err)
	}
	for name, w := range map[string]*httptest.ResponseRecorder{"leader": leader, "follower": follower, "hit": hit} {
		if got := w.Result().Header.Values("X-Req"); !slices.Equal(got, []string{name}) || w.Body.String() != "body" {
			t.Errorf("%s: X-Req %q, body %q; want [%s], as set in front of the engine", name, got, w.Body, name)
		}
	}
}

// passLoneMisses sends e lone misses whose copies go unread, so that the
// next lone miss passes through with the client's own header lent to its
// handler (recorder.lend).
func passLoneMisses(t *testing.T, e *Engine) {
	t.Helper()
	for i := range loneWindow {
		if err := e.Serve(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "http://api.example/once/"+strconv.Itoa(i), nil), func(w http.ResponseWriter, _ *http.Request) error {
			_, err := w.Write([]byte("x"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// leadAndFollow sends url for leader, then, once its request is upstream
// (held by g), for follower, which joins its flight; then it opens g and
// waits for both.
func leadAndFollow(t *testing.T, e *Engine, g gate, url string, leader, follower http.ResponseWriter, upstream Next) {
	t.Helper()
	done := async(func() error { return e.Serve(leader, httptest.NewRequest(http.MethodGet, url, nil), upstream) })
	waitFor(t, "the leader's flight", func() bool { return flightClients(e) == 1 })
	followed := async(func() error { return e.Serve(follower, httptest.NewRequest(http.MethodGet, url, nil), upstream) })
	waitWaiters(t, e, 1)
	g.open()
	if err := receive(t, done, "the leader"); err != nil {
		t.Fatal(err)
	}
	if err := receive(t, followed, "the follower"); err != nil {
		t.Fatal(err)
	}
}
