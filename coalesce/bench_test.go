package coalesce

import (
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Benchmarks of the engine's paths. Each is meaningful with -benchtime=1x
// too (CI runs them once so that none rots).

var keySink Key

// benchRequest is a browser's API request: credentials, a cookie, the usual
// Accept-Encoding and a query.
func benchRequest() *http.Request {
	r := httptest.NewRequest(http.MethodGet, "https://api.example/v1/sessions?user=42&active=true", nil)
	r.Header.Set("Authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI0MiJ9.c2lnbmF0dXJl")
	r.Header.Set("Cookie", "sid=8f14e45fceea167a5a36dedd4bea2543; theme=dark")
	r.Header.Set("Accept-Encoding", "gzip, deflate, br, zstd")
	r.Header.Set("Accept", "application/json")
	r.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/135.0")
	return r
}

// benchBody is a small JSON answer.
var benchBody = []byte(`{"sessions":[` + strings.Repeat(`{"id":"8f14e45f","user":42,"active":true},`, 20) + `{}]}`)

// trivialUpstream answers benchBody at once.
func trivialUpstream(w http.ResponseWriter, _ *http.Request) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Etag", `"v1"`)
	_, err := w.Write(benchBody)
	return err
}

func BenchmarkKeyDerive(b *testing.B) {
	d := newKeyDeriver(nil, false, []string{"X-Tenant"})
	r := benchRequest()
	b.ReportAllocs()
	for b.Loop() {
		keySink = d.derive(r, r.Method)
	}
}

func BenchmarkCacheHitLookup(b *testing.B) {
	c := newMicroCache(10_000, 64<<20)
	now := time.Now()
	keys := make([]Key, 1024)
	for i := range keys {
		keys[i] = keyN(i)
		c.put(keys[i], entryFor(len(benchBody), now, time.Hour))
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if c.get(keys[i%len(keys)], now) == nil {
			b.Fatal("miss")
		}
		i++
	}
}

// storeFor puts resp in e's cache for r, fresh for an hour, so that a
// benchmark of any length measures hits only.
func storeFor(e *Engine, r *http.Request) {
	now := time.Now()
	h := http.Header{"Content-Type": {"application/json"}, "Etag": {`"v1"`}, "Vary": {"Accept-Encoding"}}
	resp := newResponse(http.StatusOK, h, benchBody, r)
	e.cache.put(e.keys.derive(r, http.MethodGet), &entry{
		resp: resp, stored: now, fresh: now.Add(time.Hour), stale: now.Add(time.Hour), staleIfError: now.Add(time.Hour), size: resp.size(),
	})
}

func noUpstream(b *testing.B) Next {
	return func(http.ResponseWriter, *http.Request) error {
		b.Error("a hit went upstream")
		return nil
	}
}

// serveParallel has every goroutine of b.RunParallel serve benchRequest
// through e until the benchmark ends; an answer other than 200 fails b.
func serveParallel(b *testing.B, e *Engine, next Next) {
	b.RunParallel(func(pb *testing.PB) {
		r := benchRequest()
		for pb.Next() {
			rec := httptest.NewRecorder()
			if err := e.Serve(rec, r, next); err != nil || rec.Code != 200 {
				b.Errorf("Serve: %v, status %d", err, rec.Code)
				return
			}
		}
	})
}

// The handler's hit path: key, lookup, Vary check, headers copied, body
// written to an httptest.ResponseRecorder.
func BenchmarkServeHit(b *testing.B) {
	e := newEngine(b, nil)
	r := benchRequest()
	storeFor(e, r)
	next := noUpstream(b)
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		if err := e.Serve(rec, r, next); err != nil || rec.Code != 200 {
			b.Fatalf("Serve: %v, status %d", err, rec.Code)
		}
	}
}

func BenchmarkServeHitParallel(b *testing.B) {
	e := newEngine(b, nil)
	storeFor(e, benchRequest())
	next := noUpstream(b)
	b.ReportAllocs()
	serveParallel(b, e, next)
}

// The follower path: many goroutines ask for one hot key with no cache
// (ttl 0) while the upstream takes 200µs, so nearly every request waits for
// a leader. upstream/op and followers/op show how many did which.
func BenchmarkServeFollowersParallel(b *testing.B) {
	e := newEngine(b, func(c *Config) { c.TTL = Off })
	var calls atomic.Int64
	next := func(w http.ResponseWriter, r *http.Request) error {
		calls.Add(1)
		time.Sleep(200 * time.Microsecond)
		return trivialUpstream(w, r)
	}
	before := e.Stats().Registry
	b.SetParallelism(32)
	b.ReportAllocs()
	b.ResetTimer()
	serveParallel(b, e, next)
	b.StopTimer()
	after := e.Stats().Registry
	b.ReportMetric(float64(calls.Load())/float64(b.N), "upstream/op")
	b.ReportMetric(float64(after.Collapsed-before.Collapsed)/float64(b.N), "followers/op")
}

// The miss path: every request leads a flight to a trivial upstream and
// nothing is stored (ttl 0), so the recorder, the response and the publish
// are measured on each iteration.
func BenchmarkServeMiss(b *testing.B) {
	e := newEngine(b, func(c *Config) { c.TTL = Off })
	r := benchRequest()
	b.ReportAllocs()
	for b.Loop() {
		rec := httptest.NewRecorder()
		if err := e.Serve(rec, r, trivialUpstream); err != nil || rec.Code != 200 {
			b.Fatalf("Serve: %v, status %d", err, rec.Code)
		}
	}
}

// The miss path that stores: distinct keys, each a leader whose answer is
// put in the cache.
func BenchmarkServeMissStore(b *testing.B) {
	e := newEngine(b, nil)
	reqs := make([]*http.Request, 4096)
	for i := range reqs {
		reqs[i] = benchRequest()
		reqs[i].URL.RawQuery = "user=" + strconv.Itoa(i)
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		rec := httptest.NewRecorder()
		if err := e.Serve(rec, reqs[i%len(reqs)], trivialUpstream); err != nil || rec.Code != 200 {
			b.Fatalf("Serve: %v, status %d", err, rec.Code)
		}
		i++
	}
}

// The all-miss path at steady state: every request for a new key, through
// a micro-cache that is full (the bench's miss workload). Each miss leads
// a flight of its own; whether its response is stored (and pushes another
// entry out) is what the doorkeeper decides.
func BenchmarkServeMissChurn(b *testing.B) {
	e := newEngine(b, func(c *Config) { c.MaxEntries = 1024 })
	r := benchRequest()
	for i := range 4096 { // fill the cache
		r.URL.RawQuery = "fill=" + strconv.Itoa(i)
		if err := e.Serve(httptest.NewRecorder(), r, trivialUpstream); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		r.URL.RawQuery = "user=" + strconv.Itoa(i)
		rec := httptest.NewRecorder()
		if err := e.Serve(rec, r, trivialUpstream); err != nil || rec.Code != 200 {
			b.Fatalf("Serve: %v, status %d", err, rec.Code)
		}
		i++
	}
}
