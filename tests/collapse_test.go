package tests

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// slow answers body after delay (or gives up when the request goes away).
func slow(delay time.Duration, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(delay):
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		_, _ = fmt.Fprint(w, body)
	}
}

func TestHundredConcurrentGETsMakeOneUpstreamCall(t *testing.T) {
	// The upstream answers once all 100 clients wait.
	up := newUpstream(t, newHerdGate(t, 100).wrap(slow(0, "the one answer")))
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 100)

	got := herd(client, 100, "GET", baseURL+pathFor(t, ""))

	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
	expectAll(t, got, http.StatusOK, "the one answer")
	leaders, collapsed := 0, 0
	for i, f := range got {
		cs := f.cacheStatus()
		switch {
		case strings.Contains(cs, "collapsed"):
			collapsed++
		case strings.Contains(cs, "fwd=uri-miss") && strings.Contains(cs, "stored"):
			leaders++
		default:
			t.Errorf("client %d: Cache-Status %q is neither the leader's nor a follower's", i, cs)
		}
	}
	if leaders != 1 || collapsed != 99 {
		t.Errorf("leaders %d (want 1), collapsed followers %d (want 99)", leaders, collapsed)
	}
	t.Logf("100 concurrent GETs: %d upstream call(s), %d leader, %d collapsed", up.Calls(), leaders, collapsed)
}

func TestTwentyKeysAtOnceNeverMix(t *testing.T) {
	const paths, perPath = 20, 10
	// Each path's upstream request is answered once its 10 clients wait.
	up := newUpstream(t, newHerdGate(t, perPath).wrap(func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprint(w, "path="+r.URL.Path)
	}))
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 200)

	got := together(paths*perPath, func(i int) fetched {
		return get(client, "GET", baseURL+pathFor(t, "/"+strconv.Itoa(i%paths)))
	})

	for i, f := range got {
		want := "path=" + pathFor(t, "/"+strconv.Itoa(i%paths))
		if f.err != nil || f.status != http.StatusOK || f.body != want {
			t.Errorf("client %d: got %d %q (err %v), want 200 %q", i, f.status, f.body, f.err, want)
		}
	}
	for p := range paths {
		if n := up.PathCalls(pathFor(t, "/"+strconv.Itoa(p))); n != 1 {
			t.Errorf("path %d: %d upstream calls, want 1", p, n)
		}
	}
}

func TestGETWithinTTLIsAHitAndAfterItAMiss(t *testing.T) {
	var up *upstream
	up = newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprintf(w, "version %d", up.Calls())
	})
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	first := get(client, "GET", url)
	if first.status != 200 || first.body != "version 1" || !strings.Contains(first.cacheStatus(), "stored") {
		t.Fatalf("first GET: %d %q, Cache-Status %q; want 200 \"version 1\" stored", first.status, first.body, first.cacheStatus())
	}

	hit := get(client, "GET", url)
	if hit.status != 200 || hit.body != "version 1" {
		t.Errorf("GET within the TTL: %d %q, want the stored 200 \"version 1\"", hit.status, hit.body)
	}
	if cs := hit.cacheStatus(); !strings.Contains(cs, "hit") {
		t.Errorf("GET within the TTL: Cache-Status %q, want a hit", cs)
	}
	if age := hit.header.Get("Age"); age == "" {
		t.Errorf("a hit has no Age header")
	} else if secs, err := strconv.Atoi(age); err != nil || secs < 0 {
		t.Errorf("Age %q is not a non-negative integer", age)
	}
	if up.Calls() != 1 {
		t.Errorf("upstream calls after the hit: %d, want 1", up.Calls())
	}

	time.Sleep(time.Second)
	miss := get(client, "GET", url)
	if miss.status != 200 || miss.body != "version 2" {
		t.Errorf("GET after the TTL: %d %q, want a fresh 200 \"version 2\"", miss.status, miss.body)
	}
	if cs := miss.cacheStatus(); strings.Contains(cs, "hit") || !strings.Contains(cs, "fwd=uri-miss") {
		t.Errorf("GET after the TTL: Cache-Status %q, want a miss", cs)
	}
	if up.Calls() != 2 {
		t.Errorf("upstream calls: %d, want 2", up.Calls())
	}
}

func TestPOSTIsNeverCollapsed(t *testing.T) {
	// The upstream answers once all 10 POSTs are at it at once.
	up := newUpstream(t, newHerdGate(t, 10).wrap(slow(0, "posted")))
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 10)

	got := herd(client, 10, "POST", baseURL+pathFor(t, ""))

	expectAll(t, got, http.StatusOK, "posted")
	if n := up.Calls(); n != 10 {
		t.Errorf("upstream calls: %d, want 10 (one per POST)", n)
	}
	for i, f := range got {
		if cs := f.cacheStatus(); !strings.Contains(cs, "fwd=method") {
			t.Errorf("client %d: Cache-Status %q, want fwd=method", i, cs)
		}
	}
}

func TestBareCoalesceWorksWithDefaults(t *testing.T) {
	up := newUpstream(t, newHerdGate(t, 20).wrap(slow(0, "defaults")))
	startCaddy(t, site(""), up)
	client := newClient(t)
	warm(t, client, 20)

	got := herd(client, 20, "GET", baseURL+pathFor(t, ""))

	expectAll(t, got, http.StatusOK, "defaults")
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
	for i, f := range got {
		if !strings.HasPrefix(f.cacheStatus(), "caddy-coalesce;") {
			t.Errorf("client %d: Cache-Status %q, want the module's", i, f.cacheStatus())
		}
	}
}
