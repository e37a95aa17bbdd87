package coalesce

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// eventOrigin answers every request with an event stream of one event per
// value sent on events, and counts its requests and the Last-Event-IDs and
// Accept-Encodings they carried.
type eventOrigin struct {
	calls    atomic.Int64
	mu       sync.Mutex
	lastIDs  []string
	encoding []string
	events   chan string
	status   int // answer this instead, when not 0
	release  chan struct{}
}

func (o *eventOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	o.calls.Add(1)
	o.mu.Lock()
	o.lastIDs = append(o.lastIDs, r.Header.Get("Last-Event-ID"))
	o.encoding = append(o.encoding, r.Header.Get("Accept-Encoding"))
	o.mu.Unlock()
	if o.release != nil {
		select {
		case <-o.release:
		case <-r.Context().Done():
			return
		}
	}
	if o.status != 0 {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(o.status)
		_, _ = io.WriteString(w, `{"error":"nope"}`)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	http.NewResponseController(w).Flush()
	for {
		select {
		case v := <-o.events:
			_, _ = io.WriteString(w, "id: "+v+"\ndata: "+v+"\n\n")
			http.NewResponseController(w).Flush()
		case <-r.Context().Done():
			return
		}
	}
}

func sseEngine(t *testing.T) *Engine {
	return newEngine(t, func(c *Config) { c.SSE = &SSEConfig{Linger: Off, Heartbeat: Off} })
}

func openStream(t *testing.T, url string, headers ...string) (*http.Response, *bufio.Scanner) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
	req.Header.Set("Accept", "text/event-stream")
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Set(k, strings.TrimSpace(v))
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		resp.Body.Close()
	})
	return resp, bufio.NewScanner(resp.Body)
}

// nextData returns the next data line.
func nextData(t *testing.T, sc *bufio.Scanner) string {
	t.Helper()
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			return v
		}
	}
	t.Fatalf("stream ended: %v", sc.Err())
	return ""
}

func waitSubscribers(t *testing.T, e *Engine, n int64) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for e.Stats().Streams.Subscribers != n {
		if time.Now().After(deadline) {
			t.Fatalf("subscribers: %d, want %d", e.Stats().Streams.Subscribers, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestEventStreamSubscribersShareOneUpstreamRequest(t *testing.T) {
	origin := &eventOrigin{events: make(chan string)}
	e := sseEngine(t)
	srv := newServer(t, e.Handler(origin))
	first, a := openStream(t, srv.URL+"/s", "Accept-Encoding: gzip")
	second, b := openStream(t, srv.URL+"/s", "Accept-Encoding: gzip")
	waitSubscribers(t, e, 2)
	origin.events <- "1"
	if got := nextData(t, a) + nextData(t, b); got != "11" {
		t.Fatalf("events: %q", got)
	}
	if got := origin.calls.Load(); got != 1 {
		t.Errorf("upstream requests: %d, want 1", got)
	}
	if cs := first.Header.Get("Cache-Status"); cs != "caddy-coalesce; fwd=uri-miss; fwd-status=200; detail=event-stream" {
		t.Errorf("first subscriber's Cache-Status: %q", cs)
	}
	if cs := second.Header.Get("Cache-Status"); cs != "caddy-coalesce; fwd=uri-miss; fwd-status=200; collapsed; detail=event-stream" {
		t.Errorf("second subscriber's Cache-Status: %q", cs)
	}
	if enc := origin.encoding[0]; enc != "identity" {
		t.Errorf("the stream's upstream request asked for Accept-Encoding %q; events are cut from an uncompressed body", enc)
	}
	if got := e.Stats().Registry.ActiveKeys; got != 0 {
		t.Errorf("a stream is not a flight of the registry: %d active keys", got)
	}
}

func TestEventStreamAnswerThatIsNotAStreamIsSharedAsAnyResponse(t *testing.T) {
	origin := &eventOrigin{status: http.StatusNotFound, release: make(chan struct{})}
	e := sseEngine(t)
	srv := newServer(t, e.Handler(origin))
	var wg sync.WaitGroup
	got := make([]*http.Response, 3)
	bodies := make([]string, 3)
	for i := range got {
		wg.Go(func() {
			req, _ := http.NewRequest("GET", srv.URL+"/missing", nil)
			req.Header.Set("Accept", "text/event-stream")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			got[i], bodies[i] = resp, string(b)
		})
	}
	waitSubscribers(t, e, 3)
	close(origin.release)
	wg.Wait()
	collapsed := 0
	for i, resp := range got {
		if resp == nil || resp.StatusCode != http.StatusNotFound || bodies[i] != `{"error":"nope"}` {
			t.Fatalf("subscriber %d: %v %q, want the upstream's 404", i, resp, bodies[i])
		}
		if strings.Contains(resp.Header.Get("Cache-Status"), "collapsed") {
			collapsed++
		}
	}
	if collapsed != 2 {
		t.Errorf("collapsed answers: %d, want 2", collapsed)
	}
	if got := origin.calls.Load(); got != 1 {
		t.Errorf("upstream requests: %d, want 1", got)
	}
}

func TestEventStreamWithSSEOffPassesThrough(t *testing.T) {
	origin := &eventOrigin{events: make(chan string)}
	e := newEngine(t, nil)
	srv := newServer(t, e.Handler(origin))
	resp, _ := openStream(t, srv.URL+"/s")
	openStream(t, srv.URL+"/s")
	if cs := resp.Header.Get("Cache-Status"); cs != "caddy-coalesce; fwd=bypass; detail=event-stream" {
		t.Errorf("Cache-Status without sse: %q", cs)
	}
	if got := origin.calls.Load(); got != 2 {
		t.Errorf("upstream requests without sse: %d, want 2", got)
	}
}

// A subscriber that asks for no-store is passed through with a stream of
// its own, as any request that asks for it.
func TestEventStreamRequestNoStoreHasAStreamOfItsOwn(t *testing.T) {
	origin := &eventOrigin{events: make(chan string)}
	e := sseEngine(t)
	srv := newServer(t, e.Handler(origin))
	first, _ := openStream(t, srv.URL+"/s", "Cache-Control: no-store")
	second, _ := openStream(t, srv.URL+"/s", "Cache-Control: no-store")
	for i, resp := range []*http.Response{first, second} {
		if cs := resp.Header.Get("Cache-Status"); cs != "caddy-coalesce; fwd=request; detail=no-store" {
			t.Errorf("subscriber %d: Cache-Status %q", i, cs)
		}
	}
	if got := origin.calls.Load(); got != 2 {
		t.Errorf("upstream requests: %d, want 2, one per no-store subscriber", got)
	}
	if got := e.Stats().Streams.Subscribers; got != 0 {
		t.Errorf("fanned-out subscribers: %d, want 0", got)
	}
}

func TestEventStreamBreakerOpenAnswers503(t *testing.T) {
	var calls atomic.Int64
	failing := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.WriteHeader(http.StatusBadGateway)
	})
	e := newEngine(t, func(c *Config) {
		c.SSE = &SSEConfig{Linger: Off}
		c.Breaker.Failures = 1
	})
	srv := newServer(t, e.Handler(failing))
	for i, want := range []int{http.StatusBadGateway, http.StatusServiceUnavailable} {
		resp, _ := openStream(t, srv.URL+"/s")
		if resp.StatusCode != want {
			t.Fatalf("request %d: %d, want %d", i, resp.StatusCode, want)
		}
		if want == http.StatusServiceUnavailable && resp.Header.Get("Retry-After") == "" {
			t.Error("503 for an open breaker without Retry-After")
		}
	}
	if got := calls.Load(); got != 1 {
		t.Errorf("upstream requests: %d, want 1 (the breaker answers the second)", got)
	}
}

func TestEventStreamUpstreamWithoutHeadersIsCutByTheBreakerTimeout(t *testing.T) {
	hung := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answers
	})
	e := newEngine(t, func(c *Config) {
		c.SSE = &SSEConfig{Linger: Off}
		c.Breaker.Timeout = 200 * time.Millisecond
		c.MaxWait = 10 * time.Second
	})
	srv := newServer(t, e.Handler(hung))
	start := time.Now()
	resp, _ := openStream(t, srv.URL+"/s")
	if resp.StatusCode != http.StatusGatewayTimeout {
		t.Fatalf("status %d, want 504 from the breaker's timeout", resp.StatusCode)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("the cut took %s", took)
	}
	if cs := resp.Header.Get("Cache-Status"); !strings.Contains(cs, `detail="upstream-timeout"`) {
		t.Errorf("Cache-Status %q, want the cut's detail", cs)
	}
}
