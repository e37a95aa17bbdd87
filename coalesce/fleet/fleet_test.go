package fleet

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edge-coalesce/caddy-coalesce/internal/redistest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func open(t *testing.T, url, zone string, onOpen func(string, time.Time)) *Tier {
	t.Helper()
	tier, err := Open(Options{URL: url, Zone: zone, Prefix: "test:" + t.Name() + ":", OnBreakerOpen: onOpen})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tier.Close() })
	waitFor(t, "the tier to listen", tier.listening.Load)
	return tier
}

// waitFor waits up to 5s for an observable condition.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestFollowerWokenByLeadersEntry(t *testing.T) {
	srv := redistest.Start(t)
	a, b := open(t, srv.URL(), "z", nil), open(t, srv.URL(), "z", nil)
	ctx := context.Background()

	entry, _, lock, err := a.Lookup(ctx, "k1", 5*time.Second)
	if err != nil || entry != nil || lock == nil {
		t.Fatalf("first lookup: entry %q lock %v err %v; want the lock", entry, lock, err)
	}
	entry, _, lock2, err := b.Lookup(ctx, "k1", 5*time.Second)
	if err != nil || entry != nil || lock2 != nil {
		t.Fatalf("second lookup: entry %q lock %v err %v; want neither", entry, lock2, err)
	}
	got := make(chan []byte, 1)
	go func() {
		e, err := b.Wait(ctx, "k1", 5*time.Second)
		if err != nil {
			t.Errorf("wait: %v", err)
		}
		got <- e
	}()
	waitFor(t, "the follower to wait", func() bool { return b.Stats().Waits == 1 })
	start := time.Now()
	if err := lock.Finish(ctx, []byte("body"), time.Now().Add(time.Second), time.Now().Add(2*time.Second)); err != nil {
		t.Fatal(err)
	}
	if e := <-got; string(e) != "body" {
		t.Fatalf("follower got %q", e)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("follower woke %s after the entry was written", d)
	}
	// The entry answers the next lookup; another zone does not see it.
	if e, fresh, _, _ := b.Lookup(ctx, "k1", time.Second); string(e) != "body" || !fresh {
		t.Fatalf("lookup after finish: %q", e)
	}
	other := open(t, srv.URL(), "other", nil)
	if e, _, l, _ := other.Lookup(ctx, "k1", time.Second); e != nil || l == nil {
		t.Fatalf("another zone saw the entry %q", e)
	}
}

func TestFollowerOfALeaderWithoutEntryGoesAlone(t *testing.T) {
	srv := redistest.Start(t)
	a, b := open(t, srv.URL(), "z", nil), open(t, srv.URL(), "z", nil)
	ctx := context.Background()
	_, _, lock, _ := a.Lookup(ctx, "k", 5*time.Second)
	res := make(chan error, 1)
	go func() { _, err := b.Wait(ctx, "k", 5*time.Second); res <- err }()
	waitFor(t, "the follower to wait", func() bool { return b.Stats().Waits == 1 })
	lock.Finish(ctx, nil, time.Time{}, time.Time{})
	if err := <-res; !errors.Is(err, ErrNoEntry) {
		t.Fatalf("wait: %v, want ErrNoEntry", err)
	}
	// The lock is free again.
	if _, _, l, _ := b.Lookup(ctx, "k", time.Second); l == nil {
		t.Fatal("the lock was not released")
	}
}

func TestDeadLeadersLockExpires(t *testing.T) {
	srv := redistest.Start(t)
	a, b := open(t, srv.URL(), "z", nil), open(t, srv.URL(), "z", nil)
	ctx := context.Background()
	if _, _, lock, _ := a.Lookup(ctx, "k", 300*time.Millisecond); lock == nil {
		t.Fatal("no lock")
	}
	a.Close() // the leader dies without finishing
	start := time.Now()
	if _, err := b.Wait(ctx, "k", 200*time.Millisecond); !errors.Is(err, ErrWaitTimeout) {
		t.Fatalf("wait: %v, want a timeout", err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("waited %s for a 200ms limit", d)
	}
	waitFor(t, "the dead leader's lock to expire", func() bool {
		_, _, l, err := b.Lookup(ctx, "k", time.Second)
		return err == nil && l != nil
	})
}

func TestRedisDownActsAloneAndComesBack(t *testing.T) {
	srv := redistest.Start(t)
	var mu sync.Mutex
	var states []State
	tier, err := Open(Options{URL: srv.URL(), Prefix: "test:", Zone: "z", OnState: func(s State, _ error) {
		mu.Lock()
		states = append(states, s)
		mu.Unlock()
	}})
	if err != nil {
		t.Fatal(err)
	}
	defer tier.Close()
	ctx := context.Background()
	srv.Stop()
	calls := 0
	for tier.State() != StateDown {
		start := time.Now()
		if _, _, _, err := tier.Lookup(ctx, "k", time.Second); err == nil {
			t.Fatal("lookup succeeded with Redis down")
		}
		if d := time.Since(start); d > time.Second {
			t.Fatalf("a failed lookup took %s", d)
		}
		if calls++; calls > 10 {
			t.Fatal("the tier's breaker did not open")
		}
	}
	if _, _, _, err := tier.Lookup(ctx, "k", time.Second); !errors.Is(err, ErrDown) {
		t.Fatalf("lookup while down: %v, want ErrDown", err)
	}
	srv.Restart()
	waitFor(t, "the tier to come back", func() bool {
		_, _, _, err := tier.Lookup(ctx, "k2", time.Second)
		return err == nil && tier.State() == StateUp
	})
	waitFor(t, "the tier to listen again", tier.listening.Load)
	mu.Lock()
	defer mu.Unlock()
	want := []State{StateDown, StateProbing, StateUp}
	if len(states) != 3 || states[0] != want[0] || states[1] != want[1] || states[2] != want[2] {
		t.Fatalf("state changes %v, want %v", states, want)
	}
}

// A follower waiting for another server's fleet leader when Redis dies
// would never hear its wake-up: it is released as soon as the subscription
// breaks, not when its wait runs out.
func TestFollowerReleasedWhenRedisDies(t *testing.T) {
	srv := redistest.Start(t)
	a, b := open(t, srv.URL(), "z", nil), open(t, srv.URL(), "z", nil)
	ctx := context.Background()
	if _, _, lock, err := a.Lookup(ctx, "k", 30*time.Second); err != nil || lock == nil {
		t.Fatalf("first lookup: lock %v err %v; want the lock", lock, err)
	}
	if _, _, lock, err := b.Lookup(ctx, "k", 30*time.Second); err != nil || lock != nil {
		t.Fatalf("second lookup: lock %v err %v; want a follower", lock, err)
	}
	const limit = 30 * time.Second
	res := make(chan error, 1)
	go func() { _, err := b.Wait(ctx, "k", limit); res <- err }()
	waitFor(t, "the follower to wait", func() bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		return len(b.waiters["k"]) == 1
	})
	srv.Stop()
	start := time.Now()
	select {
	case err := <-res:
		if err == nil || errors.Is(err, ErrWaitTimeout) {
			t.Fatalf("wait: %v, want the follower sent on its own", err)
		}
		t.Logf("released %s after Redis died: %v", time.Since(start).Round(time.Millisecond), err)
	case <-time.After(limit / 3):
		t.Fatalf("the follower still waits %s after Redis died", limit/3)
	}
}

func TestFleetBreakerOpensEverywhere(t *testing.T) {
	srv := redistest.Start(t)
	var mu sync.Mutex
	opened := map[string]int{}
	note := func(name string) func(string, time.Time) {
		return func(up string, until time.Time) {
			mu.Lock()
			opened[name+" "+up]++
			mu.Unlock()
		}
	}
	a := open(t, srv.URL(), "z", note("a"))
	b := open(t, srv.URL(), "z", note("b"))
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if until, err := a.Failure(ctx, "api:80", 3, time.Minute, time.Second); err != nil || !until.IsZero() {
			t.Fatalf("failure %d: %v %v", i, until, err)
		}
	}
	if err := b.Success(ctx, "api:80"); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		a.Failure(ctx, "api:80", 3, time.Minute, time.Second)
	}
	until, err := b.Failure(ctx, "api:80", 3, time.Minute, time.Second)
	if err != nil || until.IsZero() {
		t.Fatalf("third failure after the success did not open: %v", err)
	}
	waitFor(t, "both servers to hear of the opening", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return opened["a api:80"] >= 1 && opened["b api:80"] >= 1
	})
}

func TestParseURL(t *testing.T) {
	for _, u := range []string{"redis://127.0.0.1:6379", "rediss://u:p@h:6380/2", "redis://:secret@h:1/0"} {
		if _, err := ParseURL(u); err != nil {
			t.Errorf("%s: %v", u, err)
		}
	}
	for _, u := range []string{"http://h:1", "h:6379", "redis://h:1/notadb", "redis://127.0.0.1:99999", "redis://h:0", "redis://h:-1"} {
		if _, err := ParseURL(u); err == nil {
			t.Errorf("%s: no error", u)
		}
	}
	_, err := ParseURL("http://u:hunter2@h:1")
	if err == nil || contains(err.Error(), "hunter2") {
		t.Errorf("the error shows the password: %v", err)
	}
}

func TestValidateTimeout(t *testing.T) {
	for _, d := range []time.Duration{0, time.Millisecond, DefaultTimeout, MaxTimeout} {
		if err := (Options{URL: "redis://h:1", Timeout: d}).Validate(); err != nil {
			t.Errorf("timeout %s: %v", d, err)
		}
	}
	for _, d := range []time.Duration{-time.Millisecond, time.Nanosecond, 999 * time.Microsecond, MaxTimeout + time.Millisecond} {
		err := (Options{URL: "redis://h:1", Timeout: d}).Validate()
		if err == nil || !contains(err.Error(), "from 1ms to 10s") {
			t.Errorf("timeout %s: %v, want the range in the error", d, err)
		}
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// The Redis client's own complaints about a Redis that went away (its
// failed dials) go where SetClientLogger says,
// not to the process's standard error.
func TestClientMessagesGoToTheGivenLogger(t *testing.T) {
	var mu sync.Mutex
	var got []string
	SetClientLogger(func(msg string) {
		mu.Lock()
		got = append(got, msg)
		mu.Unlock()
	})
	t.Cleanup(func() { SetClientLogger(func(string) {}) })
	srv := redistest.Start(t)
	tier := open(t, srv.URL(), "z", nil)
	waitFor(t, "the tier to listen", tier.listening.Load)
	srv.Stop()
	waitFor(t, "a message of the Redis client", func() bool {
		tier.Lookup(context.Background(), "k", time.Second) // dials a Redis that is gone
		mu.Lock()
		defer mu.Unlock()
		return len(got) > 0
	})
	mu.Lock()
	defer mu.Unlock()
	if !strings.Contains(strings.Join(got, "\n"), "redis") {
		t.Errorf("the client's messages: %q", got)
	}
}
