package tests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/http/httptrace"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// reloadSite is the config the reload test cycles through: variant 0 is
// the one it starts and ends with; the others change ttl, stale, the
// breaker (on, off, other settings) and the pool's selection policy (with
// and without the breaker wrapper). The zone stays, so the metrics of every
// variant are counted under one handler label.
func reloadSite(variant int) string {
	options := []string{
		"ttl 50ms",
		"ttl 200ms\n\t\tbreaker off",
		"ttl 0\n\t\tbreaker {\n\t\t\tfailures 3\n\t\t\topen 2s\n\t\t}",
		"ttl 1s\n\t\tstale 1s\n\t\tbreaker off",
	}[variant%4]
	policy := []string{"breaker round_robin", "round_robin", "breaker random", "least_conn"}[variant%4]
	return fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	coalesce {
		zone reload-under-load
		%s
	}
	reverse_proxy {up} {up} {
		lb_policy %s
	}
}
`, httpPort, options, policy)
}

// processFigures are the goroutines and the live heap of the test process
// (the in-process Caddy, its upstreams and the clients), measured at rest.
type processFigures struct {
	goroutines int
	heap       uint64 // HeapAlloc after GC
}

func (p processFigures) String() string {
	return fmt.Sprintf("%d goroutines, %.1f MiB heap", p.goroutines, float64(p.heap)/(1<<20))
}

// atRest closes every idle connection, lets the goroutines that served them
// end, and measures. The connections are the clients' to Caddy and
// reverse_proxy's to the upstreams; a transport may hold a connection it
// dialled but never used, which a server counts as new, not idle, and
// closes only when it is 5 s old: hence 6 s of closing.
func atRest(client *http.Client, ups ...*upstream) processFigures {
	start := time.Now()
	for time.Since(start) < 6500*time.Millisecond {
		client.CloseIdleConnections()
		for _, u := range ups {
			u.srv.SetKeepAlivesEnabled(false) // closes its idle connections, and new ones older than 5s
		}
		time.Sleep(250 * time.Millisecond)
	}
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	for _, u := range ups {
		u.srv.SetKeepAlivesEnabled(true)
	}
	return processFigures{goroutines: runtime.NumGoroutine(), heap: ms.HeapAlloc}
}

// getTraced is get for the load of the reload test, which also says whether
// the request went out on a connection of its own (not reused).
//
// A reload replaces Caddy's http.Server on the same listener. A connection
// the outgoing server accepted just before its Shutdown has its first
// request read and then dropped, closed without a response, before any
// handler runs (net/http server.go: "if c.server.shuttingDown() { return }"
// after readRequest). Go's client resends a request dropped like that on a
// reused connection by itself, but not on a fresh one: the load resends it
// once, and counts it. So is a fresh connection that the kernel resets
// (ECONNRESET) because it was still queued on the outgoing server's listener
// when that listener closed: no server ever accepted it. Plain Caddy without
// coalesce drops as many (about 5% of the connections dialled during a
// reload); coalesce never sees them, which the metrics check below proves.
func getTraced(client *http.Client, url string) (f fetched, fresh bool) {
	fresh = true
	ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{
		GotConn: func(i httptrace.GotConnInfo) { fresh = !i.Reused },
	})
	return getCtx(ctx, client, "GET", url), fresh
}

// coalescedRequests sums caddy_coalesce_requests_total over the outcomes of
// one handler zone.
func coalescedRequests(s scrape, zone string) float64 {
	var sum float64
	fam := s["caddy_coalesce_requests_total"]
	if fam == nil {
		return 0
	}
	for _, m := range fam.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "handler" && l.GetValue() == zone {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

func TestReloadUnderLoadLosesNoRequestAndLeaksNothing(t *testing.T) {
	const (
		connections = 200
		reloads     = 20
		paths       = 50
		hungAfter   = 10 * time.Second
	)
	handler := func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Duration(1+rand.IntN(5)) * time.Millisecond)
		body := "ok " + r.URL.Path
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	}
	upA, upB := newUpstream(t, handler), newUpstream(t, handler)
	startCaddy(t, reloadSite(0), upA, upB)
	client := newClient(t)
	prefix := pathFor(t, "/")

	// load runs connections clients, each sending requests one after
	// another, until stop is closed; it returns what they saw.
	type loadResult struct {
		sent, failed, dropped int64
		slowest               time.Duration
		failures              []string
	}
	load := func(stop <-chan struct{}) *loadResult {
		res := &loadResult{}
		var mu sync.Mutex
		var sent, failed, dropped atomic.Int64
		var wg sync.WaitGroup
		for c := range connections {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(uint64(c), 7))
				for {
					select {
					case <-stop:
						return
					default:
					}
					path := prefix + strconv.Itoa(rng.IntN(paths))
					f, fresh := getTraced(client, baseURL+path)
					if f.err != nil && fresh && (errors.Is(f.err, io.EOF) || errors.Is(f.err, syscall.ECONNRESET)) {
						// Dropped by net/http before any handler: see getTraced.
						dropped.Add(1)
						f, _ = getTraced(client, baseURL+path)
					}
					sent.Add(1)
					mu.Lock()
					res.slowest = max(res.slowest, f.took)
					if f.err != nil || f.status != http.StatusOK || f.body != "ok "+path || f.took > hungAfter {
						failed.Add(1)
						if len(res.failures) < 10 {
							res.failures = append(res.failures, fmt.Sprintf("GET %s: %d %q after %s (err %v, Cache-Status %q)", path, f.status, clip(f.body), f.took, f.err, f.cacheStatus()))
						}
					}
					mu.Unlock()
				}
			}()
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		<-stop
		select {
		case <-done:
		case <-time.After(2 * hungAfter):
			t.Errorf("load clients still waiting %s after the load stopped: requests hung", 2*hungAfter)
		}
		res.sent, res.failed, res.dropped = sent.Load(), failed.Load(), dropped.Load()
		return res
	}

	// Warm up with the first config: every connection open, every pool
	// (registry, cache, breakers, transports) in use, then measure at rest.
	stop := make(chan struct{})
	time.AfterFunc(2*time.Second, func() { close(stop) })
	if w := load(stop); w.failed != 0 {
		t.Fatalf("warm-up before any reload: %d of %d requests failed: %v", w.failed, w.sent, w.failures)
	}
	before := atRest(client, upA, upB)
	metricsBefore := scrapeMetrics(t, client)

	stop = make(chan struct{})
	results := make(chan *loadResult, 1)
	go func() { results <- load(stop) }()
	var reloadTimes []time.Duration
	for i := 1; i <= reloads; i++ {
		time.Sleep(250 * time.Millisecond)
		// Variant 0 again at the end: the config before and after is the same.
		reloadTimes = append(reloadTimes, reloadCaddy(t, reloadSite(i%4), upA, upB))
	}
	time.Sleep(250 * time.Millisecond)
	close(stop)
	res := <-results

	after := atRest(client, upA, upB)
	metricsAfter := scrapeMetrics(t, client)
	counted := coalescedRequests(metricsAfter, "reload-under-load") - coalescedRequests(metricsBefore, "reload-under-load")

	slowestReload := time.Duration(0)
	for _, d := range reloadTimes {
		slowestReload = max(slowestReload, d)
	}
	t.Logf("reload under load: %d reloads (slowest %s) while %d connections sent %d requests: %d failed or hung, slowest request %s; %d dropped by net/http unread on a fresh connection and sent again",
		reloads, slowestReload.Round(time.Millisecond), connections, res.sent, res.failed, res.slowest.Round(time.Millisecond), res.dropped)
	t.Logf("reload under load: before %v; after %v; caddy_coalesce_requests_total counted %.0f of %d",
		before, after, counted, res.sent)
	for _, f := range res.failures {
		t.Error(f)
	}
	if res.failed != 0 {
		t.Errorf("%d of %d requests failed or hung across %d reloads; want none", res.failed, res.sent, reloads)
	}
	if res.sent < connections {
		t.Errorf("only %d requests were sent", res.sent)
	}
	// Generous bounds: a leak per reload (a goroutine per config, a pool
	// that is never released) would exceed them 20 times over.
	if after.goroutines > before.goroutines+reloads {
		t.Errorf("goroutines grew from %d to %d across %d reloads", before.goroutines, after.goroutines, reloads)
	}
	if limit := before.heap + max(before.heap/2, 32<<20); after.heap > limit {
		t.Errorf("heap grew from %.1f MiB to %.1f MiB across %d reloads (bound %.1f MiB)",
			float64(before.heap)/(1<<20), float64(after.heap)/(1<<20), reloads, float64(limit)/(1<<20))
	}
	// One count per request answered: the dropped attempts never reached
	// coalesce (nor any handler), and nothing was counted twice.
	if counted != float64(res.sent) {
		t.Errorf("caddy_coalesce_requests_total{handler=reload-under-load} grew by %.0f across the reloads, want %d (one per request)", counted, res.sent)
	}
}
