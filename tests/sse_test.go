package tests

import (
	"bufio"
	"compress/gzip"
	"context"
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
)

// eventSource is an upstream event stream: events "id: n", "data: n <unix
// ns of publishing>", numbered from 1, that every open connection receives;
// a request with Last-Event-ID gets the events after it first (the
// upstream's own history). Served by newUpstream, whose inflight counts its
// open connections.
type eventSource struct {
	mu      sync.Mutex
	events  [][]byte
	wake    chan struct{} // closed and replaced on every publish
	kill    chan struct{} // closed and replaced by killAll
	lastIDs []string
	pad     string
}

func newEventSource() *eventSource {
	return &eventSource{wake: make(chan struct{}), kill: make(chan struct{})}
}

func (s *eventSource) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.lastIDs = append(s.lastIDs, r.Header.Get("Last-Event-ID"))
	kill := s.kill
	next := len(s.events)
	s.mu.Unlock()
	if id, err := strconv.Atoi(r.Header.Get("Last-Event-ID")); err == nil {
		next = id
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	_, _ = io.WriteString(w, "retry: 50\n\n")
	rc := http.NewResponseController(w)
	for {
		s.mu.Lock()
		pending := s.events[min(next, len(s.events)):]
		wake := s.wake
		s.mu.Unlock()
		for _, ev := range pending {
			if _, err := w.Write(ev); err != nil {
				return
			}
			next++
		}
		if err := rc.Flush(); err != nil {
			return
		}
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
func (s *eventSource) publish(n int) {
	s.mu.Lock()
	for len(s.events) < n {
		id := len(s.events) + 1
		s.events = append(s.events, fmt.Appendf(nil, "id: %d\ndata: %d %d%s\n\n", id, id, time.Now().UnixNano(), s.pad))
	}
	close(s.wake)
	s.wake = make(chan struct{})
	s.mu.Unlock()
}

func (s *eventSource) published() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.events)
}

// killAll ends every open connection, as an upstream restart does.
func (s *eventSource) killAll() {
	s.mu.Lock()
	close(s.kill)
	s.kill = make(chan struct{})
	s.mu.Unlock()
}

func (s *eventSource) ids() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.lastIDs...)
}

// sseSite is a site whose route has encode (which once held event-stream
// headers back) before coalesce with `sse { options }`, with an access log
// (Caddy then wraps every response in a recorder that counts its bytes,
// also those of a connection it hands out).
func sseSite(options string) string {
	return fmt.Sprintf(`:%d {
	log {
		output discard
	}
	handle /warm {
		respond "warm" 200
	}
	encode
	coalesce {
		sse {
			%s
		}
	}
	reverse_proxy {up}
}
`, httpPort, options)
}

// sseClient returns a client without a connection limit, for many open
// streams at once.
func sseClient(t testing.TB) *http.Client {
	t.Helper()
	tr := &http.Transport{
		DialContext:        (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		MaxIdleConns:       2000,
		IdleConnTimeout:    30 * time.Second,
		DisableCompression: true,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// subscriber is one EventSource-like client: it reads events and checks
// that their ids follow each other.
type subscriber struct {
	resp   *http.Response
	cancel context.CancelFunc
	done   chan struct{}
	got    atomic.Int64 // the last event id received
	errs   atomic.Pointer[string]
	ids    chan int           // every event id, for tests that follow them
	lat    chan time.Duration // delivery latency of each event (publish → read)
	end    error              // how the body ended (nil: cleanly), once done is closed
}

// subscribe opens a stream to path with extra headers ("Name: value").
func subscribe(t testing.TB, client *http.Client, path string, headers ...string) *subscriber {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, "GET", baseURL+path, nil)
	req.Header.Set("Accept", "text/event-stream")
	req.Header.Set("Cache-Control", "no-cache")
	for _, h := range headers {
		k, v, _ := strings.Cut(h, ":")
		req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
	}
	resp, err := client.Do(req)
	if err != nil {
		cancel()
		t.Fatalf("subscribe %s: %v", path, err)
	}
	s := &subscriber{resp: resp, cancel: cancel, done: make(chan struct{}), ids: make(chan int, 4096), lat: make(chan time.Duration, 4096)}
	if last, err := strconv.Atoi(req.Header.Get("Last-Event-ID")); err == nil {
		s.got.Store(int64(last))
	}
	go s.read()
	t.Cleanup(func() {
		cancel()
		resp.Body.Close()
		<-s.done
	})
	return s
}

func (s *subscriber) fail(msg string) {
	if s.errs.Load() == nil {
		s.errs.Store(&msg)
	}
}

func (s *subscriber) read() {
	defer close(s.done)
	var body io.Reader = s.resp.Body
	if s.resp.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(body)
		if err != nil {
			s.end = err
			return
		}
		body = zr
	}
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		v, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		idStr, rest, _ := strings.Cut(v, " ")
		at, _, _ := strings.Cut(rest, " ")
		id, _ := strconv.Atoi(idStr)
		if want := s.got.Load() + 1; int64(id) != want {
			s.fail(fmt.Sprintf("event %d after %d", id, want-1))
		}
		s.got.Store(int64(id))
		if ns, err := strconv.ParseInt(at, 10, 64); err == nil {
			select {
			case s.lat <- time.Since(time.Unix(0, ns)):
			default:
			}
		}
		select {
		case s.ids <- id:
		default:
		}
	}
	s.end = sc.Err()
}

// streamsState is /coalesce/streams.
type streamsState struct {
	Total       int   `json:"total"`
	Subscribers int64 `json:"subscribers"`
	Streams     []struct {
		Path        string `json:"path"`
		Subscribers int    `json:"subscribers"`
		Events      uint64 `json:"events"`
		Reconnects  int    `json:"upstream_reconnects"`
		State       string `json:"state"`
	} `json:"streams"`
}

func streams(t testing.TB, client *http.Client) streamsState {
	t.Helper()
	var st streamsState
	if code := adminJSON(t, client, "GET", "/coalesce/streams?limit=1000", "", &st); code != http.StatusOK {
		t.Fatalf("GET /coalesce/streams: %d", code)
	}
	return st
}

// waitUntil polls cond until it holds, or fails after within.
func waitUntil(t testing.TB, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", within, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// subscribersOf is how many subscribers the admin API counts for path.
func subscribersOf(t testing.TB, client *http.Client, path string) int {
	n := 0
	for _, s := range streams(t, client).Streams {
		if s.Path == path {
			n += s.Subscribers
		}
	}
	return n
}

// streamsOf is how many streams the admin API lists for path.
func streamsOf(t testing.TB, client *http.Client, path string) int {
	n := 0
	for _, s := range streams(t, client).Streams {
		if s.Path == path {
			n++
		}
	}
	return n
}

// openMany subscribes n clients to path at once.
func openMany(t *testing.T, client *http.Client, n int, path string, headers ...string) []*subscriber {
	t.Helper()
	subs := make([]*subscriber, n)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed []string
	for i := range subs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithCancel(context.Background())
			req, _ := http.NewRequestWithContext(ctx, "GET", baseURL+path, nil)
			req.Header.Set("Accept", "text/event-stream")
			for _, h := range headers {
				k, v, _ := strings.Cut(h, ":")
				req.Header.Set(strings.TrimSpace(k), strings.TrimSpace(v))
			}
			resp, err := client.Do(req)
			if err != nil {
				cancel()
				mu.Lock()
				failed = append(failed, err.Error())
				mu.Unlock()
				return
			}
			s := &subscriber{resp: resp, cancel: cancel, done: make(chan struct{}), ids: make(chan int, 1), lat: make(chan time.Duration, 1)}
			go s.read()
			subs[i] = s
		}()
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, s := range subs {
			if s != nil {
				s.cancel()
				s.resp.Body.Close()
				<-s.done
			}
		}
	})
	if len(failed) > 0 {
		t.Fatalf("%d of %d subscribers failed to connect, e.g. %s", len(failed), n, failed[0])
	}
	return subs
}

func TestSSEThousandSubscribersShareOneUpstreamStream(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("linger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	const n = 1000
	subs := openMany(t, client, n, path)
	waitUntil(t, 30*time.Second, "1000 subscribers", func() bool { return subscribersOf(t, admin, path) == n })
	leaders := 0
	for _, s := range subs {
		cs := strings.Join(s.resp.Header.Values("Cache-Status"), ", ")
		if s.resp.StatusCode != 200 || s.resp.Header.Get("Content-Type") != "text/event-stream" {
			t.Fatalf("subscriber: %d %q", s.resp.StatusCode, s.resp.Header.Get("Content-Type"))
		}
		if !strings.Contains(cs, "collapsed") {
			leaders++
		}
	}
	if leaders != 1 {
		t.Errorf("%d subscribers started a stream (Cache-Status without collapsed), want 1", leaders)
	}

	const events = 20
	for i := 1; i <= events; i++ {
		src.publish(i)
		// At most a few events in flight, so that no subscriber of a
		// loaded machine falls `buffer` behind.
		if i%5 == 0 {
			waitUntil(t, 30*time.Second, fmt.Sprintf("event %d everywhere", i), func() bool {
				for _, s := range subs {
					if s.got.Load() < int64(i) {
						return false
					}
				}
				return true
			})
		}
	}
	for i, s := range subs {
		if e := s.errs.Load(); e != nil {
			t.Fatalf("subscriber %d: %s", i, *e)
		}
		if got := s.got.Load(); got != events {
			t.Fatalf("subscriber %d got up to event %d, want %d", i, got, events)
		}
	}
	if got := up.Calls(); got != 1 {
		t.Errorf("upstream connections: %d, want 1 for %d subscribers", got, n)
	}
}

// Subscribers that ask for gzip through encode get their events
// compressed, every one and in order, beside subscribers that do not (the
// encoding is part of the key: one upstream stream each).
func TestSSECompressedAndPlainSubscribersReceiveEveryEvent(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("linger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	var subs []*subscriber
	for range 3 {
		subs = append(subs, subscribe(t, client, path, "Accept-Encoding: gzip"), subscribe(t, client, path))
	}
	waitUntil(t, 30*time.Second, "6 subscribers", func() bool { return subscribersOf(t, admin, path) == 6 })
	const events = 10
	src.publish(events)
	for i, s := range subs {
		waitUntil(t, 30*time.Second, fmt.Sprintf("subscriber %d's events", i), func() bool { return s.got.Load() == events })
		if e := s.errs.Load(); e != nil {
			t.Fatalf("subscriber %d: %s", i, *e)
		}
		want := ""
		if i%2 == 0 {
			want = "gzip"
		}
		if got := s.resp.Header.Get("Content-Encoding"); got != want {
			t.Errorf("subscriber %d: Content-Encoding %q, want %q", i, got, want)
		}
	}
	if got := up.Calls(); got != 2 {
		t.Errorf("upstream connections: %d, want 2 (one per encoding)", got)
	}
}

func TestSSETwoIdentitiesTwoUpstreamStreams(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("linger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	alice := openMany(t, client, 3, path, "Authorization: Bearer alice")
	bob := openMany(t, client, 3, path, "Authorization: Bearer bob")
	waitUntil(t, 10*time.Second, "6 subscribers", func() bool { return subscribersOf(t, admin, path) == 6 })
	if got := streamsOf(t, admin, path); got != 2 {
		t.Errorf("streams: %d, want 2 (one per identity)", got)
	}
	src.publish(3)
	for _, s := range append(alice, bob...) {
		waitUntil(t, 10*time.Second, "events", func() bool { return s.got.Load() == 3 })
	}
	if got := up.Calls(); got != 2 {
		t.Errorf("upstream connections: %d, want 2", got)
	}
}

func TestSSEReplayInsideAndOutsideTheRing(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("replay 4\n\t\t\tlinger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	first := subscribe(t, client, path)
	waitUntil(t, 10*time.Second, "a subscriber", func() bool { return subscribersOf(t, admin, path) == 1 })
	src.publish(6)
	waitUntil(t, 10*time.Second, "6 events", func() bool { return first.got.Load() == 6 })

	// Events 3..6 are kept: one that saw 3 is sent 4, 5, 6 from the ring.
	back := subscribe(t, client, path, "Last-Event-ID: 3")
	if cs := strings.Join(back.resp.Header.Values("Cache-Status"), ", "); !strings.Contains(cs, "collapsed") || !strings.Contains(cs, "detail=replay") {
		t.Errorf("replayed subscriber's Cache-Status: %q", cs)
	}
	waitUntil(t, 10*time.Second, "the replay", func() bool { return back.got.Load() == 6 })
	if got := up.Calls(); got != 1 {
		t.Errorf("upstream connections after a replay from the ring: %d, want 1", got)
	}

	// One that saw 1 is older than the ring: its own upstream request,
	// carrying its Last-Event-ID, and no silent gap.
	old := subscribe(t, client, path, "Last-Event-ID: 1")
	if cs := strings.Join(old.resp.Header.Values("Cache-Status"), ", "); !strings.Contains(cs, "detail=replay-miss") {
		t.Errorf("Cache-Status outside the ring: %q, want detail=replay-miss", cs)
	}
	waitUntil(t, 10*time.Second, "the upstream's history", func() bool { return old.got.Load() == 6 })
	if got := up.Calls(); got != 2 {
		t.Errorf("upstream connections: %d, want 2", got)
	}
	if ids := src.ids(); len(ids) != 2 || ids[1] != "1" {
		t.Errorf("upstream Last-Event-IDs: %q, want the miss to carry 1", ids)
	}
	src.publish(7)
	for _, s := range []*subscriber{first, back, old} {
		waitUntil(t, 10*time.Second, "event 7", func() bool { return s.got.Load() == 7 })
		if e := s.errs.Load(); e != nil {
			t.Errorf("%s", *e)
		}
	}
}

func TestSSEStalledSubscriberDroppedOthersUnaffected(t *testing.T) {
	src := newEventSource()
	src.pad = " " + strings.Repeat("x", 32<<10)
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("buffer 8\n\t\t\tlinger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	fanouts0, within0 := fanoutsWithin(t, admin, 0.1)
	reader := subscribe(t, client, path)
	// A client that sends its request and never reads a byte.
	conn, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", httpPort))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n", path)
	waitUntil(t, 10*time.Second, "two subscribers", func() bool { return subscribersOf(t, admin, path) == 2 })

	var before, after []time.Duration
	dropped := 0
	for i := 1; i <= 600; i++ {
		src.publish(i)
		select {
		case lat := <-reader.lat:
			if dropped == 0 {
				before = append(before, lat)
			} else {
				after = append(after, lat)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("the reading subscriber did not get event %d", i)
		}
		if dropped == 0 && subscribersOf(t, admin, path) == 1 {
			dropped = i
		}
		if dropped > 0 && i >= dropped+20 {
			break
		}
	}
	if dropped == 0 {
		t.Fatal("the stalled subscriber was never dropped")
	}
	t.Logf("stalled subscriber dropped after %d events of 32 KiB (buffer 8, plus the sockets' buffers)", dropped)
	if e := reader.errs.Load(); e != nil {
		t.Fatalf("reading subscriber: %s", *e)
	}
	// The reader's latency does not move when the other one stalls. The
	// bound is for a loaded machine; what it catches is a wait for the
	// stalled client (its write would block until it is dropped).
	worst := func(ds []time.Duration) time.Duration {
		var w time.Duration
		for _, d := range ds {
			w = max(w, d)
		}
		return w
	}
	if w := worst(before); w > time.Second {
		t.Errorf("reading subscriber's worst latency while the other stalled: %s", w)
	}
	t.Logf("reading subscriber's worst latency: %s with a stalled neighbour (%d events), %s after (%d events)", worst(before), len(before), worst(after), len(after))
	// Inside the proxy: every event was handed to both subscribers, the
	// stalled one included, without waiting for it.
	fanouts, within := fanoutsWithin(t, admin, 0.1)
	if n := fanouts - fanouts0; n < float64(len(before)+len(after)) {
		t.Errorf("caddy_coalesce_sse_fanout_seconds counted %.0f fan-outs, want one per event (%d)", n, len(before)+len(after))
	}
	if slow := (fanouts - fanouts0) - (within - within0); slow > 0 {
		t.Errorf("%.0f fan-outs took more than 100ms: the stream waited for a subscriber", slow)
	}
	// The dropped connection is closed.
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, conn); err != nil {
		t.Errorf("the stalled subscriber's connection was not closed: %v", err)
	}
}

func TestSSEUpstreamRestartReconnectsOnceWithLastEventID(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("linger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	subs := openMany(t, client, 20, path)
	waitUntil(t, 10*time.Second, "20 subscribers", func() bool { return subscribersOf(t, admin, path) == 20 })
	src.publish(3)
	for _, s := range subs {
		waitUntil(t, 10*time.Second, "3 events", func() bool { return s.got.Load() == 3 })
	}

	src.killAll()
	waitUntil(t, 10*time.Second, "the reconnect", func() bool { return up.Calls() == 2 && up.inflight.Load() == 1 })
	src.publish(6)
	for i, s := range subs {
		waitUntil(t, 10*time.Second, "events after the restart", func() bool { return s.got.Load() == 6 })
		if e := s.errs.Load(); e != nil {
			t.Fatalf("subscriber %d: %s", i, *e)
		}
		select {
		case <-s.done:
			t.Fatalf("subscriber %d was disconnected", i)
		default:
		}
	}
	if ids := src.ids(); len(ids) != 2 || ids[1] != "3" {
		t.Errorf("upstream Last-Event-IDs: %q, want the reconnect to carry 3", ids)
	}
	for _, s := range streams(t, admin).Streams {
		if s.Path == path && (s.Reconnects != 1 || s.Subscribers != 20) {
			t.Errorf("/coalesce/streams: %+v, want 20 subscribers and 1 upstream reconnect", s)
		}
	}
}

func TestSSELastSubscriberLeavesUpstreamClosedAfterLinger(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	const linger = 500 * time.Millisecond
	startCaddy(t, sseSite("linger 500ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	s := subscribe(t, client, path)
	waitUntil(t, 10*time.Second, "the upstream stream", func() bool { return up.inflight.Load() == 1 })
	s.cancel()
	left := time.Now()
	waitUntil(t, 10*time.Second, "the subscriber to leave", func() bool { return subscribersOf(t, admin, path) == 0 })
	// Back within the linger: the same upstream stream.
	again := subscribe(t, client, path)
	src.publish(1)
	waitUntil(t, 10*time.Second, "an event", func() bool { return again.got.Load() == 1 })
	if got := up.Calls(); got != 1 {
		t.Errorf("upstream connections after coming back within linger: %d, want 1", got)
	}
	again.cancel()
	left = time.Now()
	waitUntil(t, 10*time.Second, "the upstream stream to close", func() bool { return up.inflight.Load() == 0 })
	if took := time.Since(left); took < linger {
		t.Errorf("upstream closed %s after the last subscriber left, before linger %s", took, linger)
	}
	if got := streamsOf(t, admin, path); got != 0 {
		t.Errorf("streams after linger: %d", got)
	}
}

func TestSSEReloadWithThousandSubscribersIsPrompt(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	// Caddy's default: no grace_period, so a reload waits for every request
	// of the old config without a bound.
	global := fmt.Sprintf("{\n\tadmin localhost:%d\n\thttp_port %d\n\thttps_port %d\n\tskip_install_trust\n}\n", adminPort, httpPort, httpsPort)
	site := withUpstreams(sseSite("linger 100ms"), []*upstream{up})
	tester := startCaddy(t, sseSite("linger 100ms"), up)
	_ = tester
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")
	load := func() time.Duration {
		start := time.Now()
		req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/load", adminPort), strings.NewReader(global+site))
		req.Header.Set("Content-Type", "text/caddyfile")
		req.Header.Set("Cache-Control", "must-revalidate") // reload even though the config is the same
		resp, err := (&http.Client{Timeout: 60 * time.Second}).Do(req)
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
	load() // the unbounded grace period
	t.Cleanup(func() { reloadCaddy(t, site) })

	const n = 1000
	subs := openMany(t, client, n, path)
	// And a few that encode compresses, which stay requests of their own
	// (a stream of their own: the encoding is part of the key).
	for range 10 {
		subs = append(subs, subscribe(t, client, path, "Accept-Encoding: gzip"))
	}
	waitUntil(t, 30*time.Second, "1010 subscribers", func() bool { return subscribersOf(t, admin, path) == n+10 })
	src.publish(5)
	for _, s := range subs {
		waitUntil(t, 30*time.Second, "5 events", func() bool { return s.got.Load() == 5 })
	}

	took := load()
	t.Logf("reload with %d open subscribers took %s", n, took)
	if took > 10*time.Second {
		t.Errorf("reload took %s", took)
	}
	for i, s := range subs {
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			t.Fatalf("subscriber %d of the old config is still open", i)
		}
		if e := s.errs.Load(); e != nil {
			t.Fatalf("subscriber %d: %s", i, *e)
		}
		if s.end != nil {
			t.Fatalf("subscriber %d's response ended with %v; a reload ends it cleanly", i, s.end)
		}
	}
	// They reconnect with their Last-Event-ID and are replayed: the events
	// published during the reload reach them, none twice.
	src.publish(8)
	back := subscribe(t, client, path, "Last-Event-ID: 5")
	waitUntil(t, 10*time.Second, "the replay after the reload", func() bool { return back.got.Load() == 8 })
	if e := back.errs.Load(); e != nil {
		t.Fatal(*e)
	}
	if ids := src.ids(); ids[len(ids)-1] != "5" {
		t.Errorf("upstream Last-Event-IDs %q: the new config's request must carry the last event's id", ids)
	}
}

// fanoutsWithin reads caddy_coalesce_sse_fanout_seconds over every handler:
// the fan-outs counted, and those that took at most le seconds.
func fanoutsWithin(t *testing.T, client *http.Client, le float64) (count, within float64) {
	t.Helper()
	fam := scrapeMetrics(t, client)["caddy_coalesce_sse_fanout_seconds"]
	if fam == nil {
		return 0, 0
	}
	for _, m := range fam.GetMetric() {
		h := m.GetHistogram()
		count += float64(h.GetSampleCount())
		for _, b := range h.GetBucket() {
			if b.GetUpperBound() == le {
				within += float64(b.GetCumulativeCount())
			}
		}
	}
	return count, within
}
