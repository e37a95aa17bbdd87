package tests

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"
)

// The HTTP caching rules as a client sees them through Caddy: content
// codings, reloads, credentials under `public`, freshness, and writes.

// A client that names one coding this module does not know never receives
// a response encoded with another it did not name.
func TestUnknownContentCodingsAreNeverSharedAcrossCodings(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Vary", "Accept-Encoding")
		ae := strings.ToLower(r.Header.Get("Accept-Encoding"))
		if strings.Contains(ae, "compress") {
			w.Header().Set("Content-Encoding", "compress")
			_, _ = fmt.Fprint(w, "compress-encoded bytes")
			return
		}
		_, _ = fmt.Fprint(w, "plain bytes for "+ae)
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	if f := get(client, "GET", url, "Accept-Encoding: compress"); f.status != 200 || f.header.Get("Content-Encoding") != "compress" || !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("first request: %d, Content-Encoding %q, Cache-Status %q; want a stored compress answer", f.status, f.header.Get("Content-Encoding"), f.cacheStatus())
	}
	for _, ae := range []string{"exi", "*", "gzip, exi"} {
		f := get(client, "GET", url, "Accept-Encoding: "+ae)
		if f.err != nil || f.status != 200 {
			t.Errorf("Accept-Encoding %q: %d, err %v", ae, f.status, f.err)
			continue
		}
		if ce := f.header.Get("Content-Encoding"); ce != "" || f.body != "plain bytes for "+ae {
			t.Errorf("Accept-Encoding %q received Content-Encoding %q, body %q (Cache-Status %q): a coding it did not name", ae, ce, f.body, f.cacheStatus())
		}
	}
	if n := up.Calls(); n != 4 {
		t.Errorf("upstream calls: %d, want 4 (one per set of codings)", n)
	}
	// The same unknown coding, named differently, still shares.
	if f := get(client, "GET", url, "Accept-Encoding: X-Compress;q=0.5"); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("x-compress after compress: Cache-Status %q, want a hit", f.cacheStatus())
	}
}

// A browser's reload sends Cache-Control: max-age=0: it is never answered
// from the micro-cache, but it may join a request in flight (whose answer
// is new).
func TestReloadWithMaxAgeZeroIsNeverAnsweredFromTheMicroCache(t *testing.T) {
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("hold") != "" {
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = fmt.Fprint(w, "answer")
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	if f := get(client, "GET", url); !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("first request: Cache-Status %q, want stored", f.cacheStatus())
	}
	for _, cc := range []string{"max-age=0", "Max-Age=0, stale-if-error=60"} {
		f := get(client, "GET", url, "Cache-Control: "+cc)
		if f.status != 200 || strings.Contains(f.cacheStatus(), "hit") {
			t.Errorf("Cache-Control %q: %d, Cache-Status %q: answered from the micro-cache", cc, f.status, f.cacheStatus())
		}
	}
	if n := up.PathCalls(pathFor(t, "")); n != 3 {
		t.Errorf("upstream calls: %d, want 3 (each reload goes upstream)", n)
	}
	if f := get(client, "GET", url, "Cache-Control: max-age=5"); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("Cache-Control: max-age=5 on a copy under a second old: Cache-Status %q, want a hit", f.cacheStatus())
	}

	// A reload that arrives while a request for its key is in flight joins it.
	held := url + "?hold=1"
	before := up.PathCalls(pathFor(t, ""))
	leader := make(chan fetched, 1)
	go func() { leader <- get(client, "GET", held) }()
	if !waitFor(5*time.Second, func() bool { return up.PathCalls(pathFor(t, "")) == before+1 }) {
		t.Fatal("the leader's request never reached the upstream")
	}
	reload := make(chan fetched, 1)
	go func() { reload <- get(client, "GET", held, "Cache-Control: max-age=0") }()
	if !waitFor(5*time.Second, func() bool { return followersWaiting(t, client, pathFor(t, "")) == 1 }) {
		t.Fatal("the reload did not join the flight in progress")
	}
	close(release)
	if f := <-leader; f.status != 200 || f.body != "answer" {
		t.Errorf("leader: %d %q", f.status, f.body)
	}
	if f := <-reload; f.status != 200 || f.body != "answer" || !strings.Contains(f.cacheStatus(), "collapsed") {
		t.Errorf("reload: %d %q, Cache-Status %q; want the flight's answer, collapsed", f.status, f.body, f.cacheStatus())
	}
	if n := up.PathCalls(pathFor(t, "")); n != before+1 {
		t.Errorf("upstream calls for the flight: %d, want 1", n-before)
	}
}
