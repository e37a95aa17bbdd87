package tests

import (
	"fmt"
	"net/http"
	"regexp"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// failable answers body until failing is set, then 503.
func failable(failing *atomic.Bool, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if failing.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprint(w, body)
	}
}

// freshPath is pathFor made unique to this run of the test: the stored copy
// and the marks of an earlier run (-count=N) must not answer this one.
func freshPath(t testing.TB) string {
	return pathFor(t, fmt.Sprintf("-%d", runs.Add(1)))
}

var runs atomic.Int64

var staleIfErrorStatus = regexp.MustCompile(`^caddy-coalesce; fwd=stale; ttl=-[1-9]\d*; detail=stale-if-error$`)

// With ttl 0 and stale, every answer after the first is a
// stale-while-revalidate answer from a healthy upstream: only the copies
// that stand in for a failing upstream may count as stale_if_error, which
// is what an operator's "answers for failing upstreams" panel shows.
func TestStaleWhileRevalidateAndStaleIfErrorAreTwoOutcomes(t *testing.T) {
	var failing atomic.Bool
	up := newUpstream(t, failable(&failing, "good"))
	startCaddy(t, site("ttl 0\n\t\tstale 1h\n\t\tstale_if_error 1h\n\t\tzone stale-outcomes"), up)
	client := newClient(t)
	url := baseURL + freshPath(t)
	zone := []string{"handler", "stale-outcomes"}

	before := scrapeMetrics(t, client)
	if f := get(client, "GET", url); f.status != 200 || f.body != "good" {
		t.Fatalf("first request: %d %q %v", f.status, f.body, f.err)
	}
	if f := get(client, "GET", url); f.status != 200 || f.body != "good" {
		t.Fatalf("stale-while-revalidate: %d %q (%s) %v", f.status, f.body, f.cacheStatus(), f.err)
	}
	eventually(t, "the refresh", func() bool { return up.Calls() == 2 && up.inflight.Load() == 0 })
	eventually(t, "the refresh's flight to end", func() bool {
		return scrapeMetrics(t, client).get(t, "caddy_coalesce_inflight_flights", zone...) == 0
	})
	failing.Store(true)
	// no-cache skips the stored copy: the request leads, the upstream fails,
	// and the copy stands in.
	f := get(client, "GET", url, "Cache-Control: no-cache")
	if f.status != 200 || f.body != "good" || !staleIfErrorStatus.MatchString(f.cacheStatus()) {
		t.Errorf("failing upstream: %d %q (%s), want the stale-if-error copy", f.status, f.body, f.cacheStatus())
	}
	after := scrapeMetrics(t, client)
	expectDelta(t, before, after, 1, "caddy_coalesce_requests_total", append(zone, "outcome", "stale")...)
	expectDelta(t, before, after, 1, "caddy_coalesce_requests_total", append(zone, "outcome", "stale_if_error")...)
}

// A copy that is still fresh may stand in for a failed upstream (a client
// asked for no-cache); its Cache-Status must not call it fresh.
func TestStaleIfErrorFromAFreshCopyShowsANegativeTTL(t *testing.T) {
	var failing atomic.Bool
	up := newUpstream(t, failable(&failing, "good"))
	startCaddy(t, site("ttl 1s\n\t\tstale_if_error 1h\n\t\tzone stale-fresh-copy"), up)
	client := newClient(t)
	url := baseURL + freshPath(t)
	if f := get(client, "GET", url); f.status != 200 || f.body != "good" {
		t.Fatalf("first request: %d %q %v", f.status, f.body, f.err)
	}
	failing.Store(true)
	f := get(client, "GET", url, "Cache-Control: no-cache")
	if f.status != 200 || f.body != "good" || !staleIfErrorStatus.MatchString(f.cacheStatus()) {
		t.Errorf("failing upstream: %d %q (%s), want the stale-if-error copy with a negative ttl", f.status, f.body, f.cacheStatus())
	}
}

// A refresh that meets a healthy response too large to buffer must not
// keep the old copy: the next request goes upstream on its own and gets
// the new, whole response (and no refresh fetches a body to throw away at
// every expiry).
func TestRefreshMeetingALargerResponseStopsServingTheOldCopy(t *testing.T) {
	large := strings.Repeat("L", 4096)
	var grown atomic.Bool
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if grown.Load() {
			_, _ = fmt.Fprint(w, large)
			return
		}
		_, _ = fmt.Fprint(w, "small")
	})
	startCaddy(t, site("ttl 50ms\n\t\tstale 1h\n\t\tmax_body 1KiB\n\t\tzone stale-grown"), up)
	client := newClient(t)
	url := baseURL + freshPath(t)
	if f := get(client, "GET", url); f.status != 200 || f.body != "small" {
		t.Fatalf("first request: %d %q %v", f.status, f.body, f.err)
	}
	grown.Store(true)
	time.Sleep(100 * time.Millisecond) // past ttl
	if f := get(client, "GET", url); f.body != "small" || !strings.Contains(f.cacheStatus(), "stale-while-revalidate") {
		t.Fatalf("within stale: %d %q (%s), want the stale copy", f.status, f.body, f.cacheStatus())
	}
	eventually(t, "the refresh", func() bool { return up.Calls() == 2 && up.inflight.Load() == 0 })
	eventually(t, "the refresh's flight to end", func() bool {
		return scrapeMetrics(t, client).get(t, "caddy_coalesce_inflight_flights", "handler", "stale-grown") == 0
	})
	f := get(client, "GET", url)
	if f.status != 200 || f.body != large || strings.Contains(f.cacheStatus(), "fwd=stale") {
		t.Errorf("after the refresh met the larger response: %d, %d bytes (%s); want the whole new response from the upstream", f.status, len(f.body), f.cacheStatus())
	}
	if n := up.Calls(); n != 3 {
		t.Errorf("upstream calls: %d, want 3", n)
	}
}
