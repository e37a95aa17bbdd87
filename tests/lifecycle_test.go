package tests

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Clients that leave, upstreams that are gone, configs that change under a
// herd.

// waitFor polls cond every 5 ms until it holds or bound passes.
func waitFor(bound time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(bound)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

func TestFirstClientDisconnectingDoesNotFailTheOthers(t *testing.T) {
	// The upstream answers once the test lets it: after the leader's client
	// has gone.
	var cancelled atomic.Int64
	answer := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-answer:
			_, _ = fmt.Fprint(w, "worth the wait")
		case <-r.Context().Done():
			cancelled.Add(1)
		}
	})
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 11)
	url := baseURL + pathFor(t, "")

	// The leader: its client goes away once its followers are waiting.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var once sync.Once
	release := func() { once.Do(func() { close(answer) }) }
	defer release()
	leader := make(chan fetched, 1)
	go func() { leader <- getCtx(ctx, client, "GET", url) }()
	if !waitFor(2*time.Second, func() bool { return up.Calls() == 1 }) {
		t.Fatal("the leader's request never reached the upstream")
	}
	followers := make(chan []fetched, 1)
	go func() { followers <- herd(client, 10, "GET", url) }()
	if !waitFor(2*time.Second, func() bool { return followersWaiting(t, client, pathFor(t, "")) == 10 }) {
		t.Fatalf("the followers did not join the flight (waiting: %d)", followersWaiting(t, client, pathFor(t, "")))
	}
	cancel()
	if f := <-leader; f.err == nil {
		t.Errorf("the leader's client was cancelled but got %d %q", f.status, f.body)
	}
	// Caddy has seen the leader's client go when its flight answers the ten
	// followers alone.
	if !waitFor(2*time.Second, func() bool { return flightClients(t, client, pathFor(t, "")) == 10 }) {
		t.Fatalf("the flight still answers %d clients after the leader's went away, want its 10 followers", flightClients(t, client, pathFor(t, "")))
	}
	release()
	got := <-followers
	expectAll(t, got, http.StatusOK, "worth the wait")
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
	if n := cancelled.Load(); n != 0 {
		t.Errorf("the upstream request was cancelled %d time(s) although followers were waiting", n)
	}
}

func TestUpstreamRequestIsCancelledWhenAllClientsLeave(t *testing.T) {
	cancelledAt := make(chan time.Time, 1)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(10 * time.Second):
			_, _ = fmt.Fprint(w, "too late")
		case <-r.Context().Done():
			cancelledAt <- time.Now()
		}
	})
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 5)

	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	got := together(5, func(int) fetched { return getCtx(ctx, client, "GET", baseURL+pathFor(t, "")) })
	for i, f := range got {
		if f.err == nil {
			t.Errorf("client %d should have given up, got %d %q", i, f.status, f.body)
		}
	}

	select {
	case at := <-cancelledAt:
		if d := at.Sub(start); d > 2*time.Second {
			t.Errorf("the upstream saw the cancellation %s after the herd started; want well within 2s", d)
		} else {
			t.Logf("upstream request cancelled %s after the herd started (clients left at 200ms)", d.Round(time.Millisecond))
		}
	case <-time.After(3 * time.Second):
		t.Fatal("the upstream request was not cancelled after every client left")
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
}

func TestDeadUpstreamAnswers502FastForAHerd(t *testing.T) {
	dead := &upstream{addr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	startCaddy(t, site("ttl 500ms"), dead)
	client := newClient(t)
	warm(t, client, 20)

	start := time.Now()
	got := herd(client, 20, "GET", baseURL+pathFor(t, ""))
	took := time.Since(start)

	// A refused connection fails at once, so a herd can be several flights
	// one after another; after `failures` (5) of them the upstream's breaker
	// (on by default) is open and the rest are answered 503 + Retry-After
	// without a connection attempt. Either is a fast, honest answer.
	for i, f := range got {
		switch {
		case f.err == nil && f.status == http.StatusBadGateway:
		case f.err == nil && f.status == http.StatusServiceUnavailable && f.header.Get("Retry-After") != "" &&
			strings.Contains(f.header.Get("Cache-Status"), "detail=breaker-open"):
		default:
			t.Errorf("client %d: %d (err %v, Cache-Status %q), want 502, or 503 from the open breaker", i, f.status, f.err, f.header.Get("Cache-Status"))
		}
	}
	if took > 2*time.Second {
		t.Errorf("the herd took %s against a closed port; want < 2s", took)
	}
}

func TestConfigReloadDuringAHerdLosesNoRequest(t *testing.T) {
	// The upstream answers once the new config runs: the herd is in flight
	// across the whole reload.
	reloaded := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-reloaded:
		case <-time.After(10 * time.Second):
		case <-r.Context().Done():
			return
		}
		_, _ = fmt.Fprint(w, "survived")
	})
	startCaddy(t, site("ttl 100ms"), up)
	client := newClient(t)
	// Connections for the herd and for the requests during the reload, open
	// before it: net/http drops a request it reads on a connection the old
	// server accepted after its Shutdown began (conn.serve returns without
	// answering), and a client retries that only on a reused connection.
	// That is Caddy's and net/http's reload, not this module; the herd and
	// the requests on open connections are what the module must not lose.
	warm(t, client, 80)
	url := baseURL + pathFor(t, "")

	herdDone := make(chan []fetched, 1)
	go func() { herdDone <- herd(client, 30, "GET", url) }()
	if !waitFor(3*time.Second, func() bool { return followersWaiting(t, client, pathFor(t, "")) == 29 }) {
		t.Fatalf("the herd did not gather (upstream calls %d, followers waiting %d)", up.Calls(), followersWaiting(t, client, pathFor(t, "")))
	}

	// More requests keep arriving while the config changes.
	during := make(chan []fetched, 1)
	go func() {
		rounds := make([]chan []fetched, 8)
		for i := range rounds {
			rounds[i] = make(chan []fetched, 1)
			go func() { rounds[i] <- herd(client, 5, "GET", url) }()
			time.Sleep(50 * time.Millisecond)
		}
		var all []fetched
		for _, r := range rounds {
			all = append(all, <-r...)
		}
		during <- all
	}()

	took := reloadCaddy(t, site("ttl 300ms"), up)
	close(reloaded)
	t.Logf("the reload took %s with the herd in flight", took.Round(time.Millisecond))

	first := <-herdDone
	expectAll(t, first, http.StatusOK, "survived")
	expectAll(t, <-during, http.StatusOK, "survived")

	// The new config is the one running.
	cfg := get(client, "GET", fmt.Sprintf("http://127.0.0.1:%d/config/apps/http/servers", adminPort))
	if !strings.Contains(cfg.body, `"ttl":300000000`) {
		t.Errorf("after the reload the running config is %s", clip(cfg.body))
	}
	t.Logf("70 requests across a reload: %d upstream calls", up.Calls())
}
