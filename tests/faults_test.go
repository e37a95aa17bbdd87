package tests

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Fault injection: upstreams that die, hang, lie or stream and vanish, and a
// handler below coalesce that panics. Every test is bounded in time and in
// the number of clients, and asserts what the clients see.

// rawUpstream is a TCP listener on 127.0.0.1 whose connections are served by
// serve (which owns the connection). It counts connections, keeps track of
// the open ones, and can die: listener and every connection closed at once.
type rawUpstream struct {
	ln       net.Listener
	accepted atomic.Int64
	mu       sync.Mutex
	conns    map[net.Conn]struct{}
	dead     bool
}

func newRawUpstream(t *testing.T, serve func(c net.Conn)) *rawUpstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &rawUpstream{ln: ln, conns: map[net.Conn]struct{}{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			r.accepted.Add(1)
			r.mu.Lock()
			if r.dead {
				r.mu.Unlock()
				_ = c.Close()
				continue
			}
			r.conns[c] = struct{}{}
			r.mu.Unlock()
			go func() {
				defer func() {
					r.mu.Lock()
					delete(r.conns, c)
					r.mu.Unlock()
					_ = c.Close()
				}()
				serve(c)
			}()
		}
	}()
	t.Cleanup(r.die)
	return r
}

// die closes the listener and every open connection, as a crashing process.
func (r *rawUpstream) die() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.dead = true
	_ = r.ln.Close()
	for c := range r.conns {
		_ = c.Close()
	}
}

func (r *rawUpstream) addr() string    { return r.ln.Addr().String() }
func (r *rawUpstream) as() *upstream   { return &upstream{addr: r.addr()} }
func (r *rawUpstream) Accepted() int64 { return r.accepted.Load() }
func readRequestHead(c net.Conn) error { return readHead(bufio.NewReader(c)) }

// readRequestPath reads an HTTP request head and returns its path.
func readRequestPath(c net.Conn) (string, error) {
	req, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil {
		return "", err
	}
	return req.URL.Path, nil
}
func holdUntilClosed(c net.Conn) { _, _ = io.Copy(io.Discard, c) }

// readHead reads an HTTP request head (up to the empty line).
func readHead(br *bufio.Reader) error {
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return err
		}
		if line == "\r\n" || line == "\n" {
			return nil
		}
	}
}

// registryIdle reports whether /coalesce/stats shows no active key and no
// waiter in any zone.
func registryIdle(t testing.TB, client *http.Client) (bool, adminRegistryStats) {
	var stats adminStats
	if st := adminJSON(t, client, "GET", "/coalesce/stats", "", &stats); st != http.StatusOK {
		t.Fatalf("GET /coalesce/stats: status %d", st)
	}
	r := stats.Total.Registry
	return r.ActiveKeys == 0 && r.Waiters == 0, r
}

// 1. The upstream process dies while a leader and 30 followers wait.
func TestFaultUpstreamDiesMidHerd(t *testing.T) {
	up := newRawUpstream(t, func(c net.Conn) {
		if readRequestHead(c) != nil {
			return
		}
		holdUntilClosed(c) // never answers; dies with the process
	})
	startCaddy(t, site("ttl 1s\n\t\tmax_wait 10s"), up.as())
	client := newClient(t)
	warm(t, client, 31)
	path := pathFor(t, "")
	url := baseURL + path

	done := make(chan []fetched, 1)
	go func() { done <- herd(client, 31, "GET", url) }()
	if !waitFor(3*time.Second, func() bool { return followersWaiting(t, client, path) == 30 }) {
		t.Fatalf("the herd did not gather (accepted %d, followers waiting %d)", up.Accepted(), followersWaiting(t, client, path))
	}
	killed := time.Now()
	up.die()

	var got []fetched
	select {
	case got = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("clients still hanging 10s after the upstream died")
	}
	after := time.Since(killed)
	for i, f := range got {
		if f.err != nil || f.status != http.StatusBadGateway {
			t.Errorf("client %d: %d %q (err %v), want 502", i, f.status, clip(f.body), f.err)
		}
	}
	if after > 5*time.Second {
		t.Errorf("the herd finished %s after the upstream died; want < 5s", after)
	}
	t.Logf("31 clients answered %s after the upstream died (%d upstream connections)", after.Round(time.Millisecond), up.Accepted())
	if n := up.Accepted(); n != 1 {
		t.Errorf("upstream connections during the herd: %d, want 1", n)
	}

	// The process comes back on the same address: the next request goes
	// to it (nothing of the failure was stored).
	ln, err := net.Listen("tcp", up.addr())
	if err != nil {
		t.Skipf("cannot listen again on %s: %v", up.addr(), err)
	}
	var calls atomic.Int64
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		_, _ = io.WriteString(w, "back")
	})}
	go func() { _ = srv.Serve(ln) }()
	defer srv.Close()
	if f := get(client, "GET", url); f.err != nil || f.status != 200 || f.body != "back" || calls.Load() != 1 {
		t.Errorf("GET after the upstream came back: %d %q (err %v), upstream calls %d; want 200 \"back\" from the upstream", f.status, f.body, f.err, calls.Load())
	}
}

// 2. The upstream dies in the middle of an event stream.
func TestFaultUpstreamDiesMidStream(t *testing.T) {
	var n atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.Header().Set("Cache-Control", "no-cache")
		rc := http.NewResponseController(w)
		first := n.Add(1) == 1
		for i := 1; i <= 2; i++ {
			_, _ = fmt.Fprintf(w, "data: %d\n\n", i)
			_ = rc.Flush()
			time.Sleep(50 * time.Millisecond)
		}
		if first {
			// The process dies: the connection goes, with no final chunk.
			conn, _, err := rc.Hijack()
			if err == nil {
				_ = conn.Close()
			}
			return
		}
		_, _ = io.WriteString(w, "data: end\n\n")
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	start := time.Now()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatalf("GET the stream: %v", err)
	}
	body, readErr := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "data: 1\n\ndata: 2\n\n" {
		t.Errorf("stream: %d %q; want 200 and the two events sent before the upstream died", resp.StatusCode, body)
	}
	if readErr == nil {
		t.Errorf("the stream ended cleanly although the upstream died mid-stream (body %q)", body)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the aborted stream took %s to end", took)
	}
	t.Logf("client saw %q then %v", body, readErr)

	f := get(client, "GET", url)
	if f.err != nil || f.status != 200 || f.body != "data: 1\n\ndata: 2\n\ndata: end\n\n" {
		t.Errorf("GET after the broken stream: %d %q (err %v)", f.status, f.body, f.err)
	}
	if c := up.Calls(); c != 2 {
		t.Errorf("upstream calls: %d, want 2", c)
	}
}

// 3. The upstream accepts, reads, and never answers.
func TestFaultHangingUpstreamUnderAHerd(t *testing.T) {
	up := newRawUpstream(t, func(c net.Conn) {
		if readRequestHead(c) != nil {
			return
		}
		holdUntilClosed(c)
	})
	startCaddy(t, fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	coalesce {
		ttl 1s
		max_wait 300ms
	}
	reverse_proxy {up} {
		transport http {
			response_header_timeout 2s
		}
	}
}
`, httpPort), up.as())
	client := newClient(t)
	warm(t, client, 10)
	url := baseURL + pathFor(t, "")

	start := time.Now()
	done := make(chan []fetched, 1)
	go func() { done <- herd(client, 10, "GET", url) }()
	var got []fetched
	select {
	case got = <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("clients still hanging 15s into a herd with max_wait 300ms and a 2s response_header_timeout")
	}
	total := time.Since(start)

	var followers, leaders int
	for i, f := range got {
		switch {
		case f.took < 1500*time.Millisecond:
			followers++
			if f.err != nil || f.status != http.StatusGatewayTimeout {
				t.Errorf("client %d (follower, %s): %d (err %v), want 504", i, f.took.Round(time.Millisecond), f.status, f.err)
			}
			if f.took < 250*time.Millisecond {
				t.Errorf("client %d: 504 after %s, before max_wait 300ms", i, f.took.Round(time.Millisecond))
			}
		default:
			leaders++
			if f.err != nil || (f.status != http.StatusBadGateway && f.status != http.StatusGatewayTimeout) {
				t.Errorf("client %d (leader, %s): %d (err %v), want 502 or 504", i, f.took.Round(time.Millisecond), f.status, f.err)
			}
			if f.took < 1800*time.Millisecond || f.took > 6*time.Second {
				t.Errorf("client %d (leader) answered after %s; want about the 2s transport timeout", i, f.took.Round(time.Millisecond))
			}
		}
	}
	if leaders != 1 || followers != 9 {
		t.Errorf("%d clients answered within 1.5s and %d later; want 9 followers (max_wait) and 1 leader (transport timeout)", followers, leaders)
	}
	if n := up.Accepted(); n != 1 {
		t.Errorf("upstream connections: %d, want 1", n)
	}
	t.Logf("herd against a hanging upstream: %d followers at ~max_wait, %d leader(s), all done in %s", followers, leaders, total.Round(time.Millisecond))
}

// 4a. The upstream answers something that is not HTTP.
func TestFaultGarbageResponseIs502AndNotStored(t *testing.T) {
	cases := []struct {
		name, reply string
	}{
		{"bad_length", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: abc\r\n\r\nhello"},
		{"random_bytes", "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all \xff\xfe\r\n\r\n"},
		{"bad_status", "HTTP/1.1 2OO OK\r\nContent-Length: 5\r\n\r\nhello"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			gate := newHerdGate(t, 10)
			up := newRawUpstream(t, func(conn net.Conn) {
				path, err := readRequestPath(conn)
				if err != nil || !gate.hold(context.Background(), path) {
					return
				}
				_, _ = io.WriteString(conn, c.reply)
			})
			startCaddy(t, site("ttl 1s"), up.as())
			client := newClient(t)
			warm(t, client, 10)
			url := baseURL + pathFor(t, "")

			got := herd(client, 10, "GET", url)
			for i, f := range got {
				if f.err != nil || f.status != http.StatusBadGateway {
					t.Errorf("client %d: %d %q (err %v), want 502", i, f.status, clip(f.body), f.err)
				}
			}
			before := up.Accepted()
			f := get(client, "GET", url)
			if f.status != http.StatusBadGateway || strings.Contains(f.cacheStatus(), "hit") {
				t.Errorf("GET after the herd: %d %q, Cache-Status %q; want a fresh 502", f.status, clip(f.body), f.cacheStatus())
			}
			if up.Accepted() == before {
				t.Errorf("GET after the herd did not reach the upstream (connections %d): a garbage answer was stored", before)
			}
		})
	}
}

// 4b. The upstream promises 1 MiB, streams 256 KiB over a while and hangs
// up, under a herd.
func TestFaultTruncatedBodyUnderAHerdIsNeverPresentedComplete(t *testing.T) {
	const promised = 1 << 20
	var fixed atomic.Bool
	gate := newHerdGate(t, 15)
	up := newRawUpstream(t, func(c net.Conn) {
		path, err := readRequestPath(c)
		if err != nil {
			return
		}
		if fixed.Load() {
			_, _ = fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: close\r\n\r\nwhole")
			return
		}
		if !gate.hold(context.Background(), path) {
			return
		}
		_, _ = fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", promised)
		chunk := strings.Repeat("y", 32<<10)
		for range 8 {
			if _, err := io.WriteString(c, chunk); err != nil {
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	startCaddy(t, site("ttl 1s\n\t\tmax_body 4MiB"), up.as())
	client := newClient(t)
	warm(t, client, 15)
	url := baseURL + pathFor(t, "")

	got := herd(client, 15, "GET", url)
	// The followers get 502 at once. The leader's client sees its
	// connection aborted before any byte and net/http replays the GET on
	// its other idle pooled connections, each replay a new truncated flight:
	// hence about one upstream connection per pooled connection.
	aborted := 0
	for i, f := range got {
		switch {
		case f.err != nil && f.status == 0:
			aborted++
		case f.err == nil && f.status == http.StatusBadGateway && strings.Contains(f.cacheStatus(), "collapsed"):
		default:
			t.Errorf("client %d: %d with %d of the %d bytes promised, Cache-Status %q, err %v; want the leader's aborted connection or a follower's 502", i, f.status, len(f.body), promised, f.cacheStatus(), f.err)
		}
	}
	if aborted != 1 {
		t.Errorf("%d clients saw their connection aborted, want the leader's alone", aborted)
	}
	t.Logf("15 clients of a truncated body: %d upstream connections", up.Accepted())

	before := up.Accepted()
	fixed.Store(true)
	f := get(client, "GET", url)
	if f.err != nil || f.status != 200 || f.body != "whole" {
		t.Errorf("GET after the herd: %d %q (err %v, Cache-Status %q); want the upstream's new answer", f.status, clip(f.body), f.err, f.cacheStatus())
	}
	if up.Accepted() == before {
		t.Errorf("GET after the herd did not reach the upstream")
	}
}

// 5. A handler below coalesce panics while a herd waits on its flight.

// panicHandler is a test-only handler: it waits at panicGate, when the test
// sets one, for its herd to gather, then panics.
type panicHandler struct{}

// panicGate is the herdGate the panicHandler waits at.
var panicGate atomic.Pointer[herdGate]

func (panicHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.test_panic", New: func() caddy.Module { return new(panicHandler) }}
}

func (h *panicHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if g := panicGate.Load(); g != nil {
		g.hold(r.Context(), r.URL.Path)
	}
	panic("test_panic: the handler below coalesce blew up")
}

func (h *panicHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error { return nil }

func init() {
	caddy.RegisterModule(panicHandler{})
	httpcaddyfile.RegisterHandlerDirective("test_panic", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		p := new(panicHandler)
		err := p.UnmarshalCaddyfile(h.Dispenser)
		return p, err
	})
}

var (
	_ caddyhttp.MiddlewareHandler = (*panicHandler)(nil)
	_ caddyfile.Unmarshaler       = (*panicHandler)(nil)
)

func TestFaultPanicBelowCoalesceReleasesTheHerd(t *testing.T) {
	// The handler panics once the herd of 20 waits.
	panicGate.Store(newHerdGate(t, 20))
	t.Cleanup(func() { panicGate.Store(nil) })
	startCaddy(t, fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	handle /alive {
		respond "alive" 200
	}
	handle {
		route {
			coalesce {
				ttl 1s
				max_wait 10s
			}
			test_panic
		}
	}
}
`, httpPort))
	client := newClient(t)
	warm(t, client, 20)
	url := baseURL + pathFor(t, "")

	start := time.Now()
	done := make(chan []fetched, 1)
	go func() { done <- herd(client, 20, "GET", url) }()
	var got []fetched
	select {
	case got = <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("clients still hanging 10s after the handler below coalesce panicked")
	}
	took := time.Since(start)
	gateway, broken := 0, 0
	for i, f := range got {
		switch {
		case f.err == nil && f.status == http.StatusBadGateway:
			gateway++
			if f.took > 2*time.Second {
				t.Errorf("client %d: 502 after %s; the handler panics once the herd waits", i, f.took.Round(time.Millisecond))
			}
		case f.err != nil || f.status >= 500:
			broken++ // the leader: its connection goes down with the panic
		default:
			t.Errorf("client %d: %d %q (err %v), want an error", i, f.status, clip(f.body), f.err)
		}
	}
	t.Logf("20 clients over a panicking handler: %d got 502, %d another error (the leader's), in %s", gateway, broken, took.Round(time.Millisecond))
	if gateway != 19 || broken != 1 {
		t.Errorf("%d of 20 clients got 502 and %d another error; want every follower (19) released with 502, and the leader's connection broken", gateway, broken)
	}
	// The leader's own connection dies with the panic; Go's client replays
	// the GET on each of its other idle pooled connections (nothing was
	// read), and every replay leads a new flight that panics 200 ms later.
	// That is net/http's retry, bounded by the pool (20 connections here).
	if took > 8*time.Second {
		t.Errorf("the herd took %s to be released (the handler panics once it waits)", took)
	}

	if f := get(client, "GET", baseURL+"/alive"); f.err != nil || f.status != 200 || f.body != "alive" {
		t.Errorf("GET /alive after the panic: %d %q (err %v)", f.status, f.body, f.err)
	}
	var last adminRegistryStats
	if !waitFor(2*time.Second, func() bool { ok, r := registryIdle(t, client); last = r; return ok }) {
		t.Errorf("/coalesce/stats after the panic: %d active keys, %d waiters; want 0 and 0", last.ActiveKeys, last.Waiters)
	}
}

// 6. Slow clients reading a shared body do not hold back the fast ones.
func TestFaultSlowReadersDoNotSlowTheHerd(t *testing.T) {
	const size = 2 << 20
	payload := strings.Repeat("0123456789abcdef", size/16)
	// Each herd's upstream request is answered once the herd waits: 20 fast
	// clients alone, then 5 slow readers and 20 fast clients.
	alone, mixed := newHerdGate(t, 20), newHerdGate(t, 25)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		gate := mixed
		if strings.HasSuffix(r.URL.Path, "-alone") {
			gate = alone
		}
		if !gate.hold(r.Context(), r.URL.Path) {
			return
		}
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(size))
		_, _ = io.WriteString(w, payload)
	})
	startCaddy(t, site("ttl 1s\n\t\tmax_body 4MiB\n\t\tmax_wait 10s"), up)
	fast := newClient(t)
	slowClient := newClient(t) // own connections: slow readers share no pool with the fast
	warm(t, fast, 20)
	warm(t, slowClient, 5)
	url := baseURL + pathFor(t, "")

	// Baseline: the same herd of fast clients alone (under -race, copying
	// 2 MiB to 20 clients costs its own time).
	var baseline time.Duration
	for i, f := range herd(fast, 20, "GET", baseURL+pathFor(t, "-alone")) {
		if f.err != nil || f.status != 200 || len(f.body) != size {
			t.Fatalf("baseline client %d: %d, %d bytes (err %v)", i, f.status, len(f.body), f.err)
		}
		baseline = max(baseline, f.took)
	}

	const slowN = 5
	start := time.Now()
	got := together(25, func(i int) fetched {
		if i >= slowN {
			return get(fast, "GET", url)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 25*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
		resp, err := slowClient.Do(req)
		if err != nil {
			return fetched{err: err, took: time.Since(start)}
		}
		defer resp.Body.Close()
		var sb strings.Builder
		buf := make([]byte, 16<<10)
		for {
			n, err := io.ReadFull(resp.Body, buf)
			sb.Write(buf[:n])
			if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
				break
			}
			if err != nil {
				return fetched{status: resp.StatusCode, body: sb.String(), err: err, took: time.Since(start)}
			}
			time.Sleep(50 * time.Millisecond)
		}
		return fetched{status: resp.StatusCode, header: resp.Header, body: sb.String(), took: time.Since(start)}
	})

	var fastMax, slowMin time.Duration
	slowMin = time.Hour
	for i, f := range got {
		if f.err != nil || f.status != 200 || f.body != payload {
			t.Errorf("client %d: %d, %d bytes (err %v), want 200 and the %d bytes", i, f.status, len(f.body), f.err, size)
		}
		if i < slowN {
			slowMin = min(slowMin, f.took)
		} else {
			fastMax = max(fastMax, f.took)
		}
	}
	t.Logf("fast clients all done in %s (alone: %s); slow readers took at least %s; upstream calls %d", fastMax.Round(time.Millisecond), baseline.Round(time.Millisecond), slowMin.Round(time.Millisecond), up.Calls())
	if bound := max(2*time.Second, 2*baseline+500*time.Millisecond); fastMax > bound || fastMax > slowMin/2 {
		t.Errorf("the slowest fast client took %s (alone %s, bound %s; slow readers %s): slow readers held the herd back", fastMax, baseline, bound, slowMin)
	}
	if slowMin < 4*time.Second {
		t.Errorf("a slow reader finished in %s: it did not read slowly, the test proves nothing", slowMin)
	}
	if n := up.Calls(); n != 2 {
		t.Errorf("upstream calls: %d, want 2 (one per herd)", n)
	}
}
