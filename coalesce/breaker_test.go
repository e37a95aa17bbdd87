package coalesce

import (
	"context"
	"errors"
	"fmt"
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

func TestBreakerConfigValidateExplainsNonsense(t *testing.T) {
	if err := DefaultBreakerConfig().Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	if err := (BreakerConfig{Disabled: true, Ratio: 7}).Validate(); err != nil {
		t.Fatalf("a disabled breaker has nothing to validate: %v", err)
	}
	cases := []struct {
		name string
		mod  func(*BreakerConfig)
		want string
	}{
		{"ratio above 1", func(c *BreakerConfig) { c.Ratio = 1.5 }, "between 0 and 1"},
		{"ratio below 0", func(c *BreakerConfig) { c.Ratio = -0.1 }, "between 0 and 1"},
		{"negative failures", func(c *BreakerConfig) { c.Failures = -1 }, "failures must not be negative"},
		{"ratio without sample", func(c *BreakerConfig) { c.Ratio = 0.5; c.MinRequests = -1 }, "minimum sample"},
		{"negative window", func(c *BreakerConfig) { c.Window = -time.Second }, "window must not be negative"},
		{"negative open", func(c *BreakerConfig) { c.Open = -time.Second }, "open must not be negative"},
		{"no probes", func(c *BreakerConfig) { c.Probes = -1 }, "probes"},
		{"status out of range", func(c *BreakerConfig) { c.Statuses = []int{502, 600} }, "status 600 is not an HTTP status code"},
	}
	for _, tc := range cases {
		c := DefaultBreakerConfig()
		tc.mod(&c)
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: got %v, want an error saying %q", tc.name, err, tc.want)
		}
	}
	cfg := DefaultConfig()
	cfg.Breaker.Probes = -1
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "breaker: probes") {
		t.Errorf("Config.Validate does not check the breaker: %v", err)
	}
}

// testBreakerConfig trips after 3 failures and stays open for open.
func testBreakerConfig(open time.Duration) BreakerConfig {
	c := DefaultBreakerConfig()
	c.Failures = 3
	c.Open = open
	return c
}

// testOpen is the open period of tests that check a breaker while it is
// open: long enough that no stall of a loaded machine ends it between two
// steps of the test. They wait for its end with waitHalfOpen.
const testOpen = 500 * time.Millisecond

// waitHalfOpen waits until b's open period is over (State turns an open
// breaker half-open once its time is up).
func waitHalfOpen(t *testing.T, b *Breaker) {
	t.Helper()
	waitFor(t, "the breaker to turn half-open", func() bool { return b.State() == BreakerHalfOpen })
}

// pass lets one request through b and reports v; false if b refused.
func pass(b *Breaker, v verdict) bool {
	done, _, ok := b.allow(time.Now())
	if ok {
		done.report(v)
	}
	return ok
}

func TestBreakerTripsOnConsecutiveFailuresOnly(t *testing.T) {
	b := NewBreakers(nil).Breaker("a:80", testBreakerConfig(time.Minute))
	for range 10 {
		pass(b, failure)
		pass(b, failure)
		pass(b, success) // resets the run
	}
	if s := b.State(); s != BreakerClosed {
		t.Fatalf("two failures between successes tripped it: %s", s)
	}
	pass(b, failure)
	pass(b, failure)
	pass(b, failure)
	if s := b.State(); s != BreakerOpen {
		t.Fatalf("three consecutive failures: %s, want open", s)
	}
	if pass(b, success) {
		t.Fatal("an open breaker let a request through")
	}
}

func TestBreakerRatioWaitsForItsMinimumSample(t *testing.T) {
	cfg := DefaultBreakerConfig()
	cfg.Failures, cfg.Ratio, cfg.MinRequests, cfg.Window = 0, 0.5, 10, time.Minute
	b := NewBreakers(nil).Breaker("a:80", cfg)
	for range 9 {
		pass(b, failure)
	}
	if s := b.State(); s != BreakerClosed {
		t.Fatalf("9 failures with min 10 tripped it: %s", s)
	}
	pass(b, failure)
	if s := b.State(); s != BreakerOpen {
		t.Fatalf("10 failures of 10 with ratio 0.5: %s, want open", s)
	}

	b = NewBreakers(nil).Breaker("b:80", cfg)
	for i := range 40 {
		if i%3 == 0 {
			pass(b, failure)
		} else {
			pass(b, success)
		}
	}
	if s := b.State(); s != BreakerClosed {
		t.Fatalf("a third failing with ratio 0.5 tripped it: %s", s)
	}
}

func TestBreakerHalfOpenLetsOnlyProbesThrough(t *testing.T) {
	cfg := testBreakerConfig(testOpen)
	cfg.Probes = 2
	b := NewBreakers(nil).Breaker("a:80", cfg)
	for range 3 {
		pass(b, failure)
	}
	if pass(b, success) {
		t.Fatal("an open breaker let a request through")
	}
	waitHalfOpen(t, b)
	d1, _, ok1 := b.allow(time.Now())
	d2, _, ok2 := b.allow(time.Now())
	_, retry, ok3 := b.allow(time.Now())
	if !ok1 || !ok2 || ok3 {
		t.Fatalf("half-open with probes 2 let through %v %v %v", ok1, ok2, ok3)
	}
	if n := RetryAfter(retry, time.Now()); n != 1 {
		t.Errorf("a request refused while probes decide: Retry-After %d, want 1", n)
	}
	d1.report(excluded) // a client that left frees its slot
	d3, _, ok := b.allow(time.Now())
	if !ok {
		t.Fatal("an excluded probe kept its slot")
	}
	d2.report(success)
	d3.report(success)
	if s := b.State(); s != BreakerClosed {
		t.Fatalf("after two good probes: %s, want closed", s)
	}

	for range 3 {
		pass(b, failure)
	}
	waitHalfOpen(t, b)
	if !pass(b, failure) {
		t.Fatal("a half-open breaker refused its probe")
	}
	if s := b.State(); s != BreakerOpen {
		t.Fatalf("after a failed probe: %s, want open", s)
	}
}

func TestBreakerExcludedOutcomesAreNeitherSuccessNorFailure(t *testing.T) {
	b := NewBreakers(nil).Breaker("a:80", testBreakerConfig(time.Minute))
	pass(b, failure)
	pass(b, failure)
	for range 10 {
		pass(b, excluded)
	}
	pass(b, failure)
	if s := b.State(); s != BreakerOpen {
		t.Fatalf("exclusions broke the run of failures: %s", s)
	}
}

func TestBreakerReportsEachStateChangeOnceWithItsCause(t *testing.T) {
	var mu sync.Mutex
	var changes []BreakerChange
	set := NewBreakers(func(c BreakerChange) {
		mu.Lock()
		changes = append(changes, c)
		mu.Unlock()
	})
	b := set.Breaker("a:80", testBreakerConfig(testOpen))
	for i := range 5 {
		// The last two are refused: no second "open".
		if passed := pass(b, failure); passed != (i < 3) {
			t.Fatalf("failure %d: let through %v", i+1, passed)
		}
	}
	waitHalfOpen(t, b)
	if !pass(b, success) {
		t.Fatal("a half-open breaker refused its probe")
	}

	mu.Lock()
	defer mu.Unlock()
	var got []string
	for _, c := range changes {
		got = append(got, fmt.Sprintf("%s>%s", c.From, c.To))
	}
	if want := "closed>open half-open>closed"; strings.Join(got, " ") != "closed>open open>half-open half-open>closed" {
		t.Fatalf("changes %v, want open, half-open, closed once each (%s)", got, want)
	}
	open := changes[0]
	if open.Upstream != "a:80" || open.Counts.ConsecutiveFailures != 3 || open.Counts.Failures != 3 || !strings.Contains(open.Reason, "3 consecutive failures") {
		t.Errorf("opening change %+v does not say what tripped it", open)
	}
	if open.Until.IsZero() {
		t.Error("opening change without the time probes begin")
	}
}

func TestRetryAfterIsWholeSecondsRoundedUp(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		left time.Duration
		want int64
	}{{9*time.Second + time.Millisecond, 10}, {10 * time.Second, 10}, {time.Millisecond, 1}, {-time.Second, 1}} {
		if got := RetryAfter(now.Add(tc.left), now); got != tc.want {
			t.Errorf("%s left: Retry-After %d, want %d", tc.left, got, tc.want)
		}
	}
}

func TestBreakersAreSharedByUpstreamAndSettings(t *testing.T) {
	set := NewBreakers(nil)
	cfg := DefaultBreakerConfig()
	if set.Breaker("a:80", cfg) != set.Breaker("a:80", DefaultBreakerConfig()) {
		t.Error("two routes to one upstream with the same settings have two breakers")
	}
	other := cfg
	other.Failures = 2
	if set.Breaker("a:80", cfg) == set.Breaker("a:80", other) || set.Breaker("a:80", cfg) == set.Breaker("b:80", cfg) {
		t.Error("different settings or upstreams share a breaker")
	}
	for range 2 {
		pass(set.Breaker("a:80", other), failure)
	}
	if !set.Refusing("a:80") || set.Refusing("b:80") {
		t.Error("Refusing does not see the open breaker of a:80 alone")
	}
	if n := len(set.Snapshot()); n != 3 {
		t.Errorf("snapshot lists %d breakers, want 3", n)
	}
}

// brOrigin is an upstream handler that counts its requests and answers
// with status() (200 with a body when it returns 200).
type brOrigin struct {
	calls  atomic.Int64
	status atomic.Int64
	hold   chan struct{} // when not nil, requests wait for it to close
}

func newBrOrigin() *brOrigin {
	o := &brOrigin{}
	o.status.Store(http.StatusOK)
	return o
}

func (o *brOrigin) next(w http.ResponseWriter, r *http.Request) error {
	n := o.calls.Add(1)
	if o.hold != nil {
		select {
		case <-o.hold:
		case <-r.Context().Done():
			return r.Context().Err()
		}
	}
	st := int(o.status.Load())
	if st == -1 {
		return errors.New("dial tcp: connection refused")
	}
	w.Header().Set("Content-Type", "text/plain")
	w.WriteHeader(st)
	fmt.Fprintf(w, "answer %d", n)
	return nil
}

// newBrEngine is newEngine with the test breaker (open a minute) switched on.
func newBrEngine(t *testing.T, mod func(*Config)) *Engine {
	t.Helper()
	return newEngine(t, func(c *Config) {
		c.Breaker = testBreakerConfig(time.Minute)
		if mod != nil {
			mod(c)
		}
	})
}

// brGet sends one GET through e to next and returns the recorded answer.
func brGet(e *Engine, next Next, path string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil)
	err := e.Serve(w, r, next)
	var se *StatusError
	if errors.As(err, &se) {
		w.Code = se.Status
	} else if err != nil {
		w.Code = http.StatusBadGateway
	}
	return w
}

func TestOpenBreakerAnswers503WithRetryAfterWithoutTheUpstream(t *testing.T) {
	o := newBrOrigin()
	o.status.Store(http.StatusServiceUnavailable)
	e := newBrEngine(t, func(c *Config) { c.Breaker.Open = 10 * time.Second })
	for i := range 3 {
		if w := brGet(e, o.next, "/p"+strconv.Itoa(i)); w.Code != 503 || w.Header().Get("Retry-After") != "" {
			t.Fatalf("failure %d: %d Retry-After %q; the upstream's own answer should pass", i, w.Code, w.Header().Get("Retry-After"))
		}
	}
	w := brGet(e, o.next, "/after")
	if w.Code != 503 || w.Header().Get("Retry-After") != "10" {
		t.Fatalf("open breaker: %d Retry-After %q, want 503 and 10", w.Code, w.Header().Get("Retry-After"))
	}
	if cs := w.Header().Get("Cache-Status"); cs != "caddy-coalesce; fwd=bypass; detail=breaker-open" {
		t.Errorf("Cache-Status %q", cs)
	}
	if n := o.calls.Load(); n != 3 {
		t.Errorf("the upstream got %d requests, want the 3 that tripped the breaker", n)
	}
	// A POST (bypassed) is refused too.
	r := httptest.NewRequest(http.MethodPost, "http://api.example/p", strings.NewReader("x"))
	pw := httptest.NewRecorder()
	if err := e.Serve(pw, r, o.next); err != nil || pw.Code != 503 || o.calls.Load() != 3 {
		t.Errorf("bypassed POST with an open breaker: %v %d, calls %d", err, pw.Code, o.calls.Load())
	}
}

func TestTransportErrorsFailAndClientCancelsDoNot(t *testing.T) {
	o := newBrOrigin()
	o.status.Store(-1) // connection refused
	e := newBrEngine(t, nil)
	for i := range 3 {
		brGet(e, o.next, "/p"+strconv.Itoa(i))
	}
	if w := brGet(e, o.next, "/x"); w.Code != 503 || o.calls.Load() != 3 {
		t.Fatalf("three transport errors did not trip it: %d, %d calls", w.Code, o.calls.Load())
	}

	o = newBrOrigin()
	o.hold = make(chan struct{}) // never answers: the clients give up
	e = newBrEngine(t, nil)
	for i := range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		r := httptest.NewRequest(http.MethodGet, "http://api.example/slow"+strconv.Itoa(i), nil).WithContext(ctx)
		_ = e.Serve(httptest.NewRecorder(), r, o.next)
		cancel()
	}
	o.hold = nil
	if w := brGet(e, o.next, "/fine"); w.Code != 200 {
		t.Fatalf("five cancelled clients tripped the breaker: %d %q", w.Code, w.Header().Get("Cache-Status"))
	}

	// A host that calls an error something else (e.g. a 4xx handler error)
	// is not counted either.
	o = newBrOrigin()
	o.status.Store(-1)
	e = newBrEngine(t, func(c *Config) { c.Hooks.UpstreamFailed = func(error) bool { return false } })
	for i := range 5 {
		brGet(e, o.next, "/p"+strconv.Itoa(i))
	}
	if o.calls.Load() != 5 {
		t.Errorf("errors UpstreamFailed rejects tripped the breaker (%d calls)", o.calls.Load())
	}
}

func TestHalfOpenBreakerLetsOnlyProbesThroughAHerd(t *testing.T) {
	o := newBrOrigin()
	o.status.Store(http.StatusBadGateway)
	e := newBrEngine(t, func(c *Config) { c.Breaker.Open = 50 * time.Millisecond; c.Breaker.Probes = 2 })
	for i := range 3 {
		brGet(e, o.next, "/p"+strconv.Itoa(i))
	}
	time.Sleep(60 * time.Millisecond)
	o.status.Store(http.StatusOK)
	o.hold = make(chan struct{})
	before := o.calls.Load()
	var wg sync.WaitGroup
	var ok, refused atomic.Int64
	for i := range 100 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w := brGet(e, o.next, "/herd"+strconv.Itoa(i)) // 100 keys: nothing collapses
			switch {
			case w.Code == 200:
				ok.Add(1)
			case w.Code == 503 && w.Header().Get("Retry-After") == "1":
				refused.Add(1)
			}
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for refused.Load() < 98 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	close(o.hold)
	wg.Wait()
	if n := o.calls.Load() - before; n != 2 || ok.Load() != 2 || refused.Load() != 98 {
		t.Fatalf("half-open with probes 2 under 100 requests: %d reached the upstream, %d ok, %d refused", n, ok.Load(), refused.Load())
	}
	if w := brGet(e, o.next, "/after"); w.Code != 200 {
		t.Fatalf("two good probes did not close it: %d", w.Code)
	}
}

func TestFollowersShareTheOpenAnswer(t *testing.T) {
	// A policy that finds every member open (as lb_policy breaker does when
	// each member's breaker is open) while followers wait for the leader.
	release := make(chan struct{})
	var calls atomic.Int64
	next := func(w http.ResponseWriter, r *http.Request) error {
		calls.Add(1)
		<-release
		pick := PickFrom(r.Context())
		pick.Begin(r)
		pick.NoneReady([]string{"a:80", "b:80"})
		return &StatusError{Status: 503, Err: errors.New("no upstreams available")}
	}
	e := newBrEngine(t, func(c *Config) { c.Hooks.Upstream = func(*http.Request) string { return "" } })
	for _, u := range []string{"a:80", "b:80"} {
		for range 3 {
			pass(e.guard.breaker(u), failure)
		}
	}
	var wg sync.WaitGroup
	answers := make([]*httptest.ResponseRecorder, 20)
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = brGet(e, next, "/same")
		}()
	}
	for e.Stats().Registry.Waiters < 19 {
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	collapsed := 0
	for _, w := range answers {
		if w.Code != 503 || w.Header().Get("Retry-After") == "" || !strings.Contains(w.Header().Get("Cache-Status"), "detail=breaker-open") {
			t.Fatalf("answer %d Retry-After %q Cache-Status %q", w.Code, w.Header().Get("Retry-After"), w.Header().Get("Cache-Status"))
		}
		if strings.Contains(w.Header().Get("Cache-Status"), "collapsed") {
			collapsed++
		}
	}
	if calls.Load() != 1 || collapsed != 19 {
		t.Errorf("%d requests went on, %d followers shared the answer; want 1 and 19", calls.Load(), collapsed)
	}
}

func TestPolicySteersAroundADeadMemberAndRetriesDoNotFail(t *testing.T) {
	// next plays reverse_proxy with `lb_policy breaker first` and
	// lb_retries: a failed attempt is retried on another member.
	var toDead, toLive atomic.Int64
	next := func(w http.ResponseWriter, r *http.Request) error {
		pick := PickFrom(r.Context())
		for range 3 {
			pick.Begin(r)
			var chosen string
			for _, u := range []string{"dead:80", "live:80"} {
				if pick.Ready(u) && !pick.Tried(u) && pick.Take(u) {
					chosen = u
					break
				}
			}
			if chosen == "live:80" {
				toLive.Add(1)
				w.WriteHeader(200)
				return nil
			}
			if chosen == "" {
				return &StatusError{Status: 503, Err: errors.New("no upstreams available")}
			}
			toDead.Add(1) // refused connection: try again
		}
		return &StatusError{Status: 502, Err: errors.New("refused")}
	}
	e := newBrEngine(t, func(c *Config) { c.Hooks.Upstream = func(*http.Request) string { return "" } })
	for i := range 50 {
		if w := brGet(e, next, "/p"+strconv.Itoa(i)); w.Code != 200 {
			t.Fatalf("request %d failed: %d", i, w.Code)
		}
	}
	if toDead.Load() != 3 || toLive.Load() != 50 {
		t.Errorf("the dead member got %d requests (want the 3 that tripped it), the live one %d", toDead.Load(), toLive.Load())
	}
	if s := e.guard.breaker("dead:80").State(); s != BreakerOpen {
		t.Errorf("dead member's breaker: %s", s)
	}
}

func TestStaleIfErrorAnswersWhileTheBreakerIsOpenThenStops(t *testing.T) {
	// stale_if_error is long enough that no stall of a loaded machine ends
	// it before the requests "during the outage" are answered.
	const ttl, staleIfError = 20 * time.Millisecond, time.Second
	o := newBrOrigin()
	e := newBrEngine(t, func(c *Config) {
		c.TTL = ttl
		c.StaleIfError = staleIfError
	})
	if w := brGet(e, o.next, "/doc"); w.Code != 200 {
		t.Fatal(w.Code)
	}
	stored := time.Now() // at or after the copy was stored
	o.status.Store(http.StatusServiceUnavailable)
	time.Sleep(2 * ttl)
	for i := range 6 {
		w := brGet(e, o.next, "/doc")
		if w.Code != 200 || w.Body.String() != "answer 1" || !strings.Contains(w.Header().Get("Cache-Status"), "fwd=stale") {
			t.Fatalf("request %d during the outage: %d %q %q", i, w.Code, w.Body.String(), w.Header().Get("Cache-Status"))
		}
	}
	if n := o.calls.Load(); n != 4 {
		t.Errorf("upstream calls %d, want 1 good + 3 that tripped the breaker", n)
	}
	time.Sleep(time.Until(stored.Add(ttl + staleIfError + 20*time.Millisecond)))
	if w := brGet(e, o.next, "/doc"); w.Code != 503 || w.Header().Get("Retry-After") == "" {
		t.Fatalf("after stale_if_error: %d Retry-After %q, want 503 from the open breaker", w.Code, w.Header().Get("Retry-After"))
	}
}

func TestStaleWhileRevalidateRefreshesOncePerExpiryInTheBackground(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	var calls, inflight, maxInflight atomic.Int64
	next := func(w http.ResponseWriter, r *http.Request) error {
		n := calls.Add(1)
		if c := inflight.Add(1); c > maxInflight.Load() {
			maxInflight.Store(c)
		}
		defer inflight.Add(-1)
		time.Sleep(30 * time.Millisecond)
		fmt.Fprintf(w, "v%d", n)
		return nil
	}
	var mu sync.Mutex
	outcomes := map[Outcome]int{}
	cfg := DefaultConfig()
	cfg.TTL, cfg.Stale = 50*time.Millisecond, time.Second
	cfg.Hooks.Observe = func(_ *http.Request, ev Event) {
		mu.Lock()
		outcomes[ev.Outcome]++
		mu.Unlock()
	}
	e, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	brGet(e, next, "/hot")
	start := time.Now()
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < 600*time.Millisecond {
				if w := brGet(e, next, "/hot"); w.Code != 200 {
					t.Errorf("status %d", w.Code)
					return
				}
				time.Sleep(time.Millisecond)
			}
		}()
	}
	wg.Wait()
	e.Close()
	mu.Lock()
	defer mu.Unlock()
	// Every client was answered from memory (fresh or stale): none waited
	// for an upstream request; the refreshes ran one at a time, one per
	// expiry (every ttl + upstream latency = 80ms, at most one per ttl).
	if outcomes[OutcomeLeader] != 1 || outcomes[OutcomeCollapsed] != 0 || outcomes[OutcomeHit] == 0 || outcomes[OutcomeStale] == 0 {
		t.Errorf("outcomes %v: only the first request should have gone upstream", outcomes)
	}
	if n := calls.Load() - 1; n < 3 || n > 600/50+1 || maxInflight.Load() != 1 {
		t.Errorf("%d refreshes in 600ms, %d at once", n, maxInflight.Load())
	}
}

func TestAHandlerOfANewConfigLearnsItsUpstreamAnew(t *testing.T) {
	// The old config's handler went to old:80, whose breaker is open; the
	// new config points the route at new:80. Its handler must not hold
	// requests back on old:80's account.
	o := newBrOrigin()
	o.status.Store(http.StatusBadGateway)
	upstream := "old:80"
	e := newBrEngine(t, func(c *Config) { c.Hooks.Upstream = func(*http.Request) string { return upstream } })
	for i := range 4 {
		brGet(e, o.next, "/p"+strconv.Itoa(i))
	}
	if n := o.calls.Load(); n != 3 {
		t.Fatalf("old:80 got %d requests, want 3", n)
	}
	upstream = "new:80"
	o.status.Store(http.StatusOK)
	reloaded := e.WithHooks(Hooks{Upstream: func(*http.Request) string { return "new:80" }})
	if w := brGet(reloaded, o.next, "/after-reload"); w.Code != 200 {
		t.Fatalf("the new handler answered %d for new:80 on old:80's account", w.Code)
	}
	// The breaker state itself is shared: the old upstream is still open.
	if s := e.guard.breaker("old:80").State(); s != BreakerOpen {
		t.Errorf("old:80 is %s", s)
	}
}

func TestWithSeveralUpstreamsTheEngineAnswersOnlyWhenAllRefuse(t *testing.T) {
	// A pool without lb_policy breaker: the engine cannot tell which member
	// is next, so it holds requests back only when every one refuses.
	var n atomic.Int64
	var deadA, deadB atomic.Bool
	next := func(w http.ResponseWriter, r *http.Request) error {
		i := n.Add(1)
		member := "a:80"
		dead := deadA.Load()
		if i%2 == 0 {
			member, dead = "b:80", deadB.Load()
		}
		*r.Context().Value(memberKey{}).(*string) = member
		if dead {
			w.WriteHeader(http.StatusBadGateway)
		}
		return nil
	}
	e := newBrEngine(t, func(c *Config) {
		c.Hooks.Upstream = func(r *http.Request) string { return *r.Context().Value(memberKey{}).(*string) }
	})
	get := func(path string) int {
		w := httptest.NewRecorder()
		var member string
		r := httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil)
		r = r.WithContext(context.WithValue(r.Context(), memberKey{}, &member))
		_ = e.Serve(w, r, next)
		return w.Code
	}
	get("/warm-a")
	get("/warm-b")
	deadA.Store(true)
	for i := range 10 {
		get("/a-dies" + strconv.Itoa(i))
	}
	if s := e.guard.breaker("a:80").State(); s != BreakerOpen {
		t.Fatalf("a:80 is %s", s)
	}
	before := n.Load()
	for i := range 4 {
		get("/b-alive" + strconv.Itoa(i))
	}
	if n.Load()-before != 4 {
		t.Fatalf("one open member of two held back requests: %d of 4 went on", n.Load()-before)
	}
	deadB.Store(true)
	for i := range 10 {
		get("/b-dies" + strconv.Itoa(i))
	}
	before = n.Load()
	if code := get("/all-open"); code != 503 || n.Load() != before {
		t.Fatalf("every member open: %d, %d went on", code, n.Load()-before)
	}
}

type memberKey struct{}

func TestBreakerReportsStateChangesOutsideItsLockInOrder(t *testing.T) {
	stall := make(chan struct{})
	reporting := make(chan struct{}, 1)
	var mu sync.Mutex
	var got []string
	set := NewBreakers(func(c BreakerChange) {
		if c.From == BreakerClosed && c.To == BreakerOpen {
			reporting <- struct{}{}
			<-stall // a log sink that stalls
		}
		mu.Lock()
		got = append(got, fmt.Sprintf("%s>%s", c.From, c.To))
		mu.Unlock()
	})
	b := set.Breaker("a:80", testBreakerConfig(20*time.Millisecond))
	pass(b, failure)
	pass(b, failure)
	tripped := make(chan struct{})
	go func() {
		defer close(tripped)
		pass(b, failure)
	}()
	<-reporting
	// While the opening is being reported, the breaker serves everybody
	// else, and changes state again.
	served := make(chan struct{})
	go func() {
		defer close(served)
		for b.State() != BreakerHalfOpen {
			time.Sleep(time.Millisecond)
		}
		pass(b, success) // the probe: closed again
		for range 100 {
			pass(b, success)
			_ = b.status(time.Now())
		}
	}()
	select {
	case <-served:
	case <-time.After(10 * time.Second):
		close(stall)
		t.Fatal("the breaker is held while one of its state changes is reported")
	}
	close(stall)
	<-tripped
	mu.Lock()
	defer mu.Unlock()
	if s := strings.Join(got, " "); s != "closed>open open>half-open half-open>closed" {
		t.Errorf("changes reported %q, want closed>open open>half-open half-open>closed, in that order", s)
	}
}

// lbPolicy plays reverse_proxy with `lb_policy breaker` over members: the
// first member whose breaker takes the request answers it with the status
// that member's entry in statuses holds; none: 503 as reverse_proxy's.
func lbPolicy(members []string, statuses map[string]*atomic.Int64) Next {
	return func(w http.ResponseWriter, r *http.Request) error {
		pick := PickFrom(r.Context())
		pick.Begin(r)
		for _, u := range members {
			if pick.Ready(u) && pick.Take(u) {
				w.WriteHeader(int(statuses[u].Load()))
				return nil
			}
		}
		pick.NoneReady(members)
		return &StatusError{Status: http.StatusServiceUnavailable, Err: errors.New("no upstreams available")}
	}
}

func TestAProbeSlotTheHandlerGuessedPassesToThePolicy(t *testing.T) {
	status := new(atomic.Int64)
	status.Store(http.StatusBadGateway)
	next := lbPolicy([]string{"a:80"}, map[string]*atomic.Int64{"a:80": status})
	e := newBrEngine(t, func(c *Config) {
		c.Breaker = testBreakerConfig(20 * time.Millisecond)
		c.Hooks.Upstream = func(*http.Request) string { return "" }
	})
	for i := range 3 {
		brGet(e, next, "/fail"+strconv.Itoa(i))
	}
	if s := e.guard.breaker("a:80").State(); s != BreakerOpen {
		t.Fatalf("a:80 is %s after 3 failures", s)
	}
	status.Store(http.StatusOK)
	time.Sleep(30 * time.Millisecond) // open 20ms: the next request is the probe
	// A minute without a steered request: the engine guesses its one seen
	// upstream again before the policy runs.
	e.seen.steeredAt.Store(time.Now().Add(-2 * steerForget).UnixNano())
	if w := brGet(e, next, "/probe"); w.Code != http.StatusOK {
		t.Fatalf("the probe to a healthy member: %d %q; the request competed with itself for the probe slot", w.Code, w.Header().Get("Cache-Status"))
	}
	if s := e.guard.breaker("a:80").State(); s != BreakerClosed {
		t.Errorf("after a good probe a:80 is %s, want closed", s)
	}
}

func TestACutRequestIsAnswered504WithNothingOfWhatArrivedTooLate(t *testing.T) {
	// next plays reverse_proxy whose upstream's header arrives just as the
	// timeout cuts the request: copied into the header map, then written
	// after the cut.
	next := func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("Content-Length", "5")
		w.Header().Set("X-Upstream", "late")
		<-r.Context().Done()
		if !errors.Is(context.Cause(r.Context()), ErrUpstreamTimeout) {
			return r.Context().Err()
		}
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("late!"))
		return nil
	}
	e := newBrEngine(t, func(c *Config) { c.Breaker.Timeout = 50 * time.Millisecond })
	for _, tc := range []struct {
		name, cacheStatus string
		header            []string
	}{
		{"leader", `caddy-coalesce; fwd=uri-miss; fwd-status=504; detail="upstream-timeout"`, nil},
		{"bypassed", `caddy-coalesce; fwd=bypass; fwd-status=504; detail="upstream-timeout"`, []string{"Range", "bytes=0-1"}},
	} {
		w := httptest.NewRecorder()
		r := httptest.NewRequest(http.MethodGet, "http://api.example/"+tc.name, nil)
		w.Header().Set("X-Before", "kept") // set by a handler in front
		if tc.header != nil {
			r.Header.Set(tc.header[0], tc.header[1])
		}
		err := e.Serve(w, r, next)
		var se *StatusError
		if !errors.As(err, &se) || se.Status != http.StatusGatewayTimeout || !errors.Is(err, ErrUpstreamTimeout) {
			t.Errorf("%s: %v, want a 504 StatusError for ErrUpstreamTimeout", tc.name, err)
		}
		h := w.Header()
		if w.Body.Len() != 0 || h.Get("Content-Length") != "" || h.Get("X-Upstream") != "" || h.Get("X-Before") != "kept" || h.Get("Cache-Status") != tc.cacheStatus {
			t.Errorf("%s: body %q header %v; want nothing of the late answer, X-Before kept, Cache-Status %q", tc.name, w.Body, h, tc.cacheStatus)
		}
	}
}

// The fleet's opening trips the breakers of the upstream that count
// failures, each once, and leaves alone one that trips on a ratio alone
// (not shared).
func TestFleetOpeningTripsOnlyBreakersThatCountFailures(t *testing.T) {
	var mu sync.Mutex
	var changes []BreakerChange
	set := NewBreakers(func(c BreakerChange) {
		mu.Lock()
		defer mu.Unlock()
		changes = append(changes, c)
	})
	counting := set.Breaker("u:80", BreakerConfig{Failures: 5, Open: time.Minute, Probes: 1})
	ratio := set.Breaker("u:80", BreakerConfig{Ratio: 0.5, MinRequests: 10, Window: time.Minute, Open: time.Minute, Probes: 1})
	set.fleetOpen("u:80", time.Now().Add(time.Minute))
	set.fleetOpen("u:80", time.Now().Add(time.Minute)) // told again: no second change
	if s := counting.State(); s != BreakerOpen {
		t.Errorf("the breaker that counts failures: %s, want open", s)
	}
	if s := ratio.State(); s != BreakerClosed {
		t.Errorf("the ratio-only breaker: %s, want closed (not shared)", s)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(changes) != 1 || changes[0].From != BreakerClosed || changes[0].To != BreakerOpen || !strings.Contains(changes[0].Reason, "fleet") {
		t.Errorf("changes %+v, want one closed to open by the fleet", changes)
	}
}
