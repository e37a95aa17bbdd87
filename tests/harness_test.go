// Package tests drives caddy-coalesce the way users run it: a real Caddy
// (caddytest, in process) in front of real upstream servers on 127.0.0.1,
// and the binary built by xcaddy.sh end to end. One in-process Caddy per
// test binary: tests here never run in parallel.
package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/edge-coalesce/caddy-coalesce/caddymodule"
)

// Ports of the in-process Caddy: admin 2999, HTTP 9080, HTTPS 9443, or,
// with COALESCE_TEST_PORT_BASE=N, N, N+1 and N+2, so that two checkouts can
// run the suite on one machine at once.
var (
	adminPort, httpPort, httpsPort = testPorts()

	baseURL  = fmt.Sprintf("http://localhost:%d", httpPort)
	adminURL = fmt.Sprintf("http://localhost:%d", adminPort)
)

func testPorts() (admin, http, https int) {
	base, err := strconv.Atoi(os.Getenv("COALESCE_TEST_PORT_BASE"))
	if err != nil || base <= 0 || base > 65000 {
		return 2999, 9080, 9443
	}
	caddytest.Default.AdminPort = base
	return base, base + 1, base + 2
}

// globalOptions is the global block every in-process config starts with.
var globalOptions = fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port %d
	grace_period 1ns
	skip_install_trust
}
`, adminPort, httpPort, httpsPort)

// upstream is a real HTTP server on 127.0.0.1 that counts its requests.
type upstream struct {
	t        *testing.T
	srv      *http.Server
	addr     string
	calls    atomic.Int64
	mu       sync.Mutex
	perPath  map[string]int
	inflight atomic.Int64
}

// newUpstream starts handler on a free 127.0.0.1 port; it stops with the test.
func newUpstream(t *testing.T, handler http.HandlerFunc) *upstream {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{t: t, addr: ln.Addr().String(), perPath: map[string]int{}}
	u.srv = &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u.calls.Add(1)
		u.inflight.Add(1)
		defer u.inflight.Add(-1)
		u.mu.Lock()
		u.perPath[r.URL.Path]++
		u.mu.Unlock()
		handler(w, r)
	})}
	go func() { _ = u.srv.Serve(ln) }()
	t.Cleanup(func() { _ = u.srv.Close() })
	return u
}

// Calls is how many requests reached the upstream.
func (u *upstream) Calls() int64 { return u.calls.Load() }

// PathCalls is how many requests for path reached the upstream.
func (u *upstream) PathCalls(path string) int {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.perPath[path]
}

// startCaddy loads site (the part after the global options) into the
// in-process Caddy. Placeholders {up} are replaced by upstream addresses in
// order.
func startCaddy(t *testing.T, site string, ups ...*upstream) *caddytest.Tester {
	t.Helper()
	return loadFirst(t, globalOptions+withUpstreams(site, ups), "caddyfile")
}

// loadFirst loads config (JSON, or the adapter format's) as a test's first
// config, once the previous test's server has let go of the ports.
func loadFirst(t *testing.T, config, format string) *caddytest.Tester {
	t.Helper()
	quiesce(t)
	tester := caddytest.NewTester(t)
	tester.InitServer(config, format)
	return tester
}

// quiesce unloads the previous test's config and waits until nothing
// listens on the HTTP and HTTPS ports. A load returns once the old
// servers' shutdown has started, not finished: for a moment the old server
// and the new one both accept on the listener they share, and a
// connection the old one takes is closed unanswered (a test's first
// request would get EOF). With no server left, the old listener is closed
// once a dial is refused, and the next config listens afresh.
func quiesce(t *testing.T) {
	t.Helper()
	empty := fmt.Sprintf(`{"admin": {"listen": "localhost:%d"}}`, adminPort)
	resp, err := http.Post(fmt.Sprintf("http://127.0.0.1:%d/load", adminPort), "application/json", strings.NewReader(empty))
	if err != nil {
		return // no Caddy in this process yet
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("unloading the previous config: %d %s", resp.StatusCode, body)
	}
	for _, port := range []int{httpPort, httpsPort} {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if !waitFor(20*time.Second, func() bool {
			conn, err := net.DialTimeout("tcp4", addr, time.Second)
			if err != nil {
				return true
			}
			conn.Close()
			return false
		}) {
			t.Fatalf("the previous config's server still listens on %s", addr)
		}
	}
}

// reloadCaddy loads a new site into the running Caddy through the admin
// API, as `caddy reload` does ({up} placeholders as in startCaddy), and
// returns how long the reload took. The bound is generous: a reload under
// load waits for the old servers to let go.
func reloadCaddy(t *testing.T, site string, ups ...*upstream) time.Duration {
	t.Helper()
	start := time.Now()
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/load", adminPort), strings.NewReader(globalOptions+withUpstreams(site, ups)))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("reload: %d %s", resp.StatusCode, body)
	}
	return time.Since(start)
}

// withUpstreams replaces site's {up} placeholders by the addresses of ups,
// in order.
func withUpstreams(site string, ups []*upstream) string {
	for _, u := range ups {
		site = strings.Replace(site, "{up}", u.addr, 1)
	}
	return site
}

// adminJSON sends a request to the admin endpoint and decodes the JSON
// answer into out (when out is not nil); it returns the status.
func adminJSON(t testing.TB, client *http.Client, method, path, body string, out any) int {
	t.Helper()
	req, err := http.NewRequest(method, adminURL+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: status %d, body %q is not the JSON expected: %v", method, path, resp.StatusCode, raw, err)
		}
	}
	return resp.StatusCode
}

// fetched is what a client saw.
type fetched struct {
	status int
	header http.Header
	body   string
	err    error
	took   time.Duration
}

// get sends one request with extra headers ("Name: value" pairs).
func get(client *http.Client, method, url string, headers ...string) fetched {
	return getCtx(context.Background(), client, method, url, headers...)
}

// getCtx is get with a context (a client that gives up or disconnects).
func getCtx(ctx context.Context, client *http.Client, method, url string, headers ...string) fetched {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return fetched{err: err}
	}
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	start := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return fetched{err: err, took: time.Since(start)}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return fetched{status: resp.StatusCode, header: resp.Header, body: string(b), err: err, took: time.Since(start)}
}

// herd sends n identical requests at once (released together by a barrier)
// and returns what each client saw, in arrival order of the goroutines.
func herd(client *http.Client, n int, method, url string, headers ...string) []fetched {
	return together(n, func(int) fetched { return get(client, method, url, headers...) })
}

// together runs n clients at once (released together by a barrier) and
// returns what each saw, by index. Use it for herds whose clients differ
// (identities, languages, ranges).
func together(n int, client func(i int) fetched) []fetched {
	out := make([]fetched, n)
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		ready.Add(1)
		done.Add(1)
		go func() {
			defer done.Done()
			ready.Done()
			<-start
			out[i] = client(i)
		}()
	}
	ready.Wait()
	close(start)
	done.Wait()
	return out
}

// newClient returns the client for herds: up to 200 connections per host
// kept open between requests (the default keeps 2 idle, so a herd would
// redial), every dial to 127.0.0.1, no cookie jar (Set-Cookie must not leak
// from one request into the next), no transparent gzip (the Accept-Encoding
// class is part of the key, and Go adds gzip to GET but not to HEAD), and a
// bound on every request. Its idle connections are closed when the test
// ends.
func newClient(t testing.TB) *http.Client {
	t.Helper()
	dialer := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			_, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			return dialer.DialContext(ctx, "tcp4", net.JoinHostPort("127.0.0.1", port))
		},
		MaxIdleConns:        400,
		MaxIdleConnsPerHost: 200,
		MaxConnsPerHost:     200,
		IdleConnTimeout:     30 * time.Second,
		DisableCompression:  true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 30 * time.Second}
}

// warm opens n connections to the in-process Caddy (a herd on /warm, which
// every site built by site answers itself), so that a herd that follows
// does not spend its first milliseconds dialling.
func warm(t testing.TB, client *http.Client, n int) {
	t.Helper()
	for i, f := range herd(client, n, "GET", baseURL+"/warm") {
		if f.err != nil || f.status != http.StatusOK {
			t.Fatalf("warm-up request %d: status %d, err %v", i, f.status, f.err)
		}
	}
}

// site is a Caddyfile site on the harness's port: /warm answered by Caddy
// itself, everything else through `coalesce <options>` to reverse_proxy
// {up}. options is the block's content ("" for a bare `coalesce`).
func site(options string) string {
	directive := "coalesce"
	if strings.TrimSpace(options) != "" {
		directive = "coalesce {\n" + options + "\n\t}"
	}
	return fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	%s
	reverse_proxy {up}
}
`, httpPort, directive)
}

// pathFor is a URL path of this test's own, so that the micro-cache and the
// hit-for-miss marks, which a reload of the same settings keeps, never
// carry one test's answers into another.
func pathFor(t testing.TB, suffix string) string {
	return "/" + strings.NewReplacer("/", "_", " ", "_").Replace(t.Name()) + suffix
}

// cacheStatus is a response's Cache-Status members, joined.
func (f fetched) cacheStatus() string { return strings.Join(f.header.Values("Cache-Status"), ", ") }

// expectAll fails t for every client that did not get status and body.
func expectAll(t testing.TB, got []fetched, status int, body string) {
	t.Helper()
	bad := 0
	for i, f := range got {
		if f.err != nil || f.status != status || f.body != body {
			if bad++; bad <= 5 {
				t.Errorf("client %d: got %d %q (err %v), want %d %q", i, f.status, clip(f.body), f.err, status, clip(body))
			}
		}
	}
	if bad > 5 {
		t.Errorf("... %d clients in all got something else", bad)
	}
}

// clip shortens a body for a failure message.
func clip(s string) string {
	if len(s) > 80 {
		return s[:80] + fmt.Sprintf("...(%d bytes)", len(s))
	}
	return s
}

// freePort returns a 127.0.0.1 port nobody listens on now.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	return port
}

// followersWaiting is how many followers wait now in flights for path, as
// the admin API (/coalesce/inflight) reports them. Tests wait for it before
// they act on a herd (cancel its leader, reload) instead of sleeping.
func followersWaiting(t testing.TB, client *http.Client, path string) int {
	t.Helper()
	n, _, err := flightsFor(client, path)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// flightClients is how many clients the flights for path answer now: their
// followers, and each leader's client until it goes away, as the admin API
// reports them. A test that cancels a leader's client waits for it to drop.
func flightClients(t testing.TB, client *http.Client, path string) int {
	t.Helper()
	_, n, err := flightsFor(client, path)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// flightsFor sums the waiters and the clients of the flights for path, as
// /coalesce/inflight lists them. It returns what went wrong instead of
// failing a test, for goroutines other than the test's.
func flightsFor(client *http.Client, path string) (waiters, clients int, err error) {
	return flightsAt(client, adminURL, path)
}

// flightsAt is flightsFor on the Caddy whose admin endpoint is admin.
func flightsAt(client *http.Client, admin, path string) (waiters, clients int, err error) {
	resp, err := client.Get(admin + "/coalesce/inflight?limit=1000")
	if err != nil {
		return 0, 0, fmt.Errorf("GET /coalesce/inflight: %v", err)
	}
	defer resp.Body.Close()
	var inflight struct {
		Flights []struct {
			Path    string `json:"path"`
			Waiters int    `json:"waiters"`
			Clients int    `json:"clients"`
		} `json:"flights"`
	}
	if resp.StatusCode != http.StatusOK {
		return 0, 0, fmt.Errorf("GET /coalesce/inflight: status %d", resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&inflight); err != nil {
		return 0, 0, fmt.Errorf("GET /coalesce/inflight: %v", err)
	}
	for _, f := range inflight.Flights {
		if f.Path == path {
			waiters += f.Waiters
			clients += f.Clients
		}
	}
	return waiters, clients, nil
}

// gatherBound is how long a herdGate holds a herd's requests for the rest
// of the herd to arrive. A herd that collapses gathers in milliseconds; the
// bound only ends a test whose herd never gathers.
const gatherBound = 10 * time.Second

// herdGate holds an upstream's requests for a path until the whole herd of
// clients for that path is waiting: each one either a follower registered in
// a flight (as /coalesce/inflight reports it) or a request held here. Then
// it lets them all go, and from then on holds nothing for that path. Tests
// use it so that a herd is whole before its leader is answered, instead of
// hoping that an upstream delay is long enough for it to arrive. A herd
// that does not gather within gatherBound fails the test.
type herdGate struct {
	t        *testing.T
	size     int
	admin    *http.Client
	adminURL string // the admin endpoint of the Caddy the herd goes through
	stop     chan struct{}
	wg       sync.WaitGroup

	mu    sync.Mutex
	paths map[string]*gathering
}

// gathering is one path's herd.
type gathering struct {
	held int           // requests held at the upstream now
	open chan struct{} // closed when the herd is whole
}

// newHerdGate returns a gate for herds of size clients per path through
// the in-process Caddy.
func newHerdGate(t *testing.T, size int) *herdGate {
	return newHerdGateAt(t, size, adminURL)
}

// newHerdGateAt is newHerdGate for herds through the Caddy whose admin
// endpoint is admin (a process the test started).
func newHerdGateAt(t *testing.T, size int, admin string) *herdGate {
	g := &herdGate{t: t, size: size, admin: newClient(t), adminURL: admin, stop: make(chan struct{}), paths: map[string]*gathering{}}
	t.Cleanup(func() {
		close(g.stop)
		g.wg.Wait()
	})
	return g
}

// wrap holds each request to handler at the gate.
func (g *herdGate) wrap(handler http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if g.hold(r.Context(), r.URL.Path) {
			handler(w, r)
		}
	}
}

// hold waits until the herd for path is whole (true), or until ctx ends or
// the test does (false).
func (g *herdGate) hold(ctx context.Context, path string) bool {
	g.mu.Lock()
	p, ok := g.paths[path]
	if !ok {
		p = &gathering{open: make(chan struct{})}
		g.paths[path] = p
		g.wg.Add(1)
		go g.watch(path, p)
	}
	p.held++
	g.mu.Unlock()
	defer func() {
		g.mu.Lock()
		p.held--
		g.mu.Unlock()
	}()
	select {
	case <-p.open:
		return true
	case <-ctx.Done():
	case <-g.stop:
	}
	return false
}

// watch opens path's gate once the herd is whole, or at gatherBound with
// an error.
func (g *herdGate) watch(path string, p *gathering) {
	defer g.wg.Done()
	defer close(p.open)
	deadline := time.Now().Add(gatherBound)
	for {
		followers, _, err := flightsAt(g.admin, g.adminURL, path)
		g.mu.Lock()
		held := p.held
		g.mu.Unlock()
		switch {
		case err != nil:
			g.t.Errorf("herd for %s: %v", path, err)
			return
		case followers+held >= g.size:
			return
		case time.Now().After(deadline):
			g.t.Errorf("herd for %s did not gather within %s: %d followers waiting and %d requests at the upstream, want %d clients in all", path, gatherBound, followers, held, g.size)
			return
		}
		select {
		case <-g.stop:
			return
		case <-time.After(2 * time.Millisecond):
		}
	}
}
