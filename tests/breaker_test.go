package tests

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The circuit breaker, end to end: real upstreams on 127.0.0.1 behind the
// in-process Caddy.

// failingUpstream starts an upstream that answers 200 "good" while bad is
// false and 503 while it is true; bad starts set to down.
func failingUpstream(t *testing.T, down bool) (up *upstream, bad *atomic.Bool) {
	bad = new(atomic.Bool)
	bad.Store(down)
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if bad.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprint(w, "good")
	}), bad
}

// breakerSite is a site with `coalesce { <options> }` in front of
// `reverse_proxy <upstreams> { <proxy> }`.
func breakerSite(options, upstreams, proxy string) string {
	return fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	coalesce {
%s
	}
	reverse_proxy %s {
%s
	}
}
`, httpPort, options, upstreams, proxy)
}

// isBreakerOpen reports whether f is the handler's own answer for an open
// breaker: 503, Retry-After in whole seconds within 1..maxSecs, and the
// Cache-Status that says so.
func isBreakerOpen(f fetched, maxSecs int) bool {
	secs, err := strconv.Atoi(f.header.Get("Retry-After"))
	return f.err == nil && f.status == http.StatusServiceUnavailable && err == nil && secs >= 1 && secs <= maxSecs &&
		strings.Contains(f.cacheStatus(), "caddy-coalesce; fwd=bypass; detail=breaker-open")
}

func TestBreakerTripsAfterFailuresAndAnswers503WithoutTheUpstream(t *testing.T) {
	up, _ := failingUpstream(t, true)
	startCaddy(t, breakerSite("breaker {\nfailures 3\nopen 10s\n}", "{up}", ""), up)
	client := newClient(t)

	for i := range 3 {
		f := get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i)))
		if f.status != http.StatusServiceUnavailable || f.header.Get("Retry-After") != "" {
			t.Fatalf("failure %d: %d Retry-After %q; the upstream's own 503 should pass through", i, f.status, f.header.Get("Retry-After"))
		}
	}
	for i := range 20 {
		f := get(client, "GET", baseURL+pathFor(t, "/open"+strconv.Itoa(i)))
		if !isBreakerOpen(f, 10) {
			t.Fatalf("request %d after the trip: %d Retry-After %q Cache-Status %q", i, f.status, f.header.Get("Retry-After"), f.cacheStatus())
		}
	}
	// A request that is never collapsed (POST) is answered the same way.
	if f := get(client, "POST", baseURL+pathFor(t, "/post")); !isBreakerOpen(f, 10) {
		t.Errorf("POST after the trip: %d %q", f.status, f.cacheStatus())
	}
	if n := up.Calls(); n != 3 {
		t.Errorf("the upstream got %d requests, want only the 3 that tripped the breaker", n)
	}
}

func TestBreakerCountsAConnectionRefusedUpstreamAsFailing(t *testing.T) {
	dead := &upstream{addr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	startCaddy(t, breakerSite("breaker {\nfailures 2\n}", "{up}", ""), dead)
	client := newClient(t)
	for i := range 2 {
		if f := get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i))); f.status != http.StatusBadGateway {
			t.Fatalf("request %d to a closed port: %d, want reverse_proxy's 502", i, f.status)
		}
	}
	if f := get(client, "GET", baseURL+pathFor(t, "/after")); !isBreakerOpen(f, 10) {
		t.Fatalf("after 2 refused connections: %d Retry-After %q %q", f.status, f.header.Get("Retry-After"), f.cacheStatus())
	}
}

func TestBreakerRecoversThroughAProbeAfterOpen(t *testing.T) {
	up, bad := failingUpstream(t, true)
	startCaddy(t, breakerSite("breaker {\nfailures 2\nopen 1s\n}", "{up}", ""), up)
	client := newClient(t)
	for i := range 2 {
		get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i)))
	}
	bad.Store(false) // the upstream is back, but the breaker does not know yet
	if f := get(client, "GET", baseURL+pathFor(t, "/early")); !isBreakerOpen(f, 1) {
		t.Fatalf("within open: %d %q", f.status, f.cacheStatus())
	}
	time.Sleep(1100 * time.Millisecond)
	before := up.Calls()
	if f := get(client, "GET", baseURL+pathFor(t, "/probe")); f.status != http.StatusOK || f.body != "good" {
		t.Fatalf("the probe after open: %d %q", f.status, f.body)
	}
	for i := range 10 {
		if f := get(client, "GET", baseURL+pathFor(t, "/closed"+strconv.Itoa(i))); f.status != http.StatusOK {
			t.Fatalf("after a good probe, request %d: %d %q", i, f.status, f.cacheStatus())
		}
	}
	if n := up.Calls() - before; n != 11 {
		t.Errorf("after the probe the upstream got %d requests, want 11 (closed again)", n)
	}
}

func TestBreakerLetsOnlyProbesReachAHalfOpenUpstreamUnderAHerd(t *testing.T) {
	var bad atomic.Bool
	bad.Store(true)
	// The probe is answered once the rest of the herd has been answered
	// (or after 10s): the whole herd arrives while the probe runs.
	var answered atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if bad.Load() {
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		waitFor(10*time.Second, func() bool { return answered.Load() == 99 || r.Context().Err() != nil })
		_, _ = fmt.Fprint(w, "good")
	})
	startCaddy(t, breakerSite("breaker {\nfailures 2\nopen 1s\nprobes 1\n}", "{up}", ""), up)
	client := newClient(t)
	warm(t, client, 100)
	for i := range 2 {
		get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i)))
	}
	bad.Store(false)
	time.Sleep(1100 * time.Millisecond)
	before := up.Calls()
	// 100 different URLs: nothing collapses; only the breaker holds them.
	got := together(100, func(i int) fetched {
		f := get(client, "GET", baseURL+pathFor(t, "/herd"+strconv.Itoa(i)))
		answered.Add(1)
		return f
	})
	ok, refused := 0, 0
	for i, f := range got {
		switch {
		case f.status == http.StatusOK:
			ok++
		case isBreakerOpen(f, 1):
			refused++
		default:
			t.Errorf("client %d: %d %q %v", i, f.status, f.cacheStatus(), f.err)
		}
	}
	if n := up.Calls() - before; n != 1 || ok != 1 || refused != 99 {
		t.Errorf("half-open, probes 1, herd of 100: %d reached the upstream, %d ok, %d answered as open", n, ok, refused)
	}
}

func TestBreakerPoolServesEveryRequestAroundADeadMember(t *testing.T) {
	const open = 4 * time.Second
	live := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { _, _ = fmt.Fprint(w, "live") })
	// A dead process behind a port that still accepts: every connection is
	// closed at once, a transport error for each request sent to it.
	dead := newRawUpstream(t, func(net.Conn) {})
	startCaddy(t, breakerSite("breaker {\nfailures 3\nopen 4s\n}", live.addr+" "+dead.addr(), "lb_policy breaker round_robin\nlb_retries 2"))
	client := newClient(t)
	warm(t, client, 50)

	requests, failed := 0, 0
	check := func(phase string, got []fetched) {
		for i, f := range got {
			requests++
			if f.err != nil || f.status != http.StatusOK || f.body != "live" {
				if failed++; failed <= 5 {
					t.Errorf("%s, client %d: %d %q %v", phase, i, f.status, clip(f.body), f.err)
				}
			}
		}
	}
	// One at a time until the breaker trips: every failed attempt on the
	// dead member is retried on the live one.
	var first []fetched
	for i := 0; dead.Accepted() < 3 && i < 20; i++ {
		first = append(first, get(client, "GET", baseURL+pathFor(t, "/seq"+strconv.Itoa(i))))
	}
	tripped := time.Now()
	for i := range 5 {
		first = append(first, get(client, "GET", baseURL+pathFor(t, "/more"+strconv.Itoa(i))))
	}
	check("before the trip", first)
	if n := dead.Accepted(); n != 3 {
		t.Fatalf("the dead member got %d requests before its breaker tripped, want 3", n)
	}
	// While open: herds of different URLs never reach the dead member.
	for round := 0; round == 0 || time.Since(tripped) < open/2; round++ {
		check("while open", together(100, func(i int) fetched {
			return get(client, "GET", baseURL+pathFor(t, fmt.Sprintf("/open%d-%d", round, i)))
		}))
	}
	if time.Since(tripped) >= open {
		t.Fatalf("the machine is too slow for this test: the open phase took %s", time.Since(tripped))
	}
	if n := dead.Accepted(); n != 3 {
		t.Errorf("the dead member got %d requests while its breaker was open, want none after the 3", n-3)
	}
	// After open: one probe, which fails (and is retried on the live
	// member), and the breaker is open again for as long.
	time.Sleep(time.Until(tripped.Add(open + 200*time.Millisecond)))
	probing := time.Now()
	for round := 0; round == 0 || time.Since(probing) < open/2; round++ {
		check("after open", together(50, func(i int) fetched {
			return get(client, "GET", baseURL+pathFor(t, fmt.Sprintf("/probe%d-%d", round, i)))
		}))
	}
	if n := dead.Accepted(); n != 4 && time.Since(probing) < open {
		t.Errorf("after open the dead member got %d requests, want exactly 1 probe", n-3)
	}
	t.Logf("pool of 2, one dead: %d client requests, %d failed; %d reached the dead member (3 to trip, 1 probe)",
		requests, failed, dead.Accepted())
}

func TestBreakerRatioDoesNotTripBelowMin(t *testing.T) {
	up, _ := failingUpstream(t, true)
	startCaddy(t, breakerSite("breaker {\nratio 0.5 min 10 window 10s\n}", "{up}", ""), up)
	client := newClient(t)
	for i := range 9 {
		if f := get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i))); f.status != http.StatusServiceUnavailable || f.header.Get("Retry-After") != "" {
			t.Fatalf("failure %d of a sample below min: %d Retry-After %q", i, f.status, f.header.Get("Retry-After"))
		}
	}
	if n := up.Calls(); n != 9 {
		t.Fatalf("9 failures below min 10: %d reached the upstream", n)
	}
	get(client, "GET", baseURL+pathFor(t, "/10th"))
	if f := get(client, "GET", baseURL+pathFor(t, "/11th")); !isBreakerOpen(f, 10) {
		t.Fatalf("10 of 10 failed with ratio 0.5 min 10: %d %q", f.status, f.cacheStatus())
	}
	if n := up.Calls(); n != 10 {
		t.Errorf("%d reached the upstream, want 10", n)
	}
}

func TestBreakerDoesNotCountClientsThatGaveUp(t *testing.T) {
	var slowNow atomic.Bool
	slowNow.Store(true)
	var cancelled atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if slowNow.Load() {
			select {
			case <-time.After(3 * time.Second):
			case <-r.Context().Done():
				cancelled.Add(1)
				return
			}
		}
		_, _ = fmt.Fprint(w, "good")
	})
	startCaddy(t, breakerSite("breaker {\nfailures 2\n}", "{up}", ""), up)
	impatient := newClient(t)
	impatient.Timeout = 100 * time.Millisecond
	for i := range 5 {
		if f := get(impatient, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i))); f.err == nil {
			t.Fatalf("client %d did not give up: %d", i, f.status)
		}
	}
	if !waitFor(2*time.Second, func() bool { return cancelled.Load() == 5 }) {
		t.Fatalf("%d of 5 upstream requests were cancelled", cancelled.Load())
	}
	slowNow.Store(false)
	before := up.Calls()
	if f := get(newClient(t), "GET", baseURL+pathFor(t, "/after")); f.status != http.StatusOK || up.Calls() != before+1 {
		t.Fatalf("after 5 clients gave up (failures 2): %d %q; their cancels must not count", f.status, f.cacheStatus())
	}
}

func TestStaleIfErrorServesTheLastGoodCopyDuringAnOutageAndStopsAfterItsWindow(t *testing.T) {
	up, bad := failingUpstream(t, false)
	startCaddy(t, breakerSite("ttl 100ms\nstale_if_error 2s\nbreaker {\nfailures 2\nopen 10s\n}", "{up}", ""), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	if f := get(client, "GET", url); f.status != http.StatusOK || f.body != "good" {
		t.Fatalf("priming: %d %q", f.status, f.body)
	}
	stored := time.Now()
	bad.Store(true)
	time.Sleep(150 * time.Millisecond)
	for time.Since(stored) < 1500*time.Millisecond {
		f := get(client, "GET", url)
		if f.status != http.StatusOK || f.body != "good" || !strings.Contains(f.cacheStatus(), "fwd=stale") || f.header.Get("Age") == "" {
			t.Fatalf("during the outage: %d %q Cache-Status %q Age %q", f.status, f.body, f.cacheStatus(), f.header.Get("Age"))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := up.Calls(); n != 3 {
		t.Errorf("the upstream got %d requests, want 1 good and the 2 that tripped the breaker", n)
	}
	time.Sleep(time.Until(stored.Add(2200 * time.Millisecond)))
	if f := get(client, "GET", url); !isBreakerOpen(f, 10) {
		t.Errorf("after stale_if_error ran out: %d %q %q, want the open breaker's 503", f.status, f.body, f.cacheStatus())
	}
}

// hotKeyLoad runs clients in a loop on one URL for d and returns their
// latencies, sorted, and how many answers were not from memory.
func hotKeyLoad(client *http.Client, url string, clients int, d time.Duration) (lat []time.Duration, waited, failed int) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < d {
				f := get(client, "GET", url)
				mu.Lock()
				lat = append(lat, f.took)
				if f.err != nil || f.status != http.StatusOK {
					failed++
				} else if !strings.Contains(f.cacheStatus(), "hit") {
					waited++
				}
				mu.Unlock()
				time.Sleep(2 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	slices.Sort(lat)
	return lat, waited, failed
}

func p99(lat []time.Duration) time.Duration { return lat[len(lat)*99/100] }

func TestStaleWhileRevalidateRefreshesOncePerExpiryAndNobodyWaits(t *testing.T) {
	const latency = 200 * time.Millisecond
	var inflight, maxInflight atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if n := inflight.Add(1); n > maxInflight.Load() {
			maxInflight.Store(n)
		}
		defer inflight.Add(-1)
		time.Sleep(latency)
		_, _ = fmt.Fprint(w, "hot")
	})
	startCaddy(t, breakerSite("ttl 200ms\nstale 5s", "{up}", ""), up)
	client := newClient(t)
	warm(t, client, 20)
	url := baseURL + pathFor(t, "")
	get(client, "GET", url)
	before := up.Calls()
	const d = 3 * time.Second
	lat, waited, failed := hotKeyLoad(client, url, 20, d)
	refreshes := up.Calls() - before

	// Each expiry (every ttl + latency = 400ms) starts exactly one refresh.
	if maxInflight.Load() != 1 || refreshes < 3 || refreshes > int64(d/(200*time.Millisecond))+1 {
		t.Errorf("%d refreshes in %s, %d at once; want one per expiry (about %d)", refreshes, d, maxInflight.Load(), d/(400*time.Millisecond))
	}
	// Every answer came from memory (a hit, fresh or stale): no client
	// waited for a refresh. Latencies depend on the machine's load and are
	// only logged.
	if waited != 0 || failed != 0 {
		t.Errorf("%d of %d clients waited for the upstream, %d failed", waited, len(lat), failed)
	}

	// The same load without stale, for the record: at each expiry the
	// clients wait for the upstream.
	startCaddy(t, breakerSite("ttl 200ms", "{up}", ""), up)
	url2 := baseURL + pathFor(t, "/nostale")
	get(client, "GET", url2)
	lat2, waited2, _ := hotKeyLoad(client, url2, 20, d)
	t.Logf("hot key, 20 clients, %s, upstream %s, ttl 200ms: p99 %s with stale 5s (%d requests, %d refreshes), p99 %s without (%d requests, %d waited)",
		d, latency, p99(lat), len(lat), refreshes, p99(lat2), len(lat2), waited2)
}

func TestBreakerStaysOpenAcrossAReload(t *testing.T) {
	up, _ := failingUpstream(t, true)
	options := "breaker {\nfailures 2\nopen 30s\n}"
	startCaddy(t, breakerSite(options, up.addr, "lb_policy breaker"))
	client := newClient(t)
	for i := range 2 {
		get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i)))
	}
	f := get(client, "GET", baseURL+pathFor(t, "/tripped"))
	if !isBreakerOpen(f, 30) {
		t.Fatalf("not tripped: %d %q", f.status, f.cacheStatus())
	}
	tripped, _ := strconv.Atoi(f.header.Get("Retry-After"))

	// A reload that changes the site but not the breaker: the same state,
	// counting down, and with lb_policy breaker not one request through.
	time.Sleep(1100 * time.Millisecond)
	reloadCaddy(t, breakerSite("ttl 80ms\n"+options, up.addr, "lb_policy breaker\nheader_up X-Reloaded 1"))
	f = get(client, "GET", baseURL+pathFor(t, "/reloaded"))
	secs, _ := strconv.Atoi(f.header.Get("Retry-After"))
	if !isBreakerOpen(f, 30) || secs >= tripped {
		t.Fatalf("after a reload: %d Retry-After %q (was %d) %q; want the same open breaker", f.status, f.header.Get("Retry-After"), tripped, f.cacheStatus())
	}
	if n := up.Calls(); n != 2 {
		t.Errorf("after the reload the upstream got %d requests, want 0", n-2)
	}

	// Without the policy the new handler learns its upstream from the
	// first answer: at most one request reaches it, then it is held back.
	reloadCaddy(t, breakerSite("ttl 90ms\n"+options, up.addr, ""))
	for i := range 5 {
		get(client, "GET", baseURL+pathFor(t, "/plain"+strconv.Itoa(i)))
	}
	if f := get(client, "GET", baseURL+pathFor(t, "/plain")); !isBreakerOpen(f, 30) {
		t.Fatalf("after a reload without lb_policy breaker: %d %q", f.status, f.cacheStatus())
	}
	if n := up.Calls() - 2; n > 1 {
		t.Errorf("after a reload without the policy %d requests reached the open upstream, want at most 1", n)
	}
}

func TestBreakerDeadUpstreamUnderTenSecondsOfLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("10 s of load")
	}
	var bad atomic.Bool
	var afterDeath atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if bad.Load() {
			afterDeath.Add(1)
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprint(w, "good")
	})
	startCaddy(t, breakerSite("breaker {\nfailures 5\n}", "{up}", ""), up) // open 10s, probes 1
	client := newClient(t)
	warm(t, client, 50)
	hot := baseURL + pathFor(t, "/hot")
	get(client, "GET", hot)
	bad.Store(true)

	// 50 clients poll one hot URL (as a page's hooks do) for 10 s after the
	// upstream died. Their requests collapse, so the upstream sees them one
	// at a time: 5 failures trip the breaker, and a probe is due 10 s later.
	var wg sync.WaitGroup
	var requests, refusals atomic.Int64
	start := time.Now()
	for range 50 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < 10*time.Second {
				f := get(client, "GET", hot)
				requests.Add(1)
				if isBreakerOpen(f, 10) {
					refusals.Add(1)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	t.Logf("10 s of load (50 clients, %d requests) on an upstream that died: %d reached it, %d answered by the open breaker",
		requests.Load(), afterDeath.Load(), refusals.Load())
	if n := afterDeath.Load(); n > 5+1 {
		t.Errorf("%d requests reached the dead upstream; want at most 5 to trip it and 1 probe", n)
	}
}

// upstreamTimeout is the Cache-Status of a leader's request cut by the
// breaker's timeout.
const upstreamTimeout = `caddy-coalesce; fwd=uri-miss; fwd-status=504; detail="upstream-timeout"`

// hungUpstream is a listener that accepts connections and reads each
// request's head but never answers, as a wedged process does. heads counts
// the requests that reached it.
func hungUpstream(t *testing.T) (hung *rawUpstream, heads *atomic.Int64) {
	heads = new(atomic.Int64)
	hung = newRawUpstream(t, func(c net.Conn) {
		if readRequestHead(c) == nil {
			heads.Add(1)
		}
		holdUntilClosed(c)
	})
	return hung, heads
}

func TestBreakerTimeoutCutsAHungUpstreamAndTrips(t *testing.T) {
	const open = 2 * time.Second
	hung, heads := hungUpstream(t)
	startCaddy(t, breakerSite("breaker {\nfailures 2\ntimeout 500ms\nopen 2s\n}", hung.addr(), ""))
	client := newClient(t)
	client.Timeout = 5 * time.Second

	// Different URLs: nothing collapses, each request is the upstream's.
	var cuts []time.Duration
	for i, method := range []string{"GET", "HEAD"} {
		f := get(client, method, baseURL+pathFor(t, "/"+strconv.Itoa(i)))
		cuts = append(cuts, f.took)
		if f.err != nil || f.status != http.StatusGatewayTimeout || f.cacheStatus() != upstreamTimeout {
			t.Fatalf("%s %d to a hung upstream: %d %q %v; want 504 %q", method, i, f.status, f.cacheStatus(), f.err, upstreamTimeout)
		}
		if f.took < 400*time.Millisecond || f.took > 3*time.Second {
			t.Errorf("%s %d was cut after %s, want about the timeout of 500ms", method, i, f.took)
		}
	}
	tripped := time.Now()
	// Two cuts were two failures: the rest are answered at once, without
	// the upstream.
	var slowest time.Duration
	for i, f := range together(20, func(i int) fetched {
		return get(client, "GET", baseURL+pathFor(t, "/open"+strconv.Itoa(i)))
	}) {
		slowest = max(slowest, f.took)
		if !isBreakerOpen(f, 2) {
			t.Errorf("client %d after two cuts: %d Retry-After %q %q %v", i, f.status, f.header.Get("Retry-After"), f.cacheStatus(), f.err)
		}
	}
	if n := heads.Load(); n != 2 {
		t.Fatalf("the hung upstream received %d requests while its breaker was open, want the 2 that tripped it", n)
	}

	// After open: one probe goes through and is cut in turn; everybody
	// else is answered as while open.
	time.Sleep(time.Until(tripped.Add(open + 100*time.Millisecond)))
	probes := 0
	for i, f := range together(10, func(i int) fetched {
		return get(client, "GET", baseURL+pathFor(t, "/probe"+strconv.Itoa(i)))
	}) {
		switch {
		case f.status == http.StatusGatewayTimeout && f.cacheStatus() == upstreamTimeout:
			probes++
		case isBreakerOpen(f, 2):
		default:
			t.Errorf("client %d when the breaker half-opened: %d %q %v", i, f.status, f.cacheStatus(), f.err)
		}
	}
	if n := heads.Load(); probes != 1 || n != 3 {
		t.Errorf("half-open, probes 1: %d probes cut, %d requests reached the hung upstream; want 1 and 3", probes, n)
	}
	t.Logf("hung upstream, failures 2 timeout 500ms open 2s: cut after %v; 20 more answered 503 within %v; after open 1 probe; %d requests reached it", cuts, slowest, heads.Load())
}

func TestBreakerTimeoutSkipsAHungPoolMember(t *testing.T) {
	live := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { _, _ = fmt.Fprint(w, "live") })
	hung, heads := hungUpstream(t)
	startCaddy(t, breakerSite("breaker {\nfailures 2\ntimeout 500ms\nopen 10s\n}", live.addr+" "+hung.addr(), "lb_policy breaker round_robin"))
	client := newClient(t)
	client.Timeout = 5 * time.Second
	warm(t, client, 30)

	cut := 0
	for i := 0; heads.Load() < 2 && i < 10; i++ {
		switch f := get(client, "GET", baseURL+pathFor(t, "/seq"+strconv.Itoa(i))); {
		case f.err == nil && f.status == http.StatusOK && f.body == "live":
		case f.err == nil && f.status == http.StatusGatewayTimeout && f.cacheStatus() == upstreamTimeout:
			cut++
		default:
			t.Fatalf("request %d to a pool with a hung member: %d %q %q %v", i, f.status, clip(f.body), f.cacheStatus(), f.err)
		}
	}
	if cut != 2 {
		t.Fatalf("%d requests were cut, want the 2 sent to the hung member", cut)
	}
	// Its breaker is open: the hung member is skipped, every request goes
	// to the live one.
	expectAll(t, together(30, func(i int) fetched {
		return get(client, "GET", baseURL+pathFor(t, "/open"+strconv.Itoa(i)))
	}), http.StatusOK, "live")
	if n := heads.Load(); n != 2 {
		t.Errorf("the hung member received %d requests, want only the 2 that tripped its breaker", n)
	}
}

func TestBreakerTimeoutCutsRequestsSentAlone(t *testing.T) {
	var hang atomic.Bool
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if hang.Load() {
			<-r.Context().Done()
			return
		}
		w.Header().Set("Set-Cookie", "s=1")
		_, _ = fmt.Fprint(w, "private")
	})
	startCaddy(t, breakerSite("breaker {\nfailures 2\ntimeout 300ms\n}", "{up}", ""), up)
	client := newClient(t)
	client.Timeout = 5 * time.Second
	url := baseURL + pathFor(t, "")
	// The previous config's server may close the first connection as it
	// shuts down (grace_period 1ns): a transport error is tried again.
	f := get(client, "GET", url)
	for i := 0; f.err != nil && i < 3; i++ {
		f = get(client, "GET", url)
	}
	if f.status != http.StatusOK || !strings.Contains(f.cacheStatus(), "detail=set-cookie") {
		t.Fatalf("priming: %d %q %v", f.status, f.cacheStatus(), f.err)
	}
	hang.Store(true)
	// The key is hit-for-miss now: its next GET goes upstream on its own.
	if f := get(client, "GET", url); f.err != nil || f.status != http.StatusGatewayTimeout || f.cacheStatus() != upstreamTimeout {
		t.Errorf("an uncollapsible GET to a hung upstream: %d %q %v; want 504 %q", f.status, f.cacheStatus(), f.err, upstreamTimeout)
	}
	// A bypassed GET (Range) keeps its fwd.
	want := `caddy-coalesce; fwd=bypass; fwd-status=504; detail="upstream-timeout"`
	if f := get(client, "GET", baseURL+pathFor(t, "/range"), "Range: bytes=0-3"); f.err != nil || f.status != http.StatusGatewayTimeout || f.cacheStatus() != want {
		t.Errorf("a bypassed GET to a hung upstream: %d %q %v; want 504 %q", f.status, f.cacheStatus(), f.err, want)
	}
	// Both were failures.
	if f := get(client, "GET", baseURL+pathFor(t, "/after"), "Range: bytes=0-3"); !isBreakerOpen(f, 10) {
		t.Errorf("after two cuts: %d %q %v; want the open breaker's 503", f.status, f.cacheStatus(), f.err)
	}
}

func TestBreakerTimeoutBoundsOnlyTheWaitForHeadersOfRequestsWithoutABody(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.Method != http.MethodGet:
			body, _ := io.ReadAll(r.Body)
			time.Sleep(time.Second)
			_, _ = fmt.Fprintf(w, "wrote %s", body)
		case strings.HasSuffix(r.URL.Path, "/slow-body"):
			w.Header().Set("Content-Type", "text/plain")
			w.WriteHeader(http.StatusOK)
			http.NewResponseController(w).Flush()
			time.Sleep(time.Second)
			_, _ = fmt.Fprint(w, "slow body")
		default:
			time.Sleep(time.Second)
			_, _ = fmt.Fprint(w, "late")
		}
	})
	startCaddy(t, breakerSite("breaker {\ntimeout 300ms\n}", "{up}", ""), up)
	client := newClient(t)
	client.Timeout = 5 * time.Second

	// Writes are never cut: they may not be safe to repeat, and their
	// upstream may take its time.
	for _, method := range []string{"POST", "PUT", "PATCH"} {
		req, _ := http.NewRequest(method, baseURL+pathFor(t, "/"+method), strings.NewReader("x"))
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: %v", method, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "wrote x" {
			t.Errorf("%s that takes 1s with timeout 300ms: %d %q; want it answered", method, resp.StatusCode, body)
		}
	}
	// Headers in time, body late: the body takes as long as it takes.
	if f := get(client, "GET", baseURL+pathFor(t, "/slow-body")); f.err != nil || f.status != http.StatusOK || f.body != "slow body" {
		t.Errorf("a GET whose headers came at once and body after 1s: %d %q %q %v", f.status, f.body, f.cacheStatus(), f.err)
	}
	// Headers late: cut.
	if f := get(client, "GET", baseURL+pathFor(t, "/late")); f.err != nil || f.status != http.StatusGatewayTimeout || f.cacheStatus() != upstreamTimeout {
		t.Errorf("a GET whose headers come after 1s with timeout 300ms: %d %q %q %v; want 504", f.status, f.body, f.cacheStatus(), f.err)
	}
}

func TestHalfOpenProbeThatStreamsReleasesItsFollowersUpstream(t *testing.T) {
	big := strings.Repeat("s", 64<<10) // above max_body: the leader streams it
	for _, probes := range []int{1, 2} {
		t.Run("probes "+strconv.Itoa(probes), func(t *testing.T) {
			var bad atomic.Bool
			bad.Store(true)
			gate := make(chan struct{})
			up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
				if bad.Load() {
					http.Error(w, "down", http.StatusBadGateway)
					return
				}
				<-gate
				_, _ = fmt.Fprint(w, big)
			})
			options := fmt.Sprintf("max_body 1KiB\nbreaker {\nfailures 2\nopen 1s\nprobes %d\n}", probes)
			startCaddy(t, breakerSite(options, "{up}", ""), up)
			client := newClient(t)
			warm(t, client, 10)
			for i := range 2 {
				get(client, "GET", baseURL+pathFor(t, "/fail"+strconv.Itoa(i)))
			}
			if f := get(client, "GET", baseURL+pathFor(t, "/tripped")); !isBreakerOpen(f, 1) {
				t.Fatalf("not tripped: %d %q", f.status, f.cacheStatus())
			}
			bad.Store(false)
			time.Sleep(1100 * time.Millisecond) // open 1s: the next request is a probe

			path := pathFor(t, "/stream")
			leader := make(chan fetched, 1)
			go func() { leader <- get(client, "GET", baseURL+path) }()
			if !waitFor(5*time.Second, func() bool { return up.inflight.Load() == 1 }) {
				t.Fatal("the probe never reached the upstream")
			}
			followers := make(chan []fetched, 1)
			go func() { followers <- herd(client, 4, "GET", baseURL+path) }()
			if !waitFor(5*time.Second, func() bool { return followersWaiting(t, client, path) == 4 }) {
				t.Fatalf("%d followers joined the probe's flight, want 4", followersWaiting(t, client, path))
			}
			close(gate) // the upstream answers, healthy, with a body too large to share
			got := append([]fetched{<-leader}, <-followers...)
			for i, f := range got {
				if f.err != nil || f.status != http.StatusOK || f.body != big {
					t.Errorf("client %d of the probe's flight: %d %q %q %v; the upstream answered it", i, f.status, clip(f.body), f.cacheStatus(), f.err)
				}
			}
		})
	}
}

// The breaker's state changes are logged; a log sink that stalls must not
// stall the requests to that upstream.

// stalledLog is a log writer (`output test_stalled`) that holds every write
// while it is armed, as a sink that stalls does (a full pipe, a hung disk).
type stalledLog struct{}

var logStall struct {
	mu      sync.Mutex
	gate    chan struct{} // nil: writes pass; otherwise they wait for it to close
	waiting atomic.Int64  // writes held now
}

// armLogStall makes the writes of test_stalled logs wait; the returned
// function releases them (again and again harmlessly).
func armLogStall() (release func()) {
	gate := make(chan struct{})
	logStall.mu.Lock()
	logStall.gate = gate
	logStall.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			logStall.mu.Lock()
			logStall.gate = nil
			logStall.mu.Unlock()
			close(gate)
		})
	}
}

func (stalledLog) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "caddy.logging.writers.test_stalled", New: func() caddy.Module { return new(stalledLog) }}
}
func (stalledLog) String() string                                   { return "test_stalled" }
func (stalledLog) WriterKey() string                                { return "test_stalled" }
func (stalledLog) OpenWriter() (io.WriteCloser, error)              { return stalledWriter{}, nil }
func (*stalledLog) UnmarshalCaddyfile(d *caddyfile.Dispenser) error { d.Next(); return nil }

type stalledWriter struct{}

func (stalledWriter) Write(p []byte) (int, error) {
	logStall.mu.Lock()
	gate := logStall.gate
	logStall.mu.Unlock()
	if gate != nil {
		logStall.waiting.Add(1)
		<-gate
		logStall.waiting.Add(-1)
	}
	return len(p), nil
}
func (stalledWriter) Close() error { return nil }

func init() { caddy.RegisterModule(stalledLog{}) }

func TestBreakerStateChangeLoggedToAStalledSinkDelaysNoOtherRequest(t *testing.T) {
	up, _ := failingUpstream(t, true)
	global := strings.TrimSuffix(globalOptions, "}\n") + "\tlog breakers {\n\t\toutput test_stalled\n\t\tinclude http.handlers.coalesce\n\t}\n}\n"
	release := armLogStall()
	t.Cleanup(release)
	loadFirst(t, global+withUpstreams(breakerSite("breaker {\nfailures 2\nopen 10s\n}", "{up}", ""), []*upstream{up}), "caddyfile")
	client := newClient(t)
	client.Timeout = 5 * time.Second

	get(client, "GET", baseURL+pathFor(t, "/1"))
	tripping := make(chan fetched, 1)
	go func() { tripping <- get(client, "GET", baseURL+pathFor(t, "/2")) }() // trips the breaker: a log line
	if !waitFor(5*time.Second, func() bool { return logStall.waiting.Load() > 0 }) {
		t.Fatal("the breaker's state change was never logged")
	}
	// The sink holds the line; every other request to that upstream is
	// answered at once all the same.
	for i, f := range together(10, func(i int) fetched {
		return get(client, "GET", baseURL+pathFor(t, "/open"+strconv.Itoa(i)))
	}) {
		if !isBreakerOpen(f, 10) || f.took > 2*time.Second {
			t.Errorf("client %d while the log sink stalls: %d %q after %s %v", i, f.status, f.cacheStatus(), f.took, f.err)
		}
	}
	release()
	if f := <-tripping; f.status != http.StatusServiceUnavailable {
		t.Errorf("the request that tripped the breaker: %d %v; want the upstream's own 503", f.status, f.err)
	}
}

func TestAfterAMinuteIdleTheHandlersGuessDoesNotRefuseThePolicysProbe(t *testing.T) {
	if testing.Short() {
		t.Skip("a minute idle")
	}
	// A handler that has seen no request steered by lb_policy breaker for a
	// minute guesses its one seen upstream again before the policy runs.
	up, bad := failingUpstream(t, true)
	startCaddy(t, breakerSite("breaker {\nfailures 2\nopen 1s\n}", "{up}", "lb_policy breaker"), up)
	client := newClient(t)
	for i := range 2 {
		get(client, "GET", baseURL+pathFor(t, "/fail"+strconv.Itoa(i)))
	}
	if f := get(client, "GET", baseURL+pathFor(t, "/tripped")); !isBreakerOpen(f, 1) {
		t.Fatalf("not tripped: %d %q", f.status, f.cacheStatus())
	}
	bad.Store(false)
	time.Sleep(61 * time.Second) // the handler's steering is forgotten after a minute
	// Open is long over: this request is the probe, to a healthy upstream.
	if f := get(client, "GET", baseURL+pathFor(t, "/probe")); f.err != nil || f.status != http.StatusOK || f.body != "good" {
		t.Fatalf("the probe after a minute idle: %d %q %q %v; the handler's guess took the probe slot the policy needed", f.status, clip(f.body), f.cacheStatus(), f.err)
	}
}
