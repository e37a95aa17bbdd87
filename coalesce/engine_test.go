package coalesce

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// origin is a counting upstream: serve gets the number of each call (from 1).
type origin struct {
	calls atomic.Int64
	serve func(w http.ResponseWriter, r *http.Request, n int64)
}

func (o *origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.serve(w, r, o.calls.Add(1))
}

// next adapts the origin to Engine.Serve.
func (o *origin) next(w http.ResponseWriter, r *http.Request) error {
	o.ServeHTTP(w, r)
	return nil
}

func newOrigin(serve func(w http.ResponseWriter, r *http.Request, n int64)) *origin {
	return &origin{serve: serve}
}

// numbered answers "v<n>" with the given headers.
func numbered(headers ...string) *origin {
	return newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		for i := 0; i+1 < len(headers); i += 2 {
			w.Header().Add(headers[i], headers[i+1])
		}
		fmt.Fprintf(w, "v%d", n)
	})
}

// gate holds upstream calls until it is opened (or the call's context ends).
type gate struct {
	ch   chan struct{}
	once *sync.Once
}

func newGate(t *testing.T) gate {
	g := gate{make(chan struct{}), new(sync.Once)}
	t.Cleanup(g.open) // never leave an upstream call hanging
	return g
}

func (g gate) open() { g.once.Do(func() { close(g.ch) }) }

func (g gate) wait(r *http.Request) {
	select {
	case <-g.ch:
	case <-r.Context().Done():
	}
}

func newEngine(t testing.TB, change func(*Config)) *Engine {
	t.Helper()
	cfg := DefaultConfig()
	if change != nil {
		change(&cfg)
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

func newServer(t *testing.T, h http.Handler) *httptest.Server {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

// reply is what a client saw.
type reply struct {
	status int
	body   string
	header http.Header
	took   time.Duration
}

func (r reply) cacheStatus() string { return r.header.Get("Cache-Status") }

func fetch(t *testing.T, srv *httptest.Server, method, path string, headers ...string) reply {
	t.Helper()
	req, err := http.NewRequest(method, srv.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	start := time.Now()
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Errorf("%s %s: %v", method, path, err)
		return reply{}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Errorf("%s %s: reading body: %v", method, path, err)
	}
	return reply{status: resp.StatusCode, body: string(body), header: resp.Header, took: time.Since(start)}
}

func get(t *testing.T, srv *httptest.Server, path string, headers ...string) reply {
	t.Helper()
	return fetch(t, srv, http.MethodGet, path, headers...)
}

// async runs f in a goroutine and returns a channel with its result.
func async[T any](f func() T) <-chan T {
	ch := make(chan T, 1)
	go func() { ch <- f() }()
	return ch
}

func receive[T any](t *testing.T, ch <-chan T, what string) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(bound):
		t.Fatalf("%s: nothing after %v", what, bound)
		var zero T
		return zero
	}
}

// waitFor polls cond until it holds or bound passes.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited %v for %s", bound, what)
		}
		time.Sleep(time.Millisecond)
	}
}

// flightClients is how many clients e's flights answer now, as the registry
// counts them: each leader's client until it goes away, and the followers.
func flightClients(e *Engine) int {
	n := 0
	e.reg.Inflight(0, func(f registry.FlightInfo) { n += f.Clients })
	return n
}

func waitWaiters(t *testing.T, e *Engine, n int64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d followers waiting", n), func() bool { return e.Stats().Registry.Waiters == n })
}

// herd sends one request, waits until it is upstream (held by g), then
// sends n-1 more that must join it as followers, then opens g. It returns
// every reply, the leader's first.
func herd(t *testing.T, e *Engine, o *origin, g gate, n int, send func(i int) reply) []reply {
	t.Helper()
	// Also when a wait below fails the test: the test server's Close, a
	// cleanup, waits for the requests the gate holds.
	defer g.open()
	chans := []<-chan reply{async(func() reply { return send(0) })}
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() >= 1 })
	for i := 1; i < n; i++ {
		chans = append(chans, async(func() reply { return send(i) }))
	}
	waitWaiters(t, e, int64(n-1))
	g.open()
	out := make([]reply, n)
	for i, ch := range chans {
		out[i] = receive(t, ch, fmt.Sprintf("reply %d", i))
	}
	return out
}

// events collects what Hooks.Observe is told.
type events struct {
	mu   sync.Mutex
	list []Event
}

func (ev *events) observe(_ *http.Request, e Event) {
	ev.mu.Lock()
	ev.list = append(ev.list, e)
	ev.mu.Unlock()
}

func (ev *events) all() []Event {
	ev.mu.Lock()
	defer ev.mu.Unlock()
	return append([]Event(nil), ev.list...)
}

func (ev *events) count(o Outcome) int {
	n := 0
	for _, e := range ev.all() {
		if e.Outcome == o {
			n++
		}
	}
	return n
}

var (
	hitStatus = regexp.MustCompile(`^caddy-coalesce; hit; ttl=\d+; detail="ttl-ms=\d+"$`)
	integer   = regexp.MustCompile(`^\d+$`)
)

// ---- collapsing ----

func TestHundredConcurrentGETsMakeOneUpstreamCall(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"call":%d}`, n)
	})
	e := newEngine(t, nil)
	srv := newServer(t, e.Handler(o))

	replies := herd(t, e, o, g, 100, func(int) reply { return get(t, srv, "/api/sessions", "Authorization", "Bearer u1") })
	if n := o.calls.Load(); n != 1 {
		t.Fatalf("upstream calls = %d, want 1", n)
	}
	var stored, collapsed int
	for i, r := range replies {
		if r.status != 200 || r.body != `{"call":1}` || r.header.Get("Content-Type") != "application/json" {
			t.Errorf("client %d got %d %q %v", i, r.status, r.body, r.header)
		}
		switch r.cacheStatus() {
		case "caddy-coalesce; fwd=uri-miss; fwd-status=200; stored":
			stored++
		case "caddy-coalesce; fwd=uri-miss; fwd-status=200; collapsed":
			collapsed++
		default:
			t.Errorf("client %d: Cache-Status %q", i, r.cacheStatus())
		}
	}
	if stored != 1 || collapsed != 99 {
		t.Errorf("%d stored and %d collapsed replies, want 1 and 99", stored, collapsed)
	}
	if s := e.Stats().Registry; s.ActiveKeys != 0 || s.Waiters != 0 {
		t.Errorf("registry not idle afterwards: %+v", s)
	}
}

func TestDifferentUsersAreNotCollapsed(t *testing.T) {
	// Each request is held at the upstream until both are there at once:
	// had they been collapsed, the second would never arrive.
	both := make(chan struct{})
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 2 {
			close(both)
		}
		select {
		case <-both:
		case <-time.After(bound):
		}
		io.WriteString(w, r.Header.Get("Authorization"))
	})
	e := newEngine(t, nil)
	srv := newServer(t, e.Handler(o))
	a := async(func() reply { return get(t, srv, "/me", "Authorization", "alice") })
	b := async(func() reply { return get(t, srv, "/me", "Authorization", "bob") })
	if r := receive(t, a, "alice"); r.body != "alice" {
		t.Errorf("alice got %q", r.body)
	}
	if r := receive(t, b, "bob"); r.body != "bob" {
		t.Errorf("bob got %q", r.body)
	}
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2", n)
	}
}

// ---- the micro-cache ----

func TestHitWithinTTL(t *testing.T) {
	o := numbered("Content-Type", "text/plain")
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))

	first := get(t, srv, "/x")
	if first.body != "v1" || !strings.HasSuffix(first.cacheStatus(), "; stored") {
		t.Fatalf("first: %q, Cache-Status %q", first.body, first.cacheStatus())
	}
	hit := get(t, srv, "/x")
	if hit.status != 200 || hit.body != "v1" || hit.header.Get("Content-Type") != "text/plain" {
		t.Errorf("hit: %d %q %v", hit.status, hit.body, hit.header)
	}
	if !hitStatus.MatchString(hit.cacheStatus()) {
		t.Errorf("hit Cache-Status %q, want %v", hit.cacheStatus(), hitStatus)
	}
	if age := hit.header.Get("Age"); !integer.MatchString(age) {
		t.Errorf("Age %q is not an integer number of seconds", age)
	}
	if hit.header.Get("Content-Length") != "2" {
		t.Errorf("hit Content-Length %q", hit.header.Get("Content-Length"))
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
}

func TestMissAfterTTL(t *testing.T) {
	o := numbered()
	e := newEngine(t, func(c *Config) { c.TTL = 20 * time.Millisecond })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x")
	time.Sleep(50 * time.Millisecond)
	r := get(t, srv, "/x")
	if r.body != "v2" || !strings.Contains(r.cacheStatus(), "fwd=uri-miss") {
		t.Errorf("after ttl: %q, Cache-Status %q; want a fresh upstream answer", r.body, r.cacheStatus())
	}
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2", n)
	}
}

func TestRequestNoCacheSkipsTheCacheButRefreshesIt(t *testing.T) {
	o := numbered()
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x")
	if r := get(t, srv, "/x", "Cache-Control", "no-cache"); r.body != "v2" {
		t.Errorf("no-cache request got %q, want a new upstream answer", r.body)
	}
	if r := get(t, srv, "/x"); r.body != "v2" || !hitStatus.MatchString(r.cacheStatus()) {
		t.Errorf("next request got %q (%q), want a hit on the refreshed entry", r.body, r.cacheStatus())
	}
}

func TestTTLZeroCollapsesButStoresNothing(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			g.wait(r)
		}
		fmt.Fprintf(w, "v%d", n)
	})
	e := newEngine(t, func(c *Config) { c.TTL = Off })
	srv := newServer(t, e.Handler(o))
	for i, r := range herd(t, e, o, g, 10, func(int) reply { return get(t, srv, "/x") }) {
		if r.body != "v1" {
			t.Errorf("client %d got %q", i, r.body)
		}
		if strings.Contains(r.cacheStatus(), "stored") {
			t.Errorf("client %d: Cache-Status %q with ttl 0", i, r.cacheStatus())
		}
	}
	if r := get(t, srv, "/x"); r.body != "v2" {
		t.Errorf("a request after the herd got %q, want a new upstream answer", r.body)
	}
	if s := e.Stats().Cache; s.Entries != 0 {
		t.Errorf("cache holds %d entries with ttl 0", s.Entries)
	}
}

// With ttl 0 and stale, the last answer is kept for stale alone: every later
// request is answered from it at once while one refresh runs (Varnish's ttl
// 0 with grace).
func TestTTLZeroWithStaleServesTheLastAnswerWhileRefreshing(t *testing.T) {
	o := numbered()
	e := newEngine(t, func(c *Config) { c.TTL = Off; c.Stale = 5 * time.Second })
	srv := newServer(t, e.Handler(o))
	if r := get(t, srv, "/x"); r.body != "v1" || !strings.HasSuffix(r.cacheStatus(), "; stored") {
		t.Fatalf("first: %q, Cache-Status %q; want v1 stored", r.body, r.cacheStatus())
	}
	r := get(t, srv, "/x")
	if r.body != "v1" || !regexp.MustCompile(`^caddy-coalesce; hit; fwd=stale; ttl=-[1-9]\d*; detail=stale-while-revalidate$`).MatchString(r.cacheStatus()) {
		t.Errorf("second: %q, Cache-Status %q; want the stored v1, marked stale", r.body, r.cacheStatus())
	}
	waitFor(t, "the refresh", func() bool { return o.calls.Load() >= 2 })
	// Every stale answer may start the next refresh, so the copy after v1
	// may already be v3: any later answer will do.
	waitFor(t, "a refreshed copy", func() bool { return get(t, srv, "/x").body != "v1" })
}

// must-revalidate, proxy-revalidate and s-maxage forbid a shared cache to
// serve the response stale (RFC 9111 §5.2.2): neither stale nor
// stale_if_error applies to it, only ttl.
func TestMustRevalidateIsNeverServedStale(t *testing.T) {
	for _, cc := range []string{"must-revalidate", "proxy-revalidate", "s-maxage=60", "max-age=60, must-revalidate"} {
		t.Run(cc, func(t *testing.T) {
			var failing atomic.Bool
			var calls atomic.Int64
			next := func(w http.ResponseWriter, r *http.Request) error {
				n := calls.Add(1)
				if failing.Load() {
					http.Error(w, "down", http.StatusServiceUnavailable)
					return nil
				}
				w.Header().Set("Cache-Control", cc)
				fmt.Fprintf(w, "v%d", n)
				return nil
			}
			// ttl is long enough that no stall of a loaded machine ends it
			// before the hit "within ttl".
			const ttl = 300 * time.Millisecond
			e := newEngine(t, func(c *Config) {
				c.TTL = ttl
				c.Stale = 10 * time.Second
				c.StaleIfError = 10 * time.Second
			})
			serve := func() *httptest.ResponseRecorder {
				rec := httptest.NewRecorder()
				if err := e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example/x", nil), next); err != nil {
					t.Errorf("Serve: %v", err)
				}
				return rec
			}
			if rec := serve(); !strings.HasSuffix(rec.Header().Get("Cache-Status"), "; stored") {
				t.Fatalf("first: Cache-Status %q, want stored (ttl still applies)", rec.Header().Get("Cache-Status"))
			}
			stored := time.Now() // at or after the copy was stored
			if rec := serve(); !hitStatus.MatchString(rec.Header().Get("Cache-Status")) {
				t.Errorf("within ttl: Cache-Status %q, want a fresh hit", rec.Header().Get("Cache-Status"))
			}
			time.Sleep(time.Until(stored.Add(ttl + 20*time.Millisecond)))
			if rec := serve(); rec.Body.String() != "v2" || strings.Contains(rec.Header().Get("Cache-Status"), "fwd=stale") {
				t.Errorf("after ttl: %q, Cache-Status %q; want a new upstream answer, not the stale copy", rec.Body.String(), rec.Header().Get("Cache-Status"))
			}
			stored = time.Now()
			failing.Store(true)
			time.Sleep(time.Until(stored.Add(ttl + 20*time.Millisecond)))
			if rec := serve(); rec.Code != http.StatusServiceUnavailable || strings.Contains(rec.Header().Get("Cache-Status"), "fwd=stale") {
				t.Errorf("upstream failing: %d, Cache-Status %q; want its 503, not the stale copy", rec.Code, rec.Header().Get("Cache-Status"))
			}
		})
	}
}

func TestOriginCacheControlPreventsStoring(t *testing.T) {
	for _, cc := range []string{"no-store", "no-cache", "max-age=0", "s-maxage=0, max-age=60"} {
		t.Run(cc, func(t *testing.T) {
			o := numbered("Cache-Control", cc)
			e := newEngine(t, func(c *Config) { c.TTL = time.Second })
			srv := newServer(t, e.Handler(o))
			get(t, srv, "/x")
			if r := get(t, srv, "/x"); r.body != "v2" {
				t.Errorf("second request got %q: a %q response was stored", r.body, cc)
			}
		})
	}
}

func TestServerErrorsAreSharedButNotStored(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			g.wait(r)
		}
		http.Error(w, fmt.Sprintf("down %d", n), http.StatusServiceUnavailable)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	for i, r := range herd(t, e, o, g, 5, func(int) reply { return get(t, srv, "/x") }) {
		if r.status != 503 || r.body != "down 1\n" {
			t.Errorf("client %d got %d %q", i, r.status, r.body)
		}
	}
	if r := get(t, srv, "/x"); r.body != "down 2\n" {
		t.Errorf("a 503 was stored: next request got %q", r.body)
	}
}

// ---- what may not be shared ----

func TestUnshareableResponsesAreNotShared(t *testing.T) {
	for _, h := range [][2]string{
		{"Set-Cookie", "sid=secret"},
		{"Cache-Control", "private, max-age=60"},
		{"Vary", "*"},
	} {
		t.Run(h[0]+": "+h[1], func(t *testing.T) {
			const n = 10
			// The leader is held by g; each follower that goes upstream
			// alone is held until all n-1 of them are there at once (or
			// bound has passed).
			g := newGate(t)
			var alone atomic.Int64
			allAlone := make(chan struct{})
			o := newOrigin(func(w http.ResponseWriter, r *http.Request, call int64) {
				if call == 1 {
					g.wait(r)
				} else {
					if alone.Add(1) == n-1 {
						close(allAlone)
					}
					select {
					case <-allAlone:
					case <-time.After(bound):
					}
				}
				w.Header().Set(h[0], h[1])
				fmt.Fprintf(w, "v%d", call)
			})
			ev := &events{}
			e := newEngine(t, func(c *Config) { c.TTL = time.Second; c.Hooks.Observe = ev.observe })
			srv := newServer(t, e.Handler(o))

			start := time.Now()
			replies := herd(t, e, o, g, n, func(int) reply { return get(t, srv, "/x") })
			if calls := o.calls.Load(); calls != n {
				t.Errorf("upstream calls = %d, want %d (one each)", calls, n)
			}
			seen := map[string]bool{}
			for i, r := range replies {
				if seen[r.body] {
					t.Errorf("client %d got %q, which another client got too", i, r.body)
				}
				seen[r.body] = true
				if r.header.Get(h[0]) != h[1] {
					t.Errorf("client %d: %s = %q", i, h[0], r.header.Get(h[0]))
				}
			}
			// Followers go upstream all at once, never one after another.
			select {
			case <-allAlone:
			default:
				t.Errorf("%d of the %d followers were at the upstream at once: they went one by one", alone.Load(), n-1)
			}
			if took := time.Since(start); took > 1200*time.Millisecond {
				t.Errorf("the herd took %v: followers waited for each other", took)
			}
			if got := ev.count(OutcomeUncollapsible); got != n-1 {
				t.Errorf("%d uncollapsible followers observed, want %d", got, n-1)
			}

			// Hit-for-miss: the next request goes alone at once.
			r := get(t, srv, "/x")
			if r.body != fmt.Sprintf("v%d", n+1) || !strings.Contains(r.cacheStatus(), "detail=uncollapsible") {
				t.Errorf("next request: %q, Cache-Status %q; want its own upstream call marked uncollapsible", r.body, r.cacheStatus())
			}
			if s := e.Stats(); s.Uncollapsible != 1 || s.Cache.Entries != 0 {
				t.Errorf("stats %+v: want one uncollapsible key and nothing cached", s)
			}
		})
	}
}

func TestHitForMissExpires(t *testing.T) {
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			w.Header().Set("Set-Cookie", "sid=1")
		}
		fmt.Fprintf(w, "v%d", n)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second; c.HitForMiss = 300 * time.Millisecond })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x")
	if r := get(t, srv, "/x"); !strings.Contains(r.cacheStatus(), "uncollapsible") {
		t.Errorf("within hit-for-miss: Cache-Status %q", r.cacheStatus())
	}
	time.Sleep(350 * time.Millisecond)
	if r := get(t, srv, "/x"); !strings.HasSuffix(r.cacheStatus(), "stored") {
		t.Errorf("after hit-for-miss expired: Cache-Status %q, want a stored leader response", r.cacheStatus())
	}
	if r := get(t, srv, "/x"); r.body != "v3" || !hitStatus.MatchString(r.cacheStatus()) {
		t.Errorf("then: %q %q, want a hit", r.body, r.cacheStatus())
	}
}

// A stored copy for another value of a varied field is not used, and the
// request that goes upstream instead says so (RFC 9211 fwd=vary-miss).
func TestStoredCopyOfAnotherVariantIsAVaryMiss(t *testing.T) {
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Set("Vary", "Accept-Language")
		fmt.Fprintf(w, "%s v%d", r.Header.Get("Accept-Language"), n)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x", "Accept-Language", "de")
	r := get(t, srv, "/x", "Accept-Language", "en")
	if r.body != "en v2" || !strings.HasPrefix(r.cacheStatus(), "caddy-coalesce; fwd=vary-miss; fwd-status=200") {
		t.Errorf("other variant: %q, Cache-Status %q; want its own answer, fwd=vary-miss", r.body, r.cacheStatus())
	}
	if r := get(t, srv, "/x", "Accept-Language", "en"); r.body != "en v2" || !hitStatus.MatchString(r.cacheStatus()) {
		t.Errorf("same variant again: %q, Cache-Status %q; want a hit", r.body, r.cacheStatus())
	}
}

// The followers of such a request say so too: they found the same copy.
func TestFollowersOfAVaryMissSayVaryMiss(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 2 {
			g.wait(r)
		}
		w.Header().Set("Vary", "Accept-Language")
		fmt.Fprintf(w, "%s v%d", r.Header.Get("Accept-Language"), n)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x", "Accept-Language", "de")
	// herd sees one call already (de) and sends everyone at once; whoever
	// leads is call 2, held by the gate until the other three wait.
	replies := herd(t, e, o, g, 4, func(int) reply { return get(t, srv, "/x", "Accept-Language", "en") })
	for i, r := range replies {
		want := "caddy-coalesce; fwd=vary-miss; fwd-status=200"
		if r.body != "en v2" || !strings.HasPrefix(r.cacheStatus(), want) {
			t.Errorf("client %d: %q, Cache-Status %q; want en v2, %s...", i, r.body, r.cacheStatus(), want)
		}
	}
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2 (de, then one for the en herd)", n)
	}
}

// Followers that differ from the leader in a field its response varies on
// gather by variant (variants.go): one upstream request per language.
func TestVaryMismatchFollowersGatherByVariant(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			g.wait(r)
		}
		w.Header().Set("Vary", "Accept-Language")
		io.WriteString(w, r.Header.Get("Accept-Language"))
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	langs := []string{"en", "en", "fr", "en", "fr", "de"}
	replies := herd(t, e, o, g, len(langs), func(i int) reply { return get(t, srv, "/x", "Accept-Language", langs[i]) })
	for i, r := range replies {
		if r.body != langs[i] {
			t.Errorf("client %d (%s) got %q", i, langs[i], r.body)
		}
		if langs[i] != "en" && !strings.Contains(r.cacheStatus(), "fwd=vary-miss") {
			t.Errorf("client %d (%s): Cache-Status %q", i, langs[i], r.cacheStatus())
		}
	}
	// en's leader, then fr's variant flight (unless its two followers woke
	// far enough apart that the first one's flight had ended) and de's.
	if n := o.calls.Load(); n != 3 && n != 4 {
		t.Errorf("upstream calls = %d, want 3 (one per language)", n)
	}
	// The key keeps one stored variant: whichever it is, every language
	// gets its own answer.
	for _, lang := range []string{"en", "fr", "de", "en"} {
		if r := get(t, srv, "/x", "Accept-Language", lang); r.body != lang {
			t.Errorf("%s after the herd: %q %q, want its own answer", lang, r.body, r.cacheStatus())
		}
	}
}

// ---- streams and large bodies ----

func TestEventStreamReachesTheLeaderAtOnceAndFollowersGoAlone(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "data: first of %d\n\n", n)
		http.NewResponseController(w).Flush()
		if n == 1 {
			g.wait(r)
		}
		fmt.Fprintf(w, "data: last of %d\n\n", n)
	})
	e := newEngine(t, nil)
	srv := newServer(t, e.Handler(o))

	req, _ := http.NewRequest(http.MethodGet, srv.URL+"/events", nil)
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	// The first event arrives while the upstream is still holding.
	line := receive(t, async(func() string {
		l, _ := bufio.NewReader(resp.Body).ReadString('\n')
		return l
	}), "the first event")
	if line != "data: first of 1\n" {
		t.Fatalf("first line %q", line)
	}
	if cs := resp.Header.Get("Cache-Status"); !strings.Contains(cs, "detail=stream") {
		t.Errorf("leader Cache-Status %q", cs)
	}
	// Requests arriving now do not queue behind the stream.
	r := get(t, srv, "/events")
	if r.body != "data: first of 2\n\ndata: last of 2\n\n" || !strings.Contains(r.cacheStatus(), "uncollapsible") {
		t.Errorf("second client got %q (%q), want its own stream", r.body, r.cacheStatus())
	}
	g.open()
}

func TestBodyOverMaxBodyStreamsAndFollowersGoAlone(t *testing.T) {
	g := newGate(t)
	big := strings.Repeat("x", 4096)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			g.wait(r)
		}
		fmt.Fprintf(w, "%d:%s", n, big)
	})
	e := newEngine(t, func(c *Config) { c.MaxBody = 1024; c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	replies := herd(t, e, o, g, 4, func(int) reply { return get(t, srv, "/big") })
	for i, r := range replies {
		if r.status != 200 || !strings.HasSuffix(r.body, big) {
			t.Errorf("client %d: %d, %d bytes", i, r.status, len(r.body))
		}
	}
	if !strings.HasPrefix(replies[0].body, "1:") || !strings.Contains(replies[0].cacheStatus(), "too-large") {
		t.Errorf("leader got %.4q (%q)", replies[0].body, replies[0].cacheStatus())
	}
	if n := o.calls.Load(); n != 4 {
		t.Errorf("upstream calls = %d, want 4", n)
	}
	if s := e.Stats().Cache; s.Entries != 0 {
		t.Errorf("a body over max_body was stored: %+v", s)
	}
}

func TestFollowerLeavingDoesNotDisturbTheOthers(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		io.WriteString(w, "shared")
	})
	e := newEngine(t, nil)
	leader, leaderRec := serveAsync(e, context.Background(), o.next)
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
	ctx, cancel := context.WithCancel(context.Background())
	leaving, _ := serveAsync(e, ctx, o.next)
	staying, stayingRec := serveAsync(e, context.Background(), o.next)
	waitWaiters(t, e, 2)
	cancel()
	if err := receive(t, leaving, "the leaving follower"); !errors.Is(err, context.Canceled) {
		t.Errorf("the leaving follower: %v, want context.Canceled", err)
	}
	g.open()
	for name, c := range map[string]struct {
		done <-chan error
		rec  *httptest.ResponseRecorder
	}{"leader": {leader, leaderRec}, "follower": {staying, stayingRec}} {
		if err := receive(t, c.done, name); err != nil || c.rec.Body.String() != "shared" {
			t.Errorf("%s: %v, %q", name, err, c.rec.Body.String())
		}
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
}

// ---- conditional requests ----

func TestConditionalRequestsCollapse(t *testing.T) {
	const lastMod = "Mon, 02 Jan 2006 15:04:05 GMT"
	g := newGate(t)
	var validators atomic.Int64
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if r.Header.Get("If-None-Match") != "" || r.Header.Get("If-Modified-Since") != "" {
			validators.Add(1)
		}
		if n == 1 {
			g.wait(r)
		}
		w.Header().Set("ETag", `"v1"`)
		w.Header().Set("Last-Modified", lastMod)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"v":1}`)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))

	conds := [][]string{
		{"If-None-Match", `"v1"`},
		{"If-None-Match", `"v0"`},
		nil,
		{"If-None-Match", `"v0", W/"v1"`},
		{"If-Modified-Since", lastMod},
		{"If-Modified-Since", "Sun, 01 Jan 2006 00:00:00 GMT"},
	}
	want := []int{304, 200, 200, 304, 304, 200}
	replies := herd(t, e, o, g, len(conds), func(i int) reply { return get(t, srv, "/x", conds[i]...) })
	for i, r := range replies {
		if r.status != want[i] {
			t.Errorf("client %d %q: status %d, want %d", i, conds[i], r.status, want[i])
		}
		if r.status == 304 && r.body != "" {
			t.Errorf("client %d: a 304 with body %q", i, r.body)
		}
		if r.status == 200 && r.body != `{"v":1}` {
			t.Errorf("client %d: body %q", i, r.body)
		}
		if r.header.Get("Etag") != `"v1"` {
			t.Errorf("client %d: ETag %q", i, r.header.Get("Etag"))
		}
	}
	if n := validators.Load(); n != 0 {
		t.Errorf("the upstream received a client's validators %d times", n)
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
	// From the cache too.
	for i, c := range conds {
		if r := get(t, srv, "/x", c...); r.status != want[i] || !hitStatus.MatchString(r.cacheStatus()) {
			t.Errorf("hit with %q: %d %q, want %d from the cache", c, r.status, r.cacheStatus(), want[i])
		}
	}
}

// ---- HEAD and GET ----

func headOrigin() *origin {
	return newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		body := fmt.Sprintf("body of call %d", n)
		w.Header().Set("Content-Length", fmt.Sprint(len(body)))
		io.WriteString(w, body) // net/http drops it for HEAD, as Go handlers expect
	})
}

// Go's client asks for gzip on its own for a GET but not for a HEAD; the
// HEAD tests send the same Accept-Encoding explicitly, as browsers do.
var gzipOK = []string{"Accept-Encoding", "gzip"}

func TestHeadIsAnsweredFromAGetEntry(t *testing.T) {
	o := headOrigin()
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	g := get(t, srv, "/x", gzipOK...)
	h := fetch(t, srv, http.MethodHead, "/x", gzipOK...)
	if h.status != 200 || h.body != "" {
		t.Errorf("HEAD: %d %q", h.status, h.body)
	}
	if h.header.Get("Content-Length") != fmt.Sprint(len(g.body)) {
		t.Errorf("HEAD Content-Length %q, want the GET body's %d", h.header.Get("Content-Length"), len(g.body))
	}
	if !hitStatus.MatchString(h.cacheStatus()) {
		t.Errorf("HEAD Cache-Status %q, want a hit", h.cacheStatus())
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
}

func TestHeadNeverStoresAnEmptyBodyForGet(t *testing.T) {
	o := headOrigin()
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	if h := fetch(t, srv, http.MethodHead, "/x", gzipOK...); h.status != 200 || h.body != "" {
		t.Fatalf("HEAD: %d %q", h.status, h.body)
	}
	g := get(t, srv, "/x", gzipOK...)
	if g.body != "body of call 2" {
		t.Errorf("GET after HEAD got %q (Cache-Status %q), want the upstream's body", g.body, g.cacheStatus())
	}
	// A second HEAD is a hit, from either entry.
	if h := fetch(t, srv, http.MethodHead, "/x", gzipOK...); !hitStatus.MatchString(h.cacheStatus()) || h.body != "" {
		t.Errorf("second HEAD: %q %q", h.body, h.cacheStatus())
	}
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2", n)
	}
}

func TestConcurrentHeadsCollapseWithoutBody(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		w.Header().Set("Content-Length", "5")
		io.WriteString(w, "hello")
	})
	e := newEngine(t, nil)
	srv := newServer(t, e.Handler(o))
	for i, r := range herd(t, e, o, g, 5, func(int) reply { return fetch(t, srv, http.MethodHead, "/x") }) {
		if r.status != 200 || r.body != "" || r.header.Get("Content-Length") != "5" {
			t.Errorf("HEAD %d: %d %q Content-Length %q", i, r.status, r.body, r.header.Get("Content-Length"))
		}
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
}

// A HEAD that arrives while a GET for the same resource is upstream waits
// for it and answers from it (headers, no body) instead of sending a HEAD of
// its own; a GET arriving while a HEAD is upstream never waits for it.
func TestHeadFollowsAGetInFlight(t *testing.T) {
	g := newGate(t)
	var methods sync.Map
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		methods.Store(n, r.Method)
		g.wait(r)
		io.WriteString(w, "hello")
	})
	e := newEngine(t, func(c *Config) { c.TTL = Off })
	srv := newServer(t, e.Handler(o))
	// Go's client asks for gzip on a GET but not on a HEAD, which would be
	// two encoding classes: both ask for the same here, as browsers do.
	replies := herd(t, e, o, g, 3, func(i int) reply {
		if i == 0 {
			return get(t, srv, "/x", "Accept-Encoding", "gzip")
		}
		return fetch(t, srv, http.MethodHead, "/x", "Accept-Encoding", "gzip")
	})
	if r := replies[0]; r.status != 200 || r.body != "hello" {
		t.Errorf("GET: %d %q", r.status, r.body)
	}
	for i, r := range replies[1:] {
		if r.status != 200 || r.body != "" || r.header.Get("Content-Length") != "5" || !strings.HasSuffix(r.cacheStatus(), "; collapsed") {
			t.Errorf("HEAD %d: %d %q Content-Length %q Cache-Status %q; want the GET's headers, no body, collapsed",
				i, r.status, r.body, r.header.Get("Content-Length"), r.cacheStatus())
		}
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1 (the GET)", n)
	}

	// The other way round: a HEAD upstream does not hold up a GET.
	g2 := newGate(t)
	o2 := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if r.Method == http.MethodHead {
			g2.wait(r)
		}
		io.WriteString(w, "hello")
	})
	srv2 := newServer(t, e.Handler(o2))
	head := async(func() reply { return fetch(t, srv2, http.MethodHead, "/y") })
	waitFor(t, "the HEAD upstream", func() bool { return o2.calls.Load() == 1 })
	if r := get(t, srv2, "/y"); r.status != 200 || r.body != "hello" {
		t.Errorf("GET while a HEAD is upstream: %d %q", r.status, r.body)
	}
	g2.open()
	receive(t, head, "the HEAD")
	if n := o2.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2 (the HEAD and the GET)", n)
	}
}

// The micro-cache's byte budget counts len(Body): a stored body must not hold
// on to much more memory than that. A HEAD answer announcing a large
// Content-Length has no body at all, and a chunked body that grew in pieces
// must not keep the slack of its buffer.
func TestStoredBodiesHoldNoMoreMemoryThanTheyCount(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	next := func(w http.ResponseWriter, r *http.Request) error {
		if r.Method == http.MethodHead {
			w.Header().Set("Content-Length", "900000")
			w.WriteHeader(http.StatusOK)
			return nil
		}
		chunk := strings.Repeat("x", 4096)
		for range 130 { // 520 KiB, no Content-Length
			io.WriteString(w, chunk)
		}
		return nil
	}
	for _, method := range []string{http.MethodHead, http.MethodGet} {
		req := httptest.NewRequest(method, "http://api.example/big", nil)
		if err := e.Serve(httptest.NewRecorder(), req, next); err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		ent := e.cache.get(e.keys.derive(req, method), time.Now())
		if ent == nil {
			t.Fatalf("%s: not stored", method)
		}
		if n, c := len(ent.resp.Body), cap(ent.resp.Body); c > n+n/8+4096 {
			t.Errorf("%s: the stored body counts %d bytes but holds %d", method, n, c)
		}
	}
}

// ---- leaving ----

// serveAsync runs e.Serve for a request with ctx in a goroutine.
func serveAsync(e *Engine, ctx context.Context, next Next) (<-chan error, *httptest.ResponseRecorder) {
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "http://api.example/x", nil).WithContext(ctx)
	return async(func() error { return e.Serve(rec, req, next) }), rec
}

func TestFollowersSurviveTheLeaderCancelling(t *testing.T) {
	g := newGate(t)
	var upstreamCtxErr atomic.Value
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		upstreamCtxErr.Store(fmt.Sprint(r.Context().Err()))
		io.WriteString(w, "shared")
	})
	e := newEngine(t, nil)
	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	defer cancelLeader()
	leaderDone, _ := serveAsync(e, leaderCtx, o.next)
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
	var followers []<-chan error
	var recs []*httptest.ResponseRecorder
	for range 3 {
		ch, rec := serveAsync(e, context.Background(), o.next)
		followers, recs = append(followers, ch), append(recs, rec)
	}
	waitWaiters(t, e, 3)
	waitFor(t, "the leader's client and 3 followers", func() bool { return flightClients(e) == 4 })

	cancelLeader()
	// The flight no longer counts the leader's client: its cancellation has
	// reached the flight, and the upstream request must go on.
	waitFor(t, "the flight to let the leader's client go", func() bool { return flightClients(e) == 3 })
	g.open()
	receive(t, leaderDone, "leader")
	for i, ch := range followers {
		if err := receive(t, ch, "follower"); err != nil {
			t.Errorf("follower %d: %v", i, err)
		}
		if recs[i].Code != 200 || recs[i].Body.String() != "shared" {
			t.Errorf("follower %d got %d %q", i, recs[i].Code, recs[i].Body.String())
		}
	}
	if v := upstreamCtxErr.Load(); v != "<nil>" {
		t.Errorf("the upstream request's context ended (%v) although followers were waiting", v)
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
}

func TestAllClientsLeavingCancelsTheUpstreamRequest(t *testing.T) {
	cancelled := make(chan struct{})
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			<-r.Context().Done()
			close(cancelled)
			io.WriteString(w, "partial") // what an upstream might still write
			return
		}
		io.WriteString(w, "complete")
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	var cancels []context.CancelFunc
	var done []<-chan error
	for i := range 4 {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		cancels = append(cancels, cancel)
		ch, _ := serveAsync(e, ctx, o.next)
		done = append(done, ch)
		if i == 0 {
			waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
		}
	}
	waitWaiters(t, e, 3)
	for i, cancel := range cancels {
		cancel()
		if i < len(cancels)-1 {
			select {
			case <-cancelled:
				t.Fatalf("the upstream request was cancelled with %d clients still waiting", len(cancels)-1-i)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	receive(t, async(func() struct{} { <-cancelled; return struct{}{} }), "upstream cancellation")
	for i, ch := range done {
		receive(t, ch, fmt.Sprintf("client %d", i))
	}
	// Nobody wanted what the cancelled request produced: it must not be
	// served to the next client.
	h := e.Handler(o)
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://api.example/x", nil))
	if rec.Body.String() != "complete" {
		t.Errorf("the next client got %q (Cache-Status %q) from a cancelled upstream request", rec.Body.String(), rec.Header().Get("Cache-Status"))
	}
}

func TestLeaderPanicReleasesFollowersAndRepanics(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		panic(http.ErrAbortHandler)
	})
	e := newEngine(t, nil)
	leaderPanic := make(chan any, 1)
	go func() {
		defer func() { leaderPanic <- recover() }()
		rec := httptest.NewRecorder()
		e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example/x", nil), o.next)
	}()
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
	var followers []<-chan error
	for range 3 {
		ch, _ := serveAsync(e, context.Background(), o.next)
		followers = append(followers, ch)
	}
	waitWaiters(t, e, 3)
	g.open()
	if p := receive(t, leaderPanic, "leader"); p != http.ErrAbortHandler {
		t.Errorf("the leader's panic became %v, want http.ErrAbortHandler re-raised", p)
	}
	for i, ch := range followers {
		err := receive(t, ch, "follower")
		var se *StatusError
		if !errors.As(err, &se) || se.Status != http.StatusBadGateway || !errors.Is(err, ErrLeaderFailed) {
			t.Errorf("follower %d: %v, want a 502 StatusError wrapping ErrLeaderFailed", i, err)
		}
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
	if s := e.Stats(); s.Registry.ActiveKeys != 0 || s.Cache.Entries != 0 {
		t.Errorf("after the panic: %+v", s)
	}
}

func TestHandlerAnswersFollowersOfAPanicWith502(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		panic(http.ErrAbortHandler) // net/http closes the leader's connection
	})
	e := newEngine(t, nil)
	srv := newServer(t, e.Handler(o))
	srv.Config.ErrorLog = nil
	leader := async(func() error {
		resp, err := srv.Client().Get(srv.URL + "/x")
		if err == nil {
			resp.Body.Close()
			return fmt.Errorf("status %d", resp.StatusCode)
		}
		return nil
	})
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
	var followers []<-chan reply
	for range 3 {
		followers = append(followers, async(func() reply { return get(t, srv, "/x") }))
	}
	waitWaiters(t, e, 3)
	g.open()
	if err := receive(t, leader, "leader"); err != nil {
		t.Errorf("the leader's client got a response (%v), want its connection aborted", err)
	}
	for i, ch := range followers {
		if r := receive(t, ch, "follower"); r.status != http.StatusBadGateway {
			t.Errorf("follower %d got %d, want 502", i, r.status)
		}
	}
}

func TestTruncatedBodyIsNeitherSharedNorStored(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 1 {
			g.wait(r)
			w.Header().Set("Content-Length", "100")
			io.WriteString(w, strings.Repeat("x", 50))
			return
		}
		io.WriteString(w, "whole")
	})
	ev := &events{}
	e := newEngine(t, func(c *Config) { c.TTL = time.Second; c.Hooks.Observe = ev.observe })
	srv := newServer(t, e.Handler(o))
	for i, r := range herd(t, e, o, g, 4, func(int) reply { return get(t, srv, "/x") }) {
		if r.status != http.StatusBadGateway {
			t.Errorf("client %d got %d %q, want 502", i, r.status, r.body)
		}
	}
	if n := ev.count(OutcomeError); n != 3 {
		t.Errorf("%d followers observed with an error, want 3", n)
	}
	if r := get(t, srv, "/x"); r.body != "whole" {
		t.Errorf("next request got %q: the truncated body was stored", r.body)
	}
}

func TestMaxWaitAnswersFollowersWith504(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		io.WriteString(w, "late")
	})
	ev := &events{}
	e := newEngine(t, func(c *Config) { c.MaxWait = 50 * time.Millisecond; c.Hooks.Observe = ev.observe })
	srv := newServer(t, e.Handler(o))
	leader := async(func() reply { return get(t, srv, "/x") })
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
	var followers []<-chan reply
	for range 3 {
		followers = append(followers, async(func() reply { return get(t, srv, "/x") }))
	}
	for i, ch := range followers {
		r := receive(t, ch, "follower")
		if r.status != http.StatusGatewayTimeout || !strings.Contains(r.cacheStatus(), "wait-timeout") {
			t.Errorf("follower %d: %d %q", i, r.status, r.cacheStatus())
		}
		if r.took < 40*time.Millisecond || r.took > 1500*time.Millisecond {
			t.Errorf("follower %d answered after %v, want about max_wait (50ms)", i, r.took)
		}
	}
	g.open()
	if r := receive(t, leader, "leader"); r.status != 200 || r.body != "late" {
		t.Errorf("leader got %d %q", r.status, r.body)
	}
	if n := ev.count(OutcomeTimeout); n != 3 {
		t.Errorf("%d timeouts observed, want 3", n)
	}
}

// ---- stale copies ----

func TestStaleWhileRevalidateServesAtOnceWithOneRefresh(t *testing.T) {
	refresh := make(chan struct{})
	var sawValidator atomic.Bool
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 2 {
			<-refresh
		}
		if r.Header.Get("If-None-Match") != "" {
			sawValidator.Store(true)
		}
		fmt.Fprintf(w, "v%d", n)
	})
	ev := &events{}
	e := newEngine(t, func(c *Config) {
		c.TTL = 200 * time.Millisecond
		c.Stale = 10 * time.Second
		c.Hooks.Observe = ev.observe
	})
	srv := newServer(t, e.Handler(o))
	defer func() {
		select {
		case <-refresh:
		default:
			close(refresh)
		}
	}()
	get(t, srv, "/x")
	time.Sleep(250 * time.Millisecond)

	// The refresh is held until every client has its answer: none of them
	// waits for it.
	var chans []<-chan reply
	for range 20 {
		chans = append(chans, async(func() reply { return get(t, srv, "/x", "If-None-Match", `"nope"`) }))
	}
	for i, ch := range chans {
		r := receive(t, ch, "stale reply")
		if r.status != 200 || r.body != "v1" {
			t.Errorf("client %d got %d %q, want the stale v1", i, r.status, r.body)
		}
		if cs := r.cacheStatus(); !regexp.MustCompile(`^caddy-coalesce; hit; fwd=stale; ttl=-[1-9]\d*; detail=stale-while-revalidate$`).MatchString(cs) {
			t.Errorf("client %d: Cache-Status %q", i, cs)
		}
	}
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls while stale = %d, want 2 (one refresh)", n)
	}
	close(refresh)
	waitFor(t, "the refreshed entry", func() bool { return get(t, srv, "/x").body == "v2" })
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2", n)
	}
	if sawValidator.Load() {
		t.Error("the refresh carried a client's validator")
	}
	if n := ev.count(OutcomeStale); n < 20 {
		t.Errorf("%d stale outcomes observed, want at least 20", n)
	}
}

// refreshOnAHungUpstream starts an engine (ttl 10ms, stale an hour, then
// change) in front of an upstream that answers "v<n>" but hangs on its
// second call until that call's context ends, and makes that call: the
// refresh of a stale hit. It returns once the refresh is at the upstream;
// hung receives how long the refresh's upstream call ran.
func refreshOnAHungUpstream(t *testing.T, change func(*Config)) (e *Engine, srv *httptest.Server, hung <-chan time.Duration) {
	t.Helper()
	ended := make(chan time.Duration, 1)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if n == 2 {
			start := time.Now()
			<-r.Context().Done() // a hung upstream
			ended <- time.Since(start)
			return
		}
		fmt.Fprintf(w, "v%d", n)
	})
	e = newEngine(t, func(c *Config) {
		c.TTL = 10 * time.Millisecond
		c.Stale = time.Hour
		if change != nil {
			change(c)
		}
	})
	srv = newServer(t, e.Handler(o))
	get(t, srv, "/x")
	time.Sleep(20 * time.Millisecond)
	get(t, srv, "/x") // stale: starts the refresh
	waitFor(t, "the refresh upstream", func() bool { return o.calls.Load() == 2 })
	return e, srv, ended
}

// A refresh is bounded by its own timeout (max_wait), also while requests
// keep joining it as followers (a hot key whose stale window has passed):
// each follower waits at most max_wait, but overlapping followers must not
// keep a hung upstream request alive for ever.
func TestRefreshEndsAtItsTimeoutWhileFollowersKeepJoining(t *testing.T) {
	_, srv, hung := refreshOnAHungUpstream(t, func(c *Config) { c.MaxWait = 100 * time.Millisecond })
	stop := time.Now().Add(time.Second)
	var wg sync.WaitGroup
	for time.Now().Before(stop) {
		wg.Go(func() { get(t, srv, "/x", "Cache-Control", "no-cache") }) // joins the refresh
		time.Sleep(20 * time.Millisecond)
	}
	wg.Wait()
	select {
	case took := <-hung:
		if took > 600*time.Millisecond {
			t.Errorf("the refresh's upstream request ran %s, want it cancelled at its 100ms timeout", took)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the refresh's upstream request never ended")
	}
}

// A plain http.Handler cut off by the refresh's timeout returns without an
// error, having written nothing or a part: that is not a response to store.
func TestRefreshCutOffByItsTimeoutStoresNothing(t *testing.T) {
	e, srv, _ := refreshOnAHungUpstream(t, func(c *Config) { c.MaxWait = 50 * time.Millisecond })
	waitFor(t, "the refresh to end", func() bool { return e.Stats().Registry.ActiveKeys == 0 })
	if r := get(t, srv, "/x"); r.body != "v1" {
		t.Errorf("after the refresh was cut off: %d %q (%q), want the stale v1", r.status, r.body, r.cacheStatus())
	}
}

// Close runs when the last config holding the engine is cleaned up, inside
// Caddy's config reload: it must not wait for a refresh stuck on a hung
// upstream, it cancels it.
func TestCloseCancelsARefreshStuckOnAHungUpstream(t *testing.T) {
	e, _, _ := refreshOnAHungUpstream(t, nil)
	start := time.Now()
	e.Close()
	if took := time.Since(start); took > time.Second {
		t.Errorf("Close took %s waiting for a refresh (max_wait %s), want it cancelled at once", took, e.cfg.MaxWait)
	}
}

func TestStaleIfErrorServesTheLastGoodCopy(t *testing.T) {
	cases := []struct {
		name string
		fail func(w http.ResponseWriter) error
	}{
		{"5xx", func(w http.ResponseWriter) error {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return nil
		}},
		{"error", func(http.ResponseWriter) error { return errors.New("dial tcp: connection refused") }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var failing atomic.Bool
			var calls atomic.Int64
			next := func(w http.ResponseWriter, r *http.Request) error {
				n := calls.Add(1)
				if failing.Load() {
					return c.fail(w)
				}
				fmt.Fprintf(w, "good %d", n)
				return nil
			}
			e := newEngine(t, func(c *Config) { c.TTL = 20 * time.Millisecond; c.StaleIfError = 10 * time.Second })
			serve := func() *httptest.ResponseRecorder {
				rec := httptest.NewRecorder()
				if err := e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example/x", nil), next); err != nil {
					t.Errorf("Serve: %v", err)
				}
				return rec
			}
			serve()
			failing.Store(true)
			time.Sleep(40 * time.Millisecond)
			rec := serve()
			if rec.Code != 200 || rec.Body.String() != "good 1" {
				t.Errorf("got %d %q, want the last good copy", rec.Code, rec.Body.String())
			}
			cs := rec.Header().Get("Cache-Status")
			if !regexp.MustCompile(`^caddy-coalesce; fwd=stale; ttl=-[1-9]\d*; detail=stale-if-error$`).MatchString(cs) {
				t.Errorf("Cache-Status %q", cs)
			}
			if !integer.MatchString(rec.Header().Get("Age")) {
				t.Errorf("Age %q", rec.Header().Get("Age"))
			}
			if n := calls.Load(); n != 2 {
				t.Errorf("upstream calls = %d, want 2", n)
			}
		})
	}
}

func TestStaleIfErrorAnswersFollowersToo(t *testing.T) {
	g := newGate(t)
	var failing atomic.Bool
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if failing.Load() {
			g.wait(r)
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		io.WriteString(w, "good")
	})
	e := newEngine(t, func(c *Config) { c.TTL = 20 * time.Millisecond; c.StaleIfError = 10 * time.Second })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x")
	failing.Store(true)
	time.Sleep(40 * time.Millisecond)
	for i, r := range herd(t, e, o, g, 5, func(int) reply { return get(t, srv, "/x") }) {
		if r.status != 200 || r.body != "good" || !strings.Contains(r.cacheStatus(), "stale-if-error") {
			t.Errorf("client %d got %d %q (%q), want the last good copy", i, r.status, r.body, r.cacheStatus())
		}
	}
	if n := o.calls.Load(); n != 2 {
		t.Errorf("upstream calls = %d, want 2 (followers must not go upstream for a stale copy)", n)
	}
}

// The leader's stand-in copy varies on a field the follower sent otherwise:
// the follower goes alone, as for any Vary mismatch, and says so in a valid
// Cache-Status (a parameter needs a value).
func TestStaleIfErrorCopyOfAnotherVariantSendsTheFollowerAlone(t *testing.T) {
	g := newGate(t)
	var failing atomic.Bool
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Set("Vary", "X-V")
		if failing.Load() {
			g.wait(r)
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		io.WriteString(w, "good "+r.Header.Get("X-V"))
	})
	e := newEngine(t, func(c *Config) { c.TTL = 20 * time.Millisecond; c.StaleIfError = 10 * time.Second })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x", "X-V", "a")
	failing.Store(true)
	time.Sleep(40 * time.Millisecond)
	leader := async(func() reply { return get(t, srv, "/x", "X-V", "a") })
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 2 })
	follower := async(func() reply { return get(t, srv, "/x", "X-V", "b") })
	waitWaiters(t, e, 1)
	g.open()
	if r := receive(t, leader, "leader"); r.body != "good a" {
		t.Errorf("leader got %d %q (%q), want its stale copy", r.status, r.body, r.cacheStatus())
	}
	r := receive(t, follower, "follower")
	if r.body == "good a" {
		t.Errorf("follower with X-V: b got the X-V: a copy")
	}
	if cs := r.cacheStatus(); strings.HasSuffix(cs, "=") || !strings.Contains(cs, "fwd=vary-miss") {
		t.Errorf("follower Cache-Status %q, want a vary-miss with a value for every parameter", cs)
	}
}

// A background refresh that meets a failing upstream must not throw away
// the copy stale_if_error will need.
func TestFailedRefreshKeepsTheStaleIfErrorCopy(t *testing.T) {
	var failing atomic.Bool
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if failing.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		io.WriteString(w, "good")
	})
	const ttl, stale = 20 * time.Millisecond, 300 * time.Millisecond
	e := newEngine(t, func(c *Config) {
		c.TTL = ttl
		c.Stale = stale
		c.StaleIfError = 10 * time.Second
	})
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/x")
	stored := time.Now() // the entry was stored a little earlier
	failing.Store(true)
	time.Sleep(2 * ttl)
	// Within stale: served stale while one refresh runs, and fails.
	if r := get(t, srv, "/x"); r.body != "good" || !strings.Contains(r.cacheStatus(), "stale-while-revalidate") {
		t.Fatalf("within stale: %d %q (%q)", r.status, r.body, r.cacheStatus())
	}
	waitFor(t, "the refresh", func() bool { return o.calls.Load() == 2 && e.Stats().Registry.ActiveKeys == 0 })
	time.Sleep(time.Until(stored.Add(ttl + stale + 20*time.Millisecond)))
	r := get(t, srv, "/x")
	if r.status != 200 || r.body != "good" || !strings.Contains(r.cacheStatus(), "stale-if-error") {
		t.Errorf("after a failed refresh: %d %q (%q), want the last good copy", r.status, r.body, r.cacheStatus())
	}
}

// ---- bypass and kill switch ----

func TestBypassedRequestsGoStraightUpstream(t *testing.T) {
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		body, _ := io.ReadAll(r.Body)
		fmt.Fprintf(w, "v%d %s", n, body)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	cases := []struct {
		method  string
		headers []string
		detail  string
	}{
		{"POST", nil, "fwd=method; detail=method"},
		{"GET", []string{"Range", "bytes=0-1"}, "fwd=bypass; detail=range"},
		{"GET", []string{"Accept", "text/event-stream"}, "fwd=bypass; detail=event-stream"},
		{"GET", []string{"Cache-Control", "no-store"}, "fwd=request; detail=no-store"},
	}
	for _, c := range cases {
		for range 2 {
			if r := fetch(t, srv, c.method, "/x", c.headers...); r.cacheStatus() != "caddy-coalesce; "+c.detail {
				t.Errorf("%s %q: Cache-Status %q", c.method, c.headers, r.cacheStatus())
			}
		}
	}
	if n := o.calls.Load(); n != int64(2*len(cases)) {
		t.Errorf("upstream calls = %d, want %d", n, 2*len(cases))
	}
	if s := e.Stats().Cache; s.Entries != 0 {
		t.Errorf("bypassed responses stored: %+v", s)
	}
}

// RFC 9211: each cache appends its member, so ours (the cache nearest the
// client) comes after those of caches behind it, also on responses that
// pass straight through. reverse_proxy Adds the upstream's fields to the
// header map the handler was given.
func TestCacheStatusIsAppendedAfterTheUpstreamsOnPassThrough(t *testing.T) {
	var killed atomic.Bool
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Add("Cache-Status", "origin-cache; hit")
		if r.URL.Path == "/cookie" {
			w.Header().Set("Set-Cookie", "a=b")
		}
		io.WriteString(w, "body")
	})
	e := newEngine(t, func(c *Config) { c.Hooks.Disabled = killed.Load })
	srv := newServer(t, e.Handler(o))
	check := func(what string, r reply) {
		t.Helper()
		if got := r.header.Values("Cache-Status"); len(got) != 2 || got[0] != "origin-cache; hit" || !strings.HasPrefix(got[1], CacheName+";") {
			t.Errorf("%s: Cache-Status %q, want the origin's member, then ours", what, got)
		}
	}
	check("POST", fetch(t, srv, http.MethodPost, "/x"))
	check("Range", get(t, srv, "/x", "Range", "bytes=0-1"))
	get(t, srv, "/cookie") // not shareable: the next request goes alone
	check("uncollapsible", get(t, srv, "/cookie"))
	killed.Store(true)
	check("kill switch", get(t, srv, "/x"))
}

// A GET with a chunked body (a search query, say) arrives at a handler with
// the body's framing in r.TransferEncoding, not in the header.
func TestChunkedRequestBodyIsNotCollapsed(t *testing.T) {
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "answer to %s", body)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	srv := newServer(t, e.Handler(o))
	send := func(query string) string {
		conn, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		fmt.Fprintf(conn, "GET /search HTTP/1.1\r\nHost: api.example\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(query), query)
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return string(b)
	}
	if got := send("cats"); got != "answer to cats" {
		t.Fatalf("first: %q", got)
	}
	if got := send("dogs"); got != "answer to dogs" {
		t.Errorf("a different body got %q: the first body's answer was reused", got)
	}
}

func TestKillSwitchSendsEveryRequestUpstream(t *testing.T) {
	var disabled atomic.Bool
	disabled.Store(true)
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		fmt.Fprintf(w, "v%d", n)
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second; c.Hooks.Disabled = disabled.Load })
	srv := newServer(t, e.Handler(o))
	var chans []<-chan reply
	for range 5 {
		chans = append(chans, async(func() reply { return get(t, srv, "/x") }))
	}
	waitFor(t, "5 upstream calls", func() bool { return o.calls.Load() == 5 })
	g.open()
	for i, ch := range chans {
		if r := receive(t, ch, "reply"); r.cacheStatus() != "caddy-coalesce; fwd=bypass; detail=disabled" {
			t.Errorf("client %d: Cache-Status %q", i, r.cacheStatus())
		}
	}
	get(t, srv, "/x")
	if n := o.calls.Load(); n != 6 {
		t.Errorf("upstream calls = %d, want 6 with the kill switch on", n)
	}
	disabled.Store(false)
	get(t, srv, "/x")
	if r := get(t, srv, "/x"); !hitStatus.MatchString(r.cacheStatus()) {
		t.Errorf("after switching back on: Cache-Status %q, want a hit", r.cacheStatus())
	}
}

// ---- observability ----

func TestObserveIsToldEveryOutcome(t *testing.T) {
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if r.URL.Path == "/slow" {
			g.wait(r)
		}
		fmt.Fprintf(w, "v%d", n)
	})
	ev := &events{}
	e := newEngine(t, func(c *Config) { c.TTL = time.Second; c.Hooks.Observe = ev.observe })
	srv := newServer(t, e.Handler(o))

	get(t, srv, "/x")
	get(t, srv, "/x")
	fetch(t, srv, http.MethodPost, "/x")
	herd(t, e, o, g, 3, func(int) reply { return get(t, srv, "/slow") })

	list := ev.all()
	if len(list) != 6 {
		t.Fatalf("%d events, want 6: %+v", len(list), list)
	}
	want := []struct {
		outcome  Outcome
		upstream bool
		stored   bool
	}{
		{OutcomeLeader, true, true},
		{OutcomeHit, false, false},
		{OutcomeBypass, true, false},
	}
	for i, w := range want {
		got := list[i]
		if got.Outcome != w.outcome || got.Upstream != w.upstream || got.Stored != w.stored {
			t.Errorf("event %d = %+v, want outcome %s upstream %v stored %v", i, got, w.outcome, w.upstream, w.stored)
		}
	}
	if list[0].Key != list[1].Key || list[0].Key == (Key{}) {
		t.Error("the leader and the hit of one request are not told the same key")
	}
	if list[2].Key != (Key{}) || list[2].Detail != "method" {
		t.Errorf("bypass event %+v, want no key and detail method", list[2])
	}
	var leaders, collapsed int
	for _, got := range list[3:] {
		switch got.Outcome {
		case OutcomeLeader:
			leaders++
			if got.Waiters != 2 {
				t.Errorf("leader told of %d waiters, want 2", got.Waiters)
			}
		case OutcomeCollapsed:
			collapsed++
			if got.Wait <= 0 || got.Upstream {
				t.Errorf("follower event %+v, want a wait and no upstream call", got)
			}
		}
	}
	if leaders != 1 || collapsed != 2 {
		t.Errorf("herd: %d leaders, %d collapsed, want 1 and 2", leaders, collapsed)
	}
}

func TestCacheStatusNeverCarriesTheKey(t *testing.T) {
	o := numbered()
	ev := &events{}
	e := newEngine(t, func(c *Config) { c.TTL = time.Second; c.Hooks.Observe = ev.observe })
	srv := newServer(t, e.Handler(o))
	for range 2 {
		r := get(t, srv, "/x", "Authorization", "Bearer secret-token")
		k := ev.all()[0].Key
		for _, v := range r.header.Values("Cache-Status") {
			if strings.Contains(v, k.String()) || strings.Contains(v, "secret") {
				t.Errorf("Cache-Status %q reveals the key or the credential", v)
			}
		}
	}
}

// ---- isolation between clients ----

func TestResponseHeadersAreCopies(t *testing.T) {
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Set("X-List", "a")
		w.Header().Add("X-List", "b")
		io.WriteString(w, "body")
	})
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	serve := func() http.Header {
		rec := httptest.NewRecorder()
		e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example/x", nil), o.next)
		return rec.Header()
	}
	first := serve()
	first["X-List"][0] = "mutated"
	first["X-List"] = append(first["X-List"][:1], "appended")
	first.Set("X-New", "1")
	second := serve()
	second["X-List"][1] = "mutated too"
	third := serve()
	if got := strings.Join(third["X-List"], ","); got != "a,b" || third.Get("X-New") != "" {
		t.Errorf("a later client got X-List %q X-New %q after others mutated theirs", got, third.Get("X-New"))
	}
	if n := o.calls.Load(); n != 1 {
		t.Errorf("upstream calls = %d, want 1", n)
	}
}

func TestWithHooksSharesStateNotHooks(t *testing.T) {
	o := numbered()
	evA, evB := &events{}, &events{}
	a := newEngine(t, func(c *Config) { c.TTL = time.Second; c.Hooks.Observe = evA.observe })
	var off atomic.Bool
	b := a.WithHooks(Hooks{Observe: evB.observe, Disabled: off.Load})
	serve := func(e *Engine) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		e.Handler(o).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "http://api.example/x", nil))
		return rec
	}

	serve(a)
	if r := serve(b); r.Body.String() != "v1" || !hitStatus.MatchString(r.Header().Get("Cache-Status")) {
		t.Errorf("engine B got %q (%q), want a hit on engine A's entry", r.Body.String(), r.Header().Get("Cache-Status"))
	}
	if len(evA.all()) != 1 || len(evB.all()) != 1 || evB.all()[0].Outcome != OutcomeHit {
		t.Errorf("A observed %+v, B observed %+v: each should see only its own requests", evA.all(), evB.all())
	}
	off.Store(true)
	if r := serve(b); !strings.Contains(r.Header().Get("Cache-Status"), "detail=disabled") {
		t.Errorf("B's kill switch is ignored: %q", r.Header().Get("Cache-Status"))
	}
	if r := serve(a); !hitStatus.MatchString(r.Header().Get("Cache-Status")) {
		t.Errorf("B's kill switch turned A off: %q", r.Header().Get("Cache-Status"))
	}
	if a.Stats().Cache != b.Stats().Cache {
		t.Error("A and B report different caches")
	}
}

// ---- configuration ----

func TestTTLSecondsRoundsDown(t *testing.T) {
	for _, c := range []struct {
		left time.Duration
		want int64
	}{
		{1500 * time.Millisecond, 1}, {999 * time.Millisecond, 0}, {0, 0},
		{-time.Millisecond, -1}, {-300 * time.Millisecond, -1}, {-time.Second, -1}, {-1001 * time.Millisecond, -2},
	} {
		if got := ttlSeconds(c.left); got != c.want {
			t.Errorf("ttlSeconds(%s) = %d, want %d", c.left, got, c.want)
		}
	}
}

func TestNewRejectsAnInvalidConfig(t *testing.T) {
	for name, change := range map[string]func(*Config){
		"ttl over 1s":       func(c *Config) { c.TTL = 2 * time.Second },
		"negative stale":    func(c *Config) { c.Stale = -1 },
		"negative max body": func(c *Config) { c.MaxBody = -1 },
		"negative entries":  func(c *Config) { c.MaxEntries = -1 },
		"bad header name":   func(c *Config) { c.KeyHeaders = []string{"X Bad"} },
	} {
		cfg := DefaultConfig()
		change(&cfg)
		if _, err := New(cfg); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
	if _, err := New(DefaultConfig()); err != nil {
		t.Errorf("DefaultConfig: %v", err)
	}
}

// A refresh that meets a healthy response it cannot buffer (grown past
// max_body, or a stream) must not keep serving the old copy: the copy is
// dropped, the upstream's breaker counts a success, and the key is sent
// upstream without collapsing (hit-for-miss), so the next request streams
// from the upstream like any other.
func TestRefreshMeetingAnUnbufferableResponseDropsTheCopy(t *testing.T) {
	for _, tc := range []struct {
		name, detail string
		serve        func(w http.ResponseWriter)
	}{
		{"too large", "too-large", func(w http.ResponseWriter) { io.WriteString(w, strings.Repeat("b", 4096)) }},
		{"stream", "stream", func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "text/event-stream")
			io.WriteString(w, "data: one\n\n")
			w.(http.Flusher).Flush()
			io.WriteString(w, "data: two\n\n")
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
				if n == 1 {
					io.WriteString(w, "small")
					return
				}
				tc.serve(w)
			})
			set := NewBreakers(nil)
			e := newEngine(t, func(c *Config) {
				c.TTL = 10 * time.Millisecond
				c.Stale = time.Hour
				c.MaxBody = 1024
				c.Breakers = set
			})
			srv := newServer(t, e.Handler(o))
			get(t, srv, "/x")
			time.Sleep(20 * time.Millisecond) // past ttl
			if r := get(t, srv, "/x"); r.body != "small" {
				t.Fatalf("within stale: %q (%q), want the stale copy", r.body, r.cacheStatus())
			}
			waitFor(t, "the refresh", func() bool { return o.calls.Load() == 2 && e.Stats().Registry.ActiveKeys == 0 })
			r := get(t, srv, "/x")
			if r.body == "small" || o.calls.Load() != 3 || strings.Contains(r.cacheStatus(), "stale") {
				t.Errorf("after the refresh: %q (%q), %d upstream calls; want the upstream's answer, 3 calls", r.body, r.cacheStatus(), o.calls.Load())
			}
			if !strings.Contains(r.cacheStatus(), "detail=uncollapsible") {
				t.Errorf("after the refresh: Cache-Status %q, want the key marked hit-for-miss (detail=uncollapsible)", r.cacheStatus())
			}
			if st := e.Stats(); st.Cache.Entries != 0 || st.Uncollapsible != 1 {
				t.Errorf("cache %+v, %d hit-for-miss keys; want the copy dropped and the key marked", st.Cache, st.Uncollapsible)
			}
			for _, b := range set.Snapshot() {
				if b.Counts.Failures != 0 || b.Counts.Successes < 2 {
					t.Errorf("breaker of %s: %+v, want the refresh counted as a success", b.Upstream, b.Counts)
				}
			}
		})
	}
}

// slowClient is a client's ResponseWriter whose first body write waits for
// release, as a client that reads slowly holds its leader's buffer.
type slowClient struct {
	*httptest.ResponseRecorder
	writing chan struct{}
	release chan struct{}
	once    sync.Once
}

func newSlowClient() *slowClient {
	return &slowClient{ResponseRecorder: httptest.NewRecorder(), writing: make(chan struct{}), release: make(chan struct{})}
}

func (c *slowClient) Write(p []byte) (int, error) {
	c.once.Do(func() { close(c.writing) })
	<-c.release
	return c.ResponseRecorder.Write(p)
}

// max_flight_memory bounds what all flights buffer at once: while one
// leader's slow client holds a buffered response, a leader that would go
// past the budget streams to its own client, its followers go upstream on
// their own, and the key is not marked: once the memory is free, the next
// flight buffers and shares again.
func TestFlightMemoryBoundsWhatFlightsBufferAtOnce(t *testing.T) {
	const size = 48 << 10
	body := strings.Repeat("b", size)
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if r.URL.Path == "/b" && n == 2 {
			g.wait(r) // the first flight for /b: held until its follower waits
		}
		w.Header().Set("Content-Length", strconv.Itoa(size))
		io.WriteString(w, body)
	})
	e := newEngine(t, func(c *Config) {
		c.MaxBody = 64 << 10
		c.MaxFlightMemory = 64 << 10
	})
	serve := func(w http.ResponseWriter, path string) <-chan error {
		return async(func() error { return e.Serve(w, httptest.NewRequest("GET", path, nil), o.next) })
	}

	// /a: buffered, held while its client reads slowly.
	slow := newSlowClient()
	a := serve(slow, "/a")
	receive(t, slow.writing, "the slow client's first write")
	if got := e.Stats().FlightBytes; got != size {
		t.Fatalf("flight bytes while /a is written: %d, want %d", got, size)
	}

	// /b: no room left; its leader streams and its follower goes upstream.
	leader := httptest.NewRecorder()
	b := serve(leader, "/b")
	waitFor(t, "the leader of /b upstream", func() bool { return o.calls.Load() == 2 })
	follower := httptest.NewRecorder()
	bf := serve(follower, "/b")
	waitWaiters(t, e, 1)
	g.open()
	if err := receive(t, b, "the leader of /b"); err != nil {
		t.Fatal(err)
	}
	if err := receive(t, bf, "the follower of /b"); err != nil {
		t.Fatal(err)
	}
	if leader.Body.Len() != size || !strings.Contains(leader.Header().Get("Cache-Status"), "detail=flight-memory") {
		t.Errorf("leader of /b: %d bytes, Cache-Status %q; want the whole body, streamed (detail=flight-memory)", leader.Body.Len(), leader.Header().Get("Cache-Status"))
	}
	if follower.Body.Len() != size || !strings.Contains(follower.Header().Get("Cache-Status"), "detail=flight-memory") {
		t.Errorf("follower of /b: %d bytes, Cache-Status %q; want the whole body from its own request (detail=flight-memory)", follower.Body.Len(), follower.Header().Get("Cache-Status"))
	}
	if n := o.calls.Load(); n != 3 {
		t.Errorf("upstream calls: %d, want 3 (/a, and /b's leader and follower each)", n)
	}

	close(slow.release)
	if err := receive(t, a, "the slow client of /a"); err != nil || slow.Body.Len() != size {
		t.Fatalf("/a: %v, %d bytes", err, slow.Body.Len())
	}
	if got := e.Stats().FlightBytes; got != 0 {
		t.Errorf("flight bytes after every flight: %d, want 0", got)
	}
	// The budget says nothing about /b: it is not hit-for-miss, and the
	// next flight buffers and stores it.
	if st := e.Stats(); st.Uncollapsible != 0 {
		t.Errorf("%d keys marked hit-for-miss, want none", st.Uncollapsible)
	}
	next := httptest.NewRecorder()
	if err := e.Serve(next, httptest.NewRequest("GET", "/b", nil), o.next); err != nil || !strings.Contains(next.Header().Get("Cache-Status"), "stored") {
		t.Errorf("/b once the memory is free: %v, Cache-Status %q; want it stored", err, next.Header().Get("Cache-Status"))
	}
}
