package coalesce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// A response without a length that is not done 100ms after its first flush
// becomes a stream, and the breaker hears its outcome then, from the
// recorder's timer, while the handler still runs under the breaker's
// timeout. (Run with -race: the timeout's bookkeeping must not race with
// that report.)
func TestATrickleUnderTheBreakersTimeoutBecomesAStream(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.Breaker.Timeout = 5 * time.Second })
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("[1,2]"))
		http.NewResponseController(w).Flush()
		time.Sleep(300 * time.Millisecond) // well past the recorder's 100ms
	})
	srv := newServer(t, e.Handler(o))
	r := get(t, srv, "/trickle")
	if r.status != http.StatusOK || r.body != "[1,2]" || !strings.Contains(r.cacheStatus(), "detail=stream") {
		t.Errorf("trickle: %d %q (%q), want 200 [1,2] streamed", r.status, r.body, r.cacheStatus())
	}
}

// One timer serves every request of an engine (dueHeaders). Each request
// is still cut when its own timeout has passed, never earlier: a request
// sent later is cut later, and a request whose timer slot came first but
// that was answered in time moves nobody's cut.
func TestEachRequestIsCutAtItsOwnTimeout(t *testing.T) {
	const timeout = 300 * time.Millisecond
	e := newEngine(t, func(c *Config) { c.Breaker.Timeout = timeout })
	hang := func(w http.ResponseWriter, r *http.Request) error {
		<-r.Context().Done()
		return r.Context().Err()
	}
	quick := func(w http.ResponseWriter, r *http.Request) error {
		_, err := w.Write([]byte("ok"))
		return err
	}
	cutAfter := func(path string) <-chan time.Duration {
		return async(func() time.Duration {
			start := time.Now()
			err := e.Serve(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil), hang)
			if !errors.Is(err, ErrUpstreamTimeout) {
				t.Errorf("%s: %v, want the cut", path, err)
			}
			return time.Since(start)
		})
	}
	if err := e.Serve(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "http://api.example/quick", nil), quick); err != nil {
		t.Fatal(err)
	}
	first := cutAfter("/first")
	time.Sleep(timeout / 2) // the second's deadline comes half a timeout later
	second := cutAfter("/second")
	for name, ch := range map[string]<-chan time.Duration{"first": first, "second": second} {
		if took := receive(t, ch, name); took < timeout || took > timeout+2*time.Second {
			t.Errorf("the %s request was cut after %s, want %s (and not much more)", name, took, timeout)
		}
	}
	if b := e.guard.breaker(defaultUpstream).status(time.Now()).Counts; b.ConsecutiveFailures != 2 {
		t.Errorf("breaker counts %+v, want the two cuts as failures", b)
	}
}

// A leader's client is watched at once when the breaker's timeout is off,
// and from the queue of requests waiting for their headers when it is on
// (leaderWatchDelay): either way, a lone leader's client leaving cancels
// the upstream request nobody else waits for, and the flight counts as
// abandoned.
func TestALoneLeadersClientLeavingCancelsItsUpstreamRequest(t *testing.T) {
	for _, timeout := range []time.Duration{0, time.Minute} {
		t.Run(fmt.Sprintf("timeout %v", timeout), func(t *testing.T) {
			cancelled := make(chan struct{})
			o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
				<-r.Context().Done()
				close(cancelled)
			})
			e := newEngine(t, func(c *Config) { c.Breaker.Timeout = timeout })
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done, _ := serveAsync(e, ctx, o.next)
			waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
			began := time.Now()
			cancel()
			receive(t, async(func() struct{} { <-cancelled; return struct{}{} }), "upstream cancellation")
			if took := time.Since(began); took > bound/2 {
				t.Errorf("the upstream request was cancelled %v after its only client left", took)
			}
			receive(t, done, "the leader")
			if s := e.Stats().Registry; s.Abandoned != 1 {
				t.Errorf("abandoned flights = %d, want 1", s.Abandoned)
			}
		})
	}
}
