// Package tests drives caddy-coalesce the way users run it: a real Caddy
// (caddytest, in process) in front of real upstream servers on 127.0.0.1,
// and the binary built by xcaddy.sh end to end. One in-process Caddy per
// test binary: tests here never run in parallel.
package tests

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddytest"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/edge-coalesce/caddy-coalesce/caddymodule"
)

// Ports of the in-process Caddy.
const (
	httpPort  = 9080
	adminPort = 2999
	baseURL   = "http://localhost:9080"
)

// globalOptions is the global block every in-process config starts with.
var globalOptions = fmt.Sprintf(`{
	admin localhost:%d
	http_port %d
	https_port 9443
	grace_period 1ns
	skip_install_trust
}
`, adminPort, httpPort)

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
	for _, u := range ups {
		site = strings.Replace(site, "{up}", u.addr, 1)
	}
	tester := caddytest.NewTester(t)
	tester.InitServer(globalOptions+site, "caddyfile")
	return tester
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
	req, err := http.NewRequest(method, url, nil)
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
			out[i] = get(client, method, url, headers...)
		}()
	}
	ready.Wait()
	close(start)
	done.Wait()
	return out
}
