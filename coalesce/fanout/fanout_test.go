package fanout

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// bound is how long a test waits for something that should be prompt.
const bound = 5 * time.Second

// origin is an upstream event stream: events "id: n / data: n", numbered
// from 1, that every connection receives; a request with Last-Event-ID
// gets the events after it first. It counts its connections.
type origin struct {
	srv      *httptest.Server
	mu       sync.Mutex
	events   [][]byte
	wake     chan struct{} // closed and replaced on every event
	kill     chan struct{} // closed and replaced by Kill
	lastIDs  []string
	open     atomic.Int64
	total    atomic.Int64
	status   int    // answer with this instead of a stream, when not 0
	prologue string // written at the start of every connection
	size     int    // pad each event's data to about this size
}

func newOrigin(t *testing.T) *origin {
	o := &origin{wake: make(chan struct{}), kill: make(chan struct{}), prologue: "retry: 20\n\n"}
	o.srv = httptest.NewServer(http.HandlerFunc(o.serve))
	t.Cleanup(o.srv.Close)
	return o
}

func (o *origin) serve(w http.ResponseWriter, r *http.Request) {
	o.total.Add(1)
	o.open.Add(1)
	defer o.open.Add(-1)
	o.mu.Lock()
	o.lastIDs = append(o.lastIDs, r.Header.Get("Last-Event-ID"))
	status, kill := o.status, o.kill
	o.mu.Unlock()
	if status != 0 {
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(status)
		fmt.Fprintf(w, "status %d", status)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Origin", "yes")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, o.prologue)
	next := 0
	if id, err := strconv.Atoi(r.Header.Get("Last-Event-ID")); err == nil {
		next = id
	} else {
		o.mu.Lock()
		next = len(o.events)
		o.mu.Unlock()
	}
	rc := http.NewResponseController(w)
	for {
		o.mu.Lock()
		pending := o.events[min(next, len(o.events)):]
		wake := o.wake
		o.mu.Unlock()
		for _, ev := range pending {
			if _, err := w.Write(ev); err != nil {
				return
			}
			next++
		}
		_ = rc.Flush()
		select {
		case <-wake:
		case <-kill:
			return
		case <-r.Context().Done():
			return
		}
	}
}

// publish adds events up to n.
func (o *origin) publish(n int) {
	o.mu.Lock()
	for len(o.events) < n {
		id := len(o.events) + 1
		pad := ""
		if o.size > 0 {
			pad = " " + strings.Repeat("x", o.size)
		}
		o.events = append(o.events, fmt.Appendf(nil, "id: %d\ndata: %d%s\n\n", id, id, pad))
	}
	close(o.wake)
	o.wake = make(chan struct{})
	o.mu.Unlock()
}

// killAll ends every connection open now, as an upstream restart does.
func (o *origin) killAll() {
	o.mu.Lock()
	close(o.kill)
	o.kill = make(chan struct{})
	o.mu.Unlock()
}

func (o *origin) ids() []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]string(nil), o.lastIDs...)
}

// openOrigin is an Open that proxies the origin, as reverse_proxy would.
func openOrigin(o *origin) Open {
	return func(ctx context.Context, lastEventID string, w http.ResponseWriter) error {
		req, _ := http.NewRequestWithContext(ctx, "GET", o.srv.URL+"/events", nil)
		if lastEventID != "" {
			req.Header.Set("Last-Event-ID", lastEventID)
		}
		resp, err := o.srv.Client().Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		buf := make([]byte, 4096)
		for {
			n, err := resp.Body.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return werr
				}
			}
			if err == io.EOF {
				return nil
			}
			if err != nil {
				return err
			}
		}
	}
}

// counts is a Tally for tests.
type counts struct {
	events, hits, misses, reconnects atomic.Int64
	fanouts, negative                atomic.Int64
	mu                               sync.Mutex
	drops                            map[Reason]int
}

func (c *counts) Event() { c.events.Add(1) }
func (c *counts) Replay(hit bool) {
	if hit {
		c.hits.Add(1)
	} else {
		c.misses.Add(1)
	}
}
func (c *counts) Drop(r Reason) {
	c.mu.Lock()
	if c.drops == nil {
		c.drops = map[Reason]int{}
	}
	c.drops[r]++
	c.mu.Unlock()
}
func (c *counts) Reconnect() { c.reconnects.Add(1) }
func (c *counts) FanOut(d time.Duration) {
	c.fanouts.Add(1)
	if d < 0 {
		c.negative.Add(1)
	}
}
func (c *counts) dropped(r Reason) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.drops[r]
}

// edge serves subscribers of one hub over HTTP, as the coalesce engine does.
type edge struct {
	hub   *Hub
	owner atomic.Pointer[Owner]
	tally *counts
	srv   *httptest.Server
	open  Open
}

func testConfig() Config {
	return Config{Replay: 16, Buffer: 64, Linger: 50 * time.Millisecond, MaxSubscribers: 1000, MaxEvent: 1 << 20, HeaderWait: bound}
}

func newEdge(t *testing.T, cfg Config, o *origin) *edge {
	return newEdgeTLS(t, cfg, o, false)
}

// newEdgeTLS is newEdge over HTTPS (HTTP/1.1) when tls is set.
func newEdgeTLS(t *testing.T, cfg Config, o *origin, tls bool) *edge {
	e := &edge{hub: NewHub(cfg), tally: &counts{}, open: openOrigin(o)}
	e.owner.Store(e.hub.NewOwner(e.tally))
	e.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sub := e.hub.Join(r.Context(), e.owner.Load(), "key", r.URL.Path, r.Header.Get("Last-Event-ID"), e.open)
		switch sub.Outcome {
		case Started, Joined:
			for k, v := range sub.Header {
				w.Header()[k] = v
			}
			w.Header().Set("X-Outcome", strconv.Itoa(int(sub.Outcome)))
			_ = sub.Serve(w, r)
		case Answered:
			w.WriteHeader(sub.Answer.Status)
			_, _ = w.Write(sub.Answer.Body)
		case ReplayMiss:
			w.WriteHeader(http.StatusConflict)
		case Closed:
			w.WriteHeader(http.StatusServiceUnavailable)
		default:
			w.WriteHeader(http.StatusBadGateway)
		}
	}))
	if tls {
		e.srv.StartTLS()
	} else {
		e.srv.Start()
	}
	t.Cleanup(func() {
		e.srv.Close()
		e.hub.Close()
	})
	return e
}

// client is one subscriber's connection: it reads events and hands over
// their data lines.
type client struct {
	resp   *http.Response
	cancel context.CancelFunc
	data   chan string
	done   chan struct{}
	err    error // how the body ended (nil: cleanly), once done is closed
}

func subscribe(t *testing.T, e *edge, lastEventID string) *client {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", e.srv.URL+"/events", nil)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := e.srv.Client().Do(req)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	c := &client{resp: resp, cancel: cancel, data: make(chan string, 10000), done: make(chan struct{})}
	go func() {
		defer close(c.done)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				v, _, _ = strings.Cut(v, " ")
				c.data <- v
			}
		}
		c.err = sc.Err()
	}()
	t.Cleanup(func() {
		cancel()
		resp.Body.Close()
		<-c.done
	})
	return c
}

// expect reads the next events' data and compares them with from..to.
func (c *client) expect(t *testing.T, from, to int) {
	t.Helper()
	for want := from; want <= to; want++ {
		select {
		case got := <-c.data:
			if got != strconv.Itoa(want) {
				t.Fatalf("got event %s, want %d", got, want)
			}
		case <-c.done:
			t.Fatalf("stream ended before event %d", want)
		case <-time.After(bound):
			t.Fatalf("no event %d within %s", want, bound)
		}
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestManySubscribersShareOneUpstreamRequest(t *testing.T) {
	o := newOrigin(t)
	e := newEdge(t, testConfig(), o)
	const n = 50
	clients := make([]*client, n)
	for i := range clients {
		clients[i] = subscribe(t, e, "")
	}
	waitFor(t, "subscribers", func() bool { return e.hub.Stats().Subscribers == n })
	o.publish(30)
	for _, c := range clients {
		c.expect(t, 1, 30)
	}
	if got := o.total.Load(); got != 1 {
		t.Errorf("upstream requests: %d, want 1", got)
	}
	if got := clients[0].resp.Header.Get("X-Origin"); got != "yes" {
		t.Errorf("the upstream's header did not reach the subscriber: %q", got)
	}
	// The fan-out tallies an event after it has reached the subscribers:
	// wait for the last tally before checking the counts.
	waitFor(t, "the last fan-out's tally", func() bool { return e.tally.fanouts.Load() >= 31 })
	if got := e.tally.events.Load(); got != 31 {
		t.Errorf("events tallied: %d, want 31 (the retry: block and 30 events)", got)
	}
	if got, neg := e.tally.fanouts.Load(), e.tally.negative.Load(); got != 31 || neg != 0 {
		t.Errorf("fan-outs timed: %d (%d negative), want 31, one per event", got, neg)
	}
}

func TestReplayFromTheRingAndMissOutsideIt(t *testing.T) {
	o := newOrigin(t)
	cfg := testConfig()
	cfg.Replay = 4
	e := newEdge(t, cfg, o)
	first := subscribe(t, e, "")
	waitFor(t, "subscriber", func() bool { return e.hub.Stats().Subscribers == 1 })
	o.publish(6)
	first.expect(t, 1, 6)

	// In the ring (events 3..6 are kept): 4, 5, 6 replayed, then live.
	back := subscribe(t, e, "3")
	back.expect(t, 4, 6)
	o.publish(7)
	back.expect(t, 7, 7)
	first.expect(t, 7, 7)

	// Up to date: nothing replayed.
	current := subscribe(t, e, "7")
	o.publish(8)
	current.expect(t, 8, 8)

	// Pushed out of the ring: the subscriber is sent its own way.
	resp, err := e.srv.Client().Do(func() *http.Request {
		r, _ := http.NewRequest("GET", e.srv.URL+"/events", nil)
		r.Header.Set("Last-Event-ID", "2")
		return r
	}())
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusConflict {
		t.Errorf("Last-Event-ID outside the ring: status %d, want the miss (409 here)", resp.StatusCode)
	}
	if h, m := e.tally.hits.Load(), e.tally.misses.Load(); h != 2 || m != 1 {
		t.Errorf("replays: %d hits, %d misses; want 2, 1", h, m)
	}
	if got := o.total.Load(); got != 1 {
		t.Errorf("upstream requests: %d, want 1", got)
	}
}

func TestSlowSubscriberIsDroppedOthersKeepUp(t *testing.T) {
	o := newOrigin(t)
	o.size = 32 << 10
	cfg := testConfig()
	cfg.Buffer = 4
	e := newEdge(t, cfg, o)
	fast := subscribe(t, e, "")

	// A client that sends its request and never reads.
	addr := strings.TrimPrefix(e.srv.URL, "http://")
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetReadBuffer(4096)
	}
	fmt.Fprintf(conn, "GET /events HTTP/1.1\r\nHost: %s\r\n\r\n", addr)
	waitFor(t, "subscribers", func() bool { return e.hub.Stats().Subscribers == 2 })

	for n := 1; n <= 400; n++ {
		o.publish(n)
		fast.expect(t, n, n)
		if e.tally.dropped(ReasonSlow) == 1 {
			break
		}
	}
	waitFor(t, "the stalled subscriber to be dropped", func() bool {
		return e.tally.dropped(ReasonSlow) == 1 && e.hub.Stats().Subscribers == 1
	})
	// The reading subscriber missed nothing and goes on.
	for {
		select {
		case got := <-fast.data:
			t.Fatalf("unexpected event %s", got)
		default:
		}
		break
	}
	last, _ := strconv.Atoi(func() string { o.mu.Lock(); defer o.mu.Unlock(); return strconv.Itoa(len(o.events)) }())
	for n := last + 1; n <= last+5; n++ {
		o.publish(n)
		fast.expect(t, n, n)
	}
	if got := e.tally.dropped(ReasonSlow); got != 1 {
		t.Errorf("slow drops: %d, want 1", got)
	}
}

// Over TLS a connection takes no write that cannot block, so every event
// goes out through a drain: the subscribers still get every event in order,
// and a close still ends each response cleanly.
func TestSubscribersOverTLSGetEveryEventAndACleanEnd(t *testing.T) {
	o := newOrigin(t)
	e := newEdgeTLS(t, testConfig(), o, true)
	clients := make([]*client, 5)
	for i := range clients {
		clients[i] = subscribe(t, e, "")
	}
	waitFor(t, "subscribers", func() bool { return e.hub.Stats().Subscribers == int64(len(clients)) })
	o.publish(30)
	for _, c := range clients {
		c.expect(t, 1, 30)
	}
	e.owner.Load().Close()
	for i, c := range clients {
		select {
		case <-c.done:
		case <-time.After(bound):
			t.Fatalf("subscriber %d was not closed", i)
		}
		if c.err != nil {
			t.Errorf("subscriber %d's response ended with %v, want a clean end", i, c.err)
		}
	}
	if got := o.total.Load(); got != 1 {
		t.Errorf("upstream requests: %d, want 1", got)
	}
}

// A subscriber that reads more slowly than events arrive, but stays
// within Buffer events, receives every event in order and is not dropped:
// what its connection cannot take at once is written by a drain.
func TestSubscriberBehindCatchesUpWithoutLoss(t *testing.T) {
	o := newOrigin(t)
	o.size = 64 << 10 // 24 events: more than the socket buffers between them hold
	e := newEdge(t, testConfig(), o)
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(64 << 10)
		}
		return c, err
	}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(e.srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	waitFor(t, "subscriber", func() bool { return e.hub.Stats().Subscribers == 1 })
	const n = 24
	o.publish(n) // nothing is read meanwhile
	// Every event and the origin's prologue (its retry: is an event of its own).
	waitFor(t, "the stream to take every event", func() bool { return e.tally.events.Load() == n+1 })

	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for want := 1; want <= n; {
		if !sc.Scan() {
			t.Fatalf("stream ended before event %d: %v", want, sc.Err())
		}
		if v, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			if got, _, _ := strings.Cut(v, " "); got != strconv.Itoa(want) {
				t.Fatalf("got event %s, want %d", got, want)
			}
			want++
		}
	}
	if got := e.tally.dropped(ReasonSlow); got != 0 {
		t.Errorf("slow drops: %d, want 0", got)
	}
	if got := e.hub.Stats().Subscribers; got != 1 {
		t.Errorf("subscribers: %d, want 1", got)
	}
}

func TestUpstreamRestartReconnectsWithLastEventID(t *testing.T) {
	o := newOrigin(t)
	e := newEdge(t, testConfig(), o)
	a, b := subscribe(t, e, ""), subscribe(t, e, "")
	waitFor(t, "subscribers", func() bool { return e.hub.Stats().Subscribers == 2 })
	o.publish(3)
	a.expect(t, 1, 3)
	b.expect(t, 1, 3)

	o.killAll()
	waitFor(t, "the reconnect", func() bool { return o.total.Load() == 2 && o.open.Load() == 1 })
	o.publish(6)
	a.expect(t, 4, 6)
	b.expect(t, 4, 6)
	if ids := o.ids(); len(ids) != 2 || ids[0] != "" || ids[1] != "3" {
		t.Errorf("upstream Last-Event-IDs: %q, want [\"\" \"3\"]", ids)
	}
	if got := e.tally.reconnects.Load(); got != 1 {
		t.Errorf("reconnects: %d, want 1", got)
	}
	if got := e.hub.Stats().Subscribers; got != 2 {
		t.Errorf("subscribers after the reconnect: %d, want 2", got)
	}
}

func TestLastSubscriberLeavesUpstreamClosedAfterLinger(t *testing.T) {
	o := newOrigin(t)
	cfg := testConfig()
	cfg.Linger = 300 * time.Millisecond
	e := newEdge(t, cfg, o)
	c := subscribe(t, e, "")
	waitFor(t, "upstream", func() bool { return o.open.Load() == 1 })
	left := time.Now()
	c.cancel()
	waitFor(t, "subscriber gone", func() bool { return e.hub.Stats().Subscribers == 0 })
	// Back within the linger: the same upstream request.
	again := subscribe(t, e, "")
	o.publish(1)
	again.expect(t, 1, 1)
	if got := o.total.Load(); got != 1 {
		t.Fatalf("upstream requests after rejoining within linger: %d, want 1", got)
	}
	left = time.Now()
	again.cancel()
	waitFor(t, "upstream closed", func() bool { return o.open.Load() == 0 })
	if took := time.Since(left); took < cfg.Linger {
		t.Errorf("upstream closed %s after the last subscriber left, before the linger of %s", took, cfg.Linger)
	}
	if got := e.hub.Stats().Streams; got != 0 {
		t.Errorf("streams after linger: %d, want 0", got)
	}
}

func TestAnswerOtherThanAStreamReachesEveryWaiter(t *testing.T) {
	o := newOrigin(t)
	o.status = http.StatusNotFound
	e := newEdge(t, testConfig(), o)
	var wg sync.WaitGroup
	for range 5 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := e.srv.Client().Get(e.srv.URL + "/events")
			if err != nil {
				t.Error(err)
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 404 || string(body) != "status 404" {
				t.Errorf("got %d %q, want the upstream's 404", resp.StatusCode, body)
			}
		}()
	}
	wg.Wait()
	if got := e.hub.Stats(); got.Streams != 0 || got.Subscribers != 0 {
		t.Errorf("after the answer: %+v, want nothing left", got)
	}
}

func TestOwnerCloseHandsTheStreamOver(t *testing.T) {
	o := newOrigin(t)
	e := newEdge(t, testConfig(), o)
	old := subscribe(t, e, "")
	waitFor(t, "subscriber", func() bool { return e.hub.Stats().Subscribers == 1 })
	o.publish(4)
	old.expect(t, 1, 4)

	// A reload: the old configuration's owner closes.
	prev := e.owner.Load()
	e.owner.Store(e.hub.NewOwner(e.tally))
	prev.Close()
	select {
	case <-old.done:
	case <-time.After(bound):
		t.Fatal("the old owner's subscriber was not closed")
	}
	if old.err != nil {
		t.Errorf("the closed subscriber's response ended with %v; a close ends it cleanly (EventSource reconnects)", old.err)
	}
	waitFor(t, "the old upstream request to end", func() bool { return o.open.Load() == 0 })
	o.publish(6) // events during the reload

	// The client reconnects with its Last-Event-ID through the new owner.
	back := subscribe(t, e, "2")
	back.expect(t, 3, 6)
	if ids := o.ids(); len(ids) != 2 || ids[1] != "4" {
		t.Errorf("upstream Last-Event-IDs: %q; the new owner's request must carry 4", ids)
	}
	if got := e.tally.dropped(ReasonClosed); got != 1 {
		t.Errorf("closed subscribers: %d, want 1", got)
	}
}

func TestFullStreamSendsTheNextOneAlone(t *testing.T) {
	o := newOrigin(t)
	cfg := testConfig()
	cfg.MaxSubscribers = 2
	e := newEdge(t, cfg, o)
	subscribe(t, e, "")
	subscribe(t, e, "")
	waitFor(t, "subscribers", func() bool { return e.hub.Stats().Subscribers == 2 })
	resp, err := e.srv.Client().Get(e.srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway { // Full, in this edge
		t.Errorf("third subscriber: %d", resp.StatusCode)
	}
}

func TestHeartbeatAfterSilence(t *testing.T) {
	o := newOrigin(t)
	o.prologue = ""
	cfg := testConfig()
	cfg.Heartbeat = 50 * time.Millisecond
	e := newEdge(t, cfg, o)
	resp, err := e.srv.Client().Get(e.srv.URL + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 3)
	if _, err := io.ReadFull(resp.Body, buf); err != nil || string(buf) != ":\n\n" {
		t.Fatalf("read %q, %v; want a heartbeat comment", buf, err)
	}
}
