package tests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// What arrives in the body: streams, large bodies, ranges, 304s, HEAD.

func TestServerSentEventsStreamThroughUnbuffered(t *testing.T) {
	const events, gap = 5, 500 * time.Millisecond
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		rc := http.NewResponseController(w)
		for i := range events {
			if i > 0 {
				select {
				case <-time.After(gap):
				case <-r.Context().Done():
					return
				}
			}
			_, _ = fmt.Fprintf(w, "data: event %d\n\n", i)
			_ = rc.Flush()
		}
	})
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)

	// With and without Accept: text/event-stream (the response's type alone
	// must be enough).
	for _, accept := range []string{"text/event-stream", "*/*"} {
		t.Run("Accept "+accept, func(t *testing.T) {
			req, _ := http.NewRequest("GET", baseURL+pathFor(t, ""), nil)
			req.Header.Set("Accept", accept)
			start := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/event-stream") {
				t.Errorf("Content-Type %q", ct)
			}
			line, err := bufio.NewReader(resp.Body).ReadString('\n')
			first := time.Since(start)
			if err != nil || line != "data: event 0\n" {
				t.Fatalf("first line %q, err %v", line, err)
			}
			// The whole stream takes (events-1)*gap = 2 s.
			if first > time.Second {
				t.Errorf("the first event arrived after %s; the stream is buffered (it ends at %s)", first, (events-1)*gap)
			}
			t.Logf("first event after %s", first.Round(time.Millisecond))
		})
	}
}

// randomBody is n bytes of deterministic noise.
func randomBody(n int) []byte {
	b := make([]byte, n)
	r := rand.NewChaCha8([32]byte{1, 2, 3})
	_, _ = r.Read(b)
	return b
}

func TestTwentyMiBBodyArrivesIntactForConcurrentClients(t *testing.T) {
	body := randomBody(20 << 20)
	sum := sha256.Sum256(body)
	want := hex.EncodeToString(sum[:])
	// Each case's upstream request is answered once its 5 clients wait.
	up := newUpstream(t, newHerdGate(t, 5).wrap(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		if r.URL.Query().Has("chunked") {
			// No Content-Length: sent chunked, in pieces.
			for b := body; len(b) > 0; b = b[min(len(b), 64<<10):] {
				_, _ = w.Write(b[:min(len(b), 64<<10)])
			}
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = w.Write(body)
	}))

	for _, c := range []struct {
		name, options, query string
		calls                int64 // upstream calls for the 5 clients; 0: any
	}{
		{"larger than max_body, streamed", "ttl 500ms", "", 0},
		{"unknown length larger than max_body, streamed", "ttl 500ms", "?chunked", 0},
		{"within max_body, shared", "ttl 500ms\n\t\tmax_body 32MiB", "", 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			before := up.Calls()
			startCaddy(t, site(c.options), up)
			client := newClient(t)
			client.Timeout = 3 * time.Minute // 100 MiB through Caddy under -race on a busy machine
			warm(t, client, 5)
			got := herd(client, 5, "GET", baseURL+pathFor(t, "")+c.query)
			for i, f := range got {
				s := sha256.Sum256([]byte(f.body))
				if f.err != nil || f.status != 200 || hex.EncodeToString(s[:]) != want {
					t.Errorf("client %d: %d, %d bytes, err %v: body differs from the upstream's", i, f.status, len(f.body), f.err)
				}
			}
			t.Logf("%d upstream calls for 5 clients", up.Calls()-before)
			if n := up.Calls() - before; c.calls != 0 && n != c.calls {
				t.Errorf("upstream calls: %d, want %d", n, c.calls)
			}
		})
	}
}

func TestRangeRequestsGetTheirBytesAndFullRequestsTheWhole(t *testing.T) {
	content := randomBody(10000)
	var full, ranged atomic.Int64
	// Answered once all 30 clients wait: the 20 ranges at the upstream, the
	// 10 full GETs in one flight.
	gate := newHerdGate(t, 30)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Range") != "" {
			ranged.Add(1)
		} else {
			full.Add(1)
		}
		if !gate.hold(r.Context(), r.URL.Path) {
			return
		}
		w.Header().Set("Etag", `"v1"`)
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(content))
	})
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 30)
	url := baseURL + pathFor(t, "")
	ranges := []struct {
		header   string
		from, to int // inclusive
	}{{"bytes=0-99", 0, 99}, {"bytes=5000-5009", 5000, 5009}}

	got := together(30, func(i int) fetched {
		if i%3 == 2 {
			return get(client, "GET", url)
		}
		return get(client, "GET", url, "Range: "+ranges[i%3].header)
	})

	for i, f := range got {
		if i%3 == 2 {
			if f.status != 200 || f.body != string(content) {
				t.Errorf("full client %d: %d with %d bytes, want 200 with all %d", i, f.status, len(f.body), len(content))
			}
			continue
		}
		rg := ranges[i%3]
		if f.status != http.StatusPartialContent || f.body != string(content[rg.from:rg.to+1]) {
			t.Errorf("range client %d (%s): %d with %d bytes, want 206 with bytes %d-%d", i, rg.header, f.status, len(f.body), rg.from, rg.to)
		}
		if cr := f.header.Get("Content-Range"); cr != fmt.Sprintf("bytes %d-%d/%d", rg.from, rg.to, len(content)) {
			t.Errorf("range client %d: Content-Range %q", i, cr)
		}
	}
	if n := full.Load(); n != 1 {
		t.Errorf("full GETs reaching the upstream: %d, want 1 (collapsed)", n)
	}
	if n := ranged.Load(); n != 20 {
		t.Errorf("range GETs reaching the upstream: %d, want 20 (never collapsed)", n)
	}

	// A range request right after, while the full response is stored, still
	// gets its range.
	f := get(client, "GET", url, "Range: bytes=0-99")
	if f.status != http.StatusPartialContent || f.body != string(content[:100]) {
		t.Errorf("range after the herd: %d with %d bytes", f.status, len(f.body))
	}
}

func TestMatchingIfNoneMatchGets304WhileCollapsedWithFullResponses(t *testing.T) {
	var sawValidator atomic.Int64
	// Answered once all 30 clients wait.
	answer := func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("If-None-Match") != "" || r.Header.Get("If-Modified-Since") != "" {
			sawValidator.Add(1)
		}
		w.Header().Set("Etag", `"v1"`)
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprint(w, `{"sessions":3}`)
	}
	up := newUpstream(t, newHerdGate(t, 30).wrap(answer))
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 30)
	url := baseURL + pathFor(t, "")
	validator := func(i int) string {
		return []string{`If-None-Match: "v1"`, `If-None-Match: W/"v1"`, `If-None-Match: "v0"`}[i%3]
	}

	got := together(30, func(i int) fetched {
		if i%5 == 4 {
			return get(client, "GET", url)
		}
		return get(client, "GET", url, validator(i))
	})

	for i, f := range got {
		matches := i%5 != 4 && i%3 != 2
		switch {
		case matches && (f.status != http.StatusNotModified || f.body != ""):
			t.Errorf("client %d (%s): %d %q, want 304 with no body", i, validator(i), f.status, f.body)
		case !matches && (f.status != 200 || f.body != `{"sessions":3}`):
			t.Errorf("client %d: %d %q, want 200 with the body", i, f.status, f.body)
		}
		if f.header.Get("Etag") != `"v1"` {
			t.Errorf("client %d: ETag %q", i, f.header.Get("Etag"))
		}
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
	if n := sawValidator.Load(); n != 0 {
		t.Errorf("the upstream saw a client's validator %d time(s); the shared request must carry none", n)
	}

	// From the micro-cache too: a matching validator gets 304, another 200.
	if f := get(client, "GET", url, `If-None-Match: "v1"`); f.status != http.StatusNotModified || f.body != "" {
		t.Errorf("hit with a matching If-None-Match: %d %q (Cache-Status %q), want 304", f.status, f.body, f.cacheStatus())
	}
	if f := get(client, "GET", url, `If-None-Match: "v0"`); f.status != 200 || f.body != `{"sessions":3}` {
		t.Errorf("hit with a stale If-None-Match: %d %q, want 200 with the body", f.status, f.body)
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls after the hits: %d, want 1", n)
	}
}

func TestHEADHasNoBodyAndNeverLeavesAnEmptyBodyForGET(t *testing.T) {
	const body = "hello, world"
	// Each subtest's herd is answered once it waits at its own gate.
	var gate atomic.Pointer[herdGate]
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if !gate.Load().hold(r.Context(), r.URL.Path) {
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = fmt.Fprint(w, body)
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 10)
	wantLength := strconv.Itoa(len(body))

	t.Run("HEAD first, then GET", func(t *testing.T) {
		gate.Store(newHerdGate(t, 10))
		url := baseURL + pathFor(t, "")
		heads := herd(client, 10, "HEAD", url)
		for i, f := range heads {
			if f.status != 200 || f.body != "" || f.header.Get("Content-Length") != wantLength {
				t.Errorf("HEAD %d: %d, body %q, Content-Length %q; want 200, none, %s", i, f.status, f.body, f.header.Get("Content-Length"), wantLength)
			}
		}
		for i := range 3 {
			if f := get(client, "GET", url); f.status != 200 || f.body != body {
				t.Errorf("GET %d after HEAD: %d %q (Cache-Status %q), want the full body", i, f.status, f.body, f.cacheStatus())
			}
		}
	})

	t.Run("GET first, then HEAD", func(t *testing.T) {
		gate.Store(newHerdGate(t, 1))
		url := baseURL + pathFor(t, "")
		if f := get(client, "GET", url); f.status != 200 || f.body != body {
			t.Fatalf("GET: %d %q", f.status, f.body)
		}
		calls := up.Calls()
		f := get(client, "HEAD", url)
		if f.status != 200 || f.body != "" || f.header.Get("Content-Length") != wantLength {
			t.Errorf("HEAD after GET: %d, body %q, Content-Length %q", f.status, f.body, f.header.Get("Content-Length"))
		}
		if up.Calls() != calls {
			t.Errorf("HEAD after GET went upstream (Cache-Status %q); the stored GET answers it", f.cacheStatus())
		}
		if g := get(client, "GET", url); g.body != body {
			t.Errorf("GET after HEAD: %q", g.body)
		}
	})

	t.Run("HEAD and GET at once", func(t *testing.T) {
		gate.Store(newHerdGate(t, 20))
		url := baseURL + pathFor(t, "")
		got := together(20, func(i int) fetched { return get(client, []string{"HEAD", "GET"}[i%2], url) })
		for i, f := range got {
			wantBody := map[bool]string{true: "", false: body}[i%2 == 0]
			if f.status != 200 || f.body != wantBody || f.header.Get("Content-Length") != wantLength {
				t.Errorf("client %d (%s): %d %q, Content-Length %q", i, []string{"HEAD", "GET"}[i%2], f.status, f.body, f.header.Get("Content-Length"))
			}
		}
	})
}
