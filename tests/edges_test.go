package tests

import (
	"bufio"
	"compress/gzip"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Edges of the request path that a user meets in production: streams that
// announce themselves only by trickling, upstreams that break mid-body or
// fail, leaders that take too long.

func TestTricklingStreamWithoutLengthIsNotHeldBack(t *testing.T) {
	// A long poll / NDJSON feed with an ordinary content type: no length,
	// the first line flushed at once, the next one much later.
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprint(w, `{"event":1}`+"\n")
		_ = http.NewResponseController(w).Flush()
		select {
		case <-time.After(3 * time.Second):
		case <-r.Context().Done():
			return
		}
		_, _ = fmt.Fprint(w, `{"event":2}`+"\n")
	})
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 3)

	got := together(3, func(int) fetched {
		start := time.Now()
		resp, err := client.Get(baseURL + pathFor(t, ""))
		if err != nil {
			return fetched{err: err}
		}
		defer resp.Body.Close()
		line, err := bufio.NewReader(resp.Body).ReadString('\n')
		return fetched{status: resp.StatusCode, body: line, err: err, took: time.Since(start)}
	})
	for i, f := range got {
		if f.err != nil || f.body != `{"event":1}`+"\n" {
			t.Errorf("client %d: first line %q, err %v", i, f.body, f.err)
			continue
		}
		if f.took > 1500*time.Millisecond {
			t.Errorf("client %d: the first line, flushed at once by the upstream, arrived after %s (the second comes at 3s)", i, f.took.Round(time.Millisecond))
		}
	}
}

func TestUpstreamBreakingMidBodyNeverHandsOutATruncatedBody(t *testing.T) {
	// The upstream promises 1000 bytes, sends 500 and hangs up, once the
	// herd of 10 waits.
	gate := newHerdGate(t, 10)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var calls atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				calls.Add(1)
				if gate.hold(context.Background(), req.URL.Path) {
					_, _ = fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000\r\n\r\n%s", strings.Repeat("x", 500))
				}
			}()
		}
	}()
	startCaddy(t, site("ttl 1s"), &upstream{addr: ln.Addr().String()})
	client := newClient(t)
	warm(t, client, 10)
	url := baseURL + pathFor(t, "")

	got := herd(client, 10, "GET", url)
	// The leader's own client sees its connection aborted, which is how
	// reverse_proxy signals a truncated body (Go's client may retry it once
	// on another pooled connection: a new flight, broken the same way).
	// Its followers get a 502 that says the flight failed.
	aborted := 0
	for i, f := range got {
		switch {
		case f.err != nil && f.status == 0:
			aborted++
		case f.err == nil && f.status == http.StatusBadGateway && strings.Contains(f.cacheStatus(), "collapsed"):
		default:
			t.Errorf("client %d: %d %q (%d bytes), Cache-Status %q, err %v; want the leader's aborted connection or a follower's 502", i, f.status, clip(f.body), len(f.body), f.cacheStatus(), f.err)
		}
	}
	if aborted != 1 {
		t.Errorf("%d clients saw their connection aborted, want the leader's alone", aborted)
	}
	// Nothing broken was stored: the next GET goes upstream again, and is
	// aborted the same way.
	before := calls.Load()
	if f := get(client, "GET", url); f.err == nil || calls.Load() == before {
		t.Errorf("GET after the herd: %d with %d bytes, Cache-Status %q, err %v, upstream calls %d then %d; want the upstream's truncated answer aborted again", f.status, len(f.body), f.cacheStatus(), f.err, before, calls.Load())
	}
}

func TestUpstreamErrorIsSharedWithTheHerdButNotStored(t *testing.T) {
	up := newUpstream(t, newHerdGate(t, 20).wrap(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "upstream is unwell", http.StatusInternalServerError)
	}))
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 20)
	url := baseURL + pathFor(t, "")

	got := herd(client, 20, "GET", url)
	expectAll(t, got, http.StatusInternalServerError, "upstream is unwell\n")
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
	if f := get(client, "GET", url); up.Calls() != 2 || strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("a 500 was reused: upstream calls %d, Cache-Status %q", up.Calls(), f.cacheStatus())
	}
}

func TestFollowersGiveUpAfterMaxWaitWith504(t *testing.T) {
	// The upstream answers the leader only after the followers are done.
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		_, _ = fmt.Fprint(w, "slow answer")
	})
	startCaddy(t, site("ttl 500ms\n\t\tmax_wait 200ms"), up)
	client := newClient(t)
	warm(t, client, 6)
	url := baseURL + pathFor(t, "")

	leader := make(chan fetched, 1)
	go func() { leader <- get(client, "GET", url) }()
	if !waitFor(2*time.Second, func() bool { return up.Calls() == 1 }) {
		close(release)
		t.Fatal("the leader never reached the upstream")
	}
	followers := herd(client, 5, "GET", url)
	close(release)
	for i, f := range followers {
		if f.status != http.StatusGatewayTimeout || !strings.Contains(f.cacheStatus(), "detail=wait-timeout") {
			t.Errorf("follower %d: %d %q, Cache-Status %q, want 504 after max_wait", i, f.status, f.body, f.cacheStatus())
		}
		if f.took > 1200*time.Millisecond {
			t.Errorf("follower %d waited %s with max_wait 200ms", i, f.took)
		}
	}
	if f := <-leader; f.status != 200 || f.body != "slow answer" {
		t.Errorf("leader: %d %q", f.status, f.body)
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want the leader's alone", n)
	}
}

func TestCompressedAndPlainClientsEachGetABodyTheyCanRead(t *testing.T) {
	const body = `{"sessions":[1,2,3],"padding":"` + "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx" + `"}`
	// An upstream that compresses when the client accepts gzip, as many do,
	// and answers once all 30 clients wait.
	up := newUpstream(t, newHerdGate(t, 30).wrap(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Vary", "Accept-Encoding")
		if strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
			w.Header().Set("Content-Encoding", "gzip")
			zw := gzip.NewWriter(w)
			_, _ = zw.Write([]byte(body))
			_ = zw.Close()
			return
		}
		_, _ = fmt.Fprint(w, body)
	}))
	// Caddy's own encode in front, as in many real configs.
	startCaddy(t, fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	encode gzip
	coalesce {
		ttl 1s
	}
	reverse_proxy {up}
}
`, httpPort), up)
	client := newClient(t)
	warm(t, client, 30)
	url := baseURL + pathFor(t, "")
	accept := []string{"gzip", "gzip, deflate, br", "identity"}

	got := together(30, func(i int) fetched { return get(client, "GET", url, "Accept-Encoding: "+accept[i%3]) })

	for i, f := range got {
		plain := f.body
		if f.header.Get("Content-Encoding") == "gzip" {
			if accept[i%3] == "identity" {
				t.Errorf("client %d asked for identity and got gzip", i)
				continue
			}
			zr, err := gzip.NewReader(strings.NewReader(f.body))
			if err != nil {
				t.Errorf("client %d: Content-Encoding gzip but %v", i, err)
				continue
			}
			b, err := io.ReadAll(zr)
			if err != nil {
				t.Errorf("client %d: gzip body: %v", i, err)
				continue
			}
			plain = string(b)
		}
		if f.status != 200 || plain != body {
			t.Errorf("client %d (Accept-Encoding %s): %d, Content-Encoding %q, body %q", i, accept[i%3], f.status, f.header.Get("Content-Encoding"), clip(plain))
		}
	}
	t.Logf("30 clients in three Accept-Encoding classes: %d upstream calls", up.Calls())
	if n := up.Calls(); n > 3 {
		t.Errorf("upstream calls: %d, want at most one per encoding class (3)", n)
	}
}

// RFC 9211: a cache appends its Cache-Status member after those of the
// caches behind it. reverse_proxy adds the upstream's fields to the header
// map coalesce hands it, so on requests that pass straight through (POST,
// Range) ours must still come last, as on those coalesce answers itself.
func TestCacheStatusComesAfterTheUpstreamsMembers(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Add("Cache-Status", "origin-cache; hit")
		_, _ = io.WriteString(w, "body")
	})
	startCaddy(t, site(""), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	for _, c := range []struct {
		method string
		header []string
	}{{"POST", nil}, {"GET", []string{"Range: bytes=0-1"}}, {"GET", nil}} {
		f := get(client, c.method, url, c.header...)
		members := f.header.Values("Cache-Status")
		if f.err != nil || len(members) != 2 || members[0] != "origin-cache; hit" || !strings.HasPrefix(members[1], "caddy-coalesce;") {
			t.Errorf("%s %q: %d Cache-Status %q (err %v), want the origin's member, then ours", c.method, c.header, f.status, members, f.err)
		}
	}
}
