package registry_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// bound is how long a test waits for something that should be prompt. It is
// generous so that a loaded CI machine under -race does not fail the test.
const bound = 2 * time.Second

type result struct {
	v   string
	err error
}

// waitDone fails the test unless ctx is done within bound.
func waitDone(t *testing.T, ctx context.Context, what string) {
	t.Helper()
	select {
	case <-ctx.Done():
	case <-time.After(bound):
		t.Fatalf("%s: context not done after %v", what, bound)
	}
}

// receive fails the test unless ch delivers within bound.
func receive(t *testing.T, ch <-chan result, what string) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(bound):
		t.Fatalf("%s: no result after %v", what, bound)
		return result{}
	}
}

// wait runs f.Wait in a goroutine and delivers its result on the channel.
func wait(f *registry.Flight[string], ctx context.Context, maxWait time.Duration) <-chan result {
	ch := make(chan result, 1)
	go func() {
		v, err := f.Wait(ctx, maxWait)
		ch <- result{v, err}
	}()
	return ch
}

// clientsOf is how many clients the flight for key answers now, as Inflight
// reports them (-1: no such flight).
func clientsOf(r *registry.Registry[string], key string) int {
	n := -1
	r.Inflight(0, func(fi registry.FlightInfo) {
		if fi.Key == key {
			n = fi.Clients
		}
	})
	return n
}

// waitClients fails the test unless the flight for key comes to answer n
// clients within bound.
func waitClients(t *testing.T, r *registry.Registry[string], key string, n int) {
	t.Helper()
	deadline := time.Now().Add(bound)
	for clientsOf(r, key) != n {
		if time.Now().After(deadline) {
			t.Fatalf("flight %q answers %d clients after %v, want %d", key, clientsOf(r, key), bound, n)
		}
		time.Sleep(time.Millisecond)
	}
}

func mustJoin(t *testing.T, r *registry.Registry[string], ctx context.Context, key string, want registry.Role) *registry.Flight[string] {
	t.Helper()
	f, role := r.Join(ctx, key, "note "+key)
	if role != want {
		t.Fatalf("Join(%q) role = %v, want %v", key, role, want)
	}
	if (f == nil) != (want == registry.Rejected) {
		t.Fatalf("Join(%q) as %v returned flight %v", key, role, f)
	}
	return f
}

func checkIdle(t *testing.T, r *registry.Registry[string]) {
	t.Helper()
	if s := r.Stats(); s.ActiveKeys != 0 || s.Waiters != 0 {
		t.Errorf("after everyone left: ActiveKeys=%d Waiters=%d, want 0 and 0", s.ActiveKeys, s.Waiters)
	}
}

func TestHundredConcurrentJoinsOneLeader(t *testing.T) {
	const n = 100
	r := registry.New[string](registry.Options{})
	start := make(chan struct{})
	var joined, done sync.WaitGroup
	joined.Add(n)
	done.Add(n)
	var leaders, followers atomic.Int32
	results := make(chan result, n)
	for range n {
		go func() {
			defer done.Done()
			<-start
			f, role := r.Join(context.Background(), "GET /api/sessions", "")
			joined.Done()
			switch role {
			case registry.Leader:
				leaders.Add(1)
				// Publish only once everyone has joined: a Join after
				// Publish rightly starts a new flight.
				joined.Wait()
				f.Publish("sessions", nil)
				f.Leave()
			case registry.Follower:
				followers.Add(1)
				v, err := f.Wait(context.Background(), 0)
				results <- result{v, err}
			default:
				t.Errorf("Join role = %v", role)
			}
		}()
	}
	close(start)
	done.Wait()
	close(results)

	if leaders.Load() != 1 || followers.Load() != n-1 {
		t.Fatalf("leaders=%d followers=%d, want 1 and %d", leaders.Load(), followers.Load(), n-1)
	}
	for res := range results {
		if res.v != "sessions" || res.err != nil {
			t.Errorf("follower got (%q, %v), want (\"sessions\", nil)", res.v, res.err)
		}
	}
	s := r.Stats()
	if s.Flights != 1 || s.Collapsed != n-1 || s.Published != 1 || s.Rejected != 0 {
		t.Errorf("Stats = %+v, want Flights=1 Collapsed=%d Published=1 Rejected=0", s, n-1)
	}
	if s.Joined() != n {
		t.Errorf("Joined() = %d, want %d", s.Joined(), n)
	}
	checkIdle(t, r)
}

func TestDistinctKeysNeverShare(t *testing.T) {
	const keys, perKey = 50, 20
	r := registry.New[string](registry.Options{})
	start := make(chan struct{})
	var joined, done sync.WaitGroup
	joined.Add(keys * perKey)
	done.Add(keys * perKey)
	for k := range keys {
		key := fmt.Sprintf("/item/%d", k)
		for range perKey {
			go func() {
				defer done.Done()
				<-start
				f, role := r.Join(context.Background(), key, "")
				joined.Done()
				switch role {
				case registry.Leader:
					joined.Wait()
					f.Publish("value of "+key, nil)
					f.Leave()
				case registry.Follower:
					v, err := f.Wait(context.Background(), 0)
					if v != "value of "+key || err != nil {
						t.Errorf("follower of %q got (%q, %v)", key, v, err)
					}
				default:
					t.Errorf("Join role = %v", role)
				}
			}()
		}
	}
	close(start)
	done.Wait()

	s := r.Stats()
	if s.Flights != keys || s.Collapsed != keys*(perKey-1) {
		t.Errorf("Flights=%d Collapsed=%d, want %d and %d", s.Flights, s.Collapsed, keys, keys*(perKey-1))
	}
	checkIdle(t, r)
}

func TestFollowerSurvivesLeaderCancel(t *testing.T) {
	r := registry.New[string](registry.Options{})
	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	defer cancelLeader()
	leader := mustJoin(t, r, leaderCtx, "k", registry.Leader)
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)
	got := wait(follower, context.Background(), 0)
	waitClients(t, r, "k", 2)

	cancelLeader()
	// The leader's client is gone but its follower is not: the work goes on.
	// Once the flight no longer counts the leader's client, the watch on it
	// has run.
	waitClients(t, r, "k", 1)
	if err := leader.Context().Err(); err != nil {
		t.Fatalf("flight context cancelled with a follower still waiting: %v", err)
	}

	leader.Publish("v", nil)
	leader.Leave()
	if res := receive(t, got, "follower"); res.v != "v" || res.err != nil {
		t.Fatalf("follower got (%q, %v), want (\"v\", nil)", res.v, res.err)
	}
	// Done and everyone gone: the flight context is released.
	waitDone(t, leader.Context(), "flight after everyone left")
	if s := r.Stats(); s.Abandoned != 0 {
		t.Errorf("Abandoned = %d, want 0", s.Abandoned)
	}
	checkIdle(t, r)
}

func TestLastClientLeavingCancelsFlight(t *testing.T) {
	r := registry.New[string](registry.Options{})
	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	defer cancelLeader()
	followerCtx, cancelFollower := context.WithCancel(context.Background())
	defer cancelFollower()
	leader := mustJoin(t, r, leaderCtx, "k", registry.Leader)
	follower := mustJoin(t, r, followerCtx, "k", registry.Follower)
	got := wait(follower, followerCtx, 0)

	cancelLeader()
	cancelFollower()
	if res := receive(t, got, "follower"); !errors.Is(res.err, context.Canceled) {
		t.Fatalf("follower got (%q, %v), want context.Canceled", res.v, res.err)
	}
	waitDone(t, leader.Context(), "flight with every client gone")
	if s := r.Stats(); s.Abandoned != 1 {
		t.Errorf("Abandoned = %d, want 1", s.Abandoned)
	}

	// Nobody should wait for a cancelled call: the next client starts afresh.
	next := mustJoin(t, r, context.Background(), "k", registry.Leader)
	if next == leader {
		t.Fatal("the new Join was handed the cancelled flight")
	}
	if err := next.Context().Err(); err != nil {
		t.Fatalf("new flight context: %v", err)
	}
	// The old leader finishing late must not disturb the new flight.
	leader.Leave()
	late := mustJoin(t, r, context.Background(), "k", registry.Follower)
	next.Publish("fresh", nil)
	next.Leave()
	if v, err := late.Wait(context.Background(), 0); v != "fresh" || err != nil {
		t.Fatalf("follower of the new flight got (%q, %v)", v, err)
	}
	checkIdle(t, r)
}

func TestWaitTimeout(t *testing.T) {
	r := registry.New[string](registry.Options{})
	leader := mustJoin(t, r, context.Background(), "k", registry.Leader)
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)

	begin := time.Now()
	_, err := follower.Wait(context.Background(), 20*time.Millisecond)
	elapsed := time.Since(begin)
	if !errors.Is(err, registry.ErrWaitTimeout) {
		t.Fatalf("Wait = %v, want ErrWaitTimeout", err)
	}
	if elapsed < 20*time.Millisecond || elapsed > time.Second {
		t.Errorf("Wait gave up after %v, want 20ms..1s", elapsed)
	}
	if s := r.Stats(); s.TimedOut != 1 || s.Waiters != 0 {
		t.Errorf("TimedOut=%d Waiters=%d, want 1 and 0", s.TimedOut, s.Waiters)
	}
	// The leader's client is still there: the follower giving up does not
	// cancel the work.
	if err := leader.Context().Err(); err != nil {
		t.Errorf("flight context cancelled by a follower timing out: %v", err)
	}
	leader.Leave()
	waitDone(t, leader.Context(), "flight after the leader left")
	checkIdle(t, r)
}

func TestLeaveWithoutPublishReleasesFollowers(t *testing.T) {
	r := registry.New[string](registry.Options{})
	leader := mustJoin(t, r, context.Background(), "k", registry.Leader)
	var waits []<-chan result
	for range 3 {
		f := mustJoin(t, r, context.Background(), "k", registry.Follower)
		waits = append(waits, wait(f, context.Background(), 0))
	}
	leader.Leave() // e.g. after a panic: no Publish
	for i, ch := range waits {
		if res := receive(t, ch, fmt.Sprint("follower ", i)); !errors.Is(res.err, registry.ErrAbandoned) {
			t.Errorf("follower %d got (%q, %v), want ErrAbandoned", i, res.v, res.err)
		}
	}
	waitDone(t, leader.Context(), "flight after everyone left")
	checkIdle(t, r)
}

func TestPublishIsIdempotent(t *testing.T) {
	r := registry.New[string](registry.Options{})
	leader := mustJoin(t, r, context.Background(), "k", registry.Leader)
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)
	leader.Publish("first", nil)
	leader.Publish("second", errors.New("second"))
	leader.Leave() // publishes ErrAbandoned if nothing was published; here it must not
	if v, err := follower.Wait(context.Background(), 0); v != "first" || err != nil {
		t.Fatalf("follower got (%q, %v), want (\"first\", nil)", v, err)
	}
	if s := r.Stats(); s.Published != 1 {
		t.Errorf("Published = %d, want 1", s.Published)
	}
	checkIdle(t, r)
}

func TestPublishedFlightIsNotJoined(t *testing.T) {
	r := registry.New[string](registry.Options{})
	first := mustJoin(t, r, context.Background(), "k", registry.Leader)
	first.Publish("old", nil)
	// The first leader has not left yet, but its result is out: a client
	// arriving now must not be handed a result older than its request.
	second := mustJoin(t, r, context.Background(), "k", registry.Leader)
	if second == first {
		t.Fatal("Join after Publish returned the published flight")
	}
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)
	first.Leave()
	second.Publish("new", nil)
	second.Leave()
	if v, err := follower.Wait(context.Background(), 0); v != "new" || err != nil {
		t.Fatalf("follower got (%q, %v), want (\"new\", nil)", v, err)
	}
	if s := r.Stats(); s.Flights != 2 || s.Collapsed != 1 {
		t.Errorf("Flights=%d Collapsed=%d, want 2 and 1", s.Flights, s.Collapsed)
	}
	checkIdle(t, r)
}

func TestMaxFlightsRejects(t *testing.T) {
	r := registry.New[string](registry.Options{MaxFlights: 2})
	a := mustJoin(t, r, context.Background(), "a", registry.Leader)
	b := mustJoin(t, r, context.Background(), "b", registry.Leader)
	mustJoin(t, r, context.Background(), "c", registry.Rejected)
	// A key already in flight takes no new slot.
	fa := mustJoin(t, r, context.Background(), "a", registry.Follower)
	if s := r.Stats(); s.Rejected != 1 || s.ActiveKeys != 2 || s.Flights != 2 {
		t.Errorf("Stats = %+v, want Rejected=1 ActiveKeys=2 Flights=2", s)
	}

	a.Publish("a", nil)
	a.Leave()
	if v, err := fa.Wait(context.Background(), 0); v != "a" || err != nil {
		t.Fatalf("follower of a got (%q, %v)", v, err)
	}
	// The slot a held is free again.
	c := mustJoin(t, r, context.Background(), "c", registry.Leader)
	mustJoin(t, r, context.Background(), "d", registry.Rejected)
	if s := r.Stats(); s.Rejected != 2 {
		t.Errorf("Rejected = %d, want 2", s.Rejected)
	}
	b.Leave()
	c.Leave()
	checkIdle(t, r)
}

// MaxFlights holds even when Joins and Leads for new keys race on different
// shards.
func TestMaxFlightsHoldsUnderConcurrentJoins(t *testing.T) {
	const limit, clients = 3, 64
	for round := range 450 {
		mode := round % 3 // 0: all Join, 1: all Lead, 2: both
		r := registry.New[string](registry.Options{MaxFlights: limit})
		start := make(chan struct{})
		var wg sync.WaitGroup
		var mu sync.Mutex
		var led []*registry.Flight[string]
		var joinsRejected atomic.Uint64
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				key := fmt.Sprint("key-", i)
				var f *registry.Flight[string]
				if mode == 0 || mode == 2 && i%2 == 0 {
					var role registry.Role
					f, role = r.Join(context.Background(), key, "")
					if role == registry.Rejected {
						joinsRejected.Add(1)
					}
				} else {
					f, _ = r.Lead(context.Background(), key, "")
				}
				if f != nil {
					mu.Lock()
					led = append(led, f)
					mu.Unlock()
				}
			}()
		}
		close(start)
		wg.Wait()
		if len(led) != limit {
			t.Fatalf("round %d (mode %d): %d leaders with MaxFlights=%d", round, mode, len(led), limit)
		}
		if s := r.Stats(); s.Rejected != joinsRejected.Load() || s.ActiveKeys != limit {
			t.Fatalf("round %d: Rejected=%d ActiveKeys=%d, want %d and %d", round, s.Rejected, s.ActiveKeys, joinsRejected.Load(), limit)
		}
		for _, f := range led {
			f.Leave()
		}
		checkIdle(t, r)
	}
}

func TestLeadStartsAFlightOnlyWhenNoneRuns(t *testing.T) {
	r := registry.New[string](registry.Options{MaxFlights: 2})
	refresh, ok := r.Lead(context.Background(), "k", "refresh")
	if !ok || refresh == nil {
		t.Fatalf("Lead on an idle key = (%v, %v), want a flight", refresh, ok)
	}
	if f, ok := r.Lead(context.Background(), "k", "refresh"); ok || f != nil {
		t.Fatalf("second Lead while the first runs = (%v, %v), want (nil, false)", f, ok)
	}
	if !r.Running("k") || r.Running("idle") {
		t.Errorf("Running: k %v, idle %v; want true, false", r.Running("k"), r.Running("idle"))
	}
	// A client arriving during the refresh waits for it.
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)

	other := mustJoin(t, r, context.Background(), "other", registry.Leader)
	if f, ok := r.Lead(context.Background(), "third", ""); ok || f != nil {
		t.Fatalf("Lead beyond MaxFlights = (%v, %v), want (nil, false)", f, ok)
	}
	if s := r.Stats(); s.Flights != 2 || s.Collapsed != 1 || s.Rejected != 0 {
		t.Errorf("Stats = %+v, want Flights=2 Collapsed=1 Rejected=0 (a refused Lead is not counted)", s)
	}

	refresh.Publish("fresh", nil)
	refresh.Leave()
	if v, err := follower.Wait(context.Background(), 0); v != "fresh" || err != nil {
		t.Fatalf("follower got (%q, %v)", v, err)
	}
	other.Leave()
	again, ok := r.Lead(context.Background(), "k", "refresh")
	if !ok {
		t.Fatal("Lead after the refresh finished was refused")
	}
	again.Leave()
	waitDone(t, again.Context(), "refresh flight after Leave")
	if r.Running("k") {
		t.Error("Running(k) after its flight left")
	}
	checkIdle(t, r)
}

func TestFollowJoinsOnlyARunningFlight(t *testing.T) {
	r := registry.New[string](registry.Options{})
	if f, ok := r.Follow("k"); ok || f != nil {
		t.Fatalf("Follow with nothing in flight = (%v, %v), want (nil, false)", f, ok)
	}
	if s := r.Stats(); s.Flights != 0 || s.Collapsed != 0 {
		t.Errorf("a refused Follow was counted: %+v", s)
	}
	leader := mustJoin(t, r, context.Background(), "k", registry.Leader)
	f, ok := r.Follow("k")
	if !ok || f != leader {
		t.Fatalf("Follow while k runs = (%v, %v), want its flight", f, ok)
	}
	leader.Publish("v", nil)
	leader.Leave()
	if v, err := f.Wait(context.Background(), 0); v != "v" || err != nil {
		t.Fatalf("follower got (%q, %v)", v, err)
	}
	if s := r.Stats(); s.Collapsed != 1 {
		t.Errorf("Collapsed = %d, want 1", s.Collapsed)
	}
	checkIdle(t, r)
}

// Lead's work is done on nobody's behalf: its context is the bound of the
// work, and followers that join it do not extend it.
func TestLeadFlightEndsWithItsContextEvenWithFollowers(t *testing.T) {
	r := registry.New[string](registry.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	refresh, ok := r.Lead(ctx, "k", "refresh")
	if !ok {
		t.Fatal("Lead refused")
	}
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)
	got := wait(follower, context.Background(), 0)
	cancel()
	waitDone(t, refresh.Context(), "refresh flight after its context ended")
	refresh.Publish("late", nil)
	refresh.Leave()
	if res := receive(t, got, "follower"); res.v != "late" {
		t.Errorf("follower got %+v", res)
	}
	checkIdle(t, r)
}

func TestMaxFollowersRejects(t *testing.T) {
	r := registry.New[string](registry.Options{MaxFollowers: 2})
	leader := mustJoin(t, r, context.Background(), "k", registry.Leader)
	ctx1, cancel1 := context.WithCancel(context.Background())
	defer cancel1()
	f1 := mustJoin(t, r, ctx1, "k", registry.Follower)
	f2 := mustJoin(t, r, context.Background(), "k", registry.Follower)
	mustJoin(t, r, context.Background(), "k", registry.Rejected)
	if s := r.Stats(); s.Rejected != 1 || s.Collapsed != 2 || s.Waiters != 2 {
		t.Errorf("Stats = %+v, want Rejected=1 Collapsed=2 Waiters=2", s)
	}
	if leader.Waiters() != 2 {
		t.Errorf("Waiters() = %d, want 2", leader.Waiters())
	}

	// The bound is on followers waiting now: one leaving makes room.
	cancel1()
	if _, err := f1.Wait(ctx1, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled follower: %v", err)
	}
	f3 := mustJoin(t, r, context.Background(), "k", registry.Follower)

	leader.Publish("v", nil)
	leader.Leave()
	for i, f := range []*registry.Flight[string]{f2, f3} {
		if v, err := f.Wait(context.Background(), 0); v != "v" || err != nil {
			t.Errorf("follower %d got (%q, %v)", i, v, err)
		}
	}
	checkIdle(t, r)
}

func TestFlightContextKeepsValues(t *testing.T) {
	type ctxKey struct{}
	r := registry.New[string](registry.Options{})
	ctx := context.WithValue(context.Background(), ctxKey{}, "request-id-42")
	ctx, cancel := context.WithTimeout(ctx, time.Hour)
	defer cancel()
	leader := mustJoin(t, r, ctx, "k", registry.Leader)

	fctx := leader.Context()
	if got := fctx.Value(ctxKey{}); got != "request-id-42" {
		t.Errorf("flight context value = %v, want request-id-42", got)
	}
	// The leader client's deadline is part of its cancellation, not the
	// flight's.
	if d, ok := fctx.Deadline(); ok {
		t.Errorf("flight context has the client's deadline %v", d)
	}
	leader.Leave()
	waitDone(t, fctx, "flight after the leader left")
	if got := fctx.Value(ctxKey{}); got != "request-id-42" {
		t.Errorf("flight context value after Leave = %v", got)
	}
}

func TestLifetimeStats(t *testing.T) {
	r := registry.New[string](registry.Options{})
	if s := r.Stats(); s.AverageLifetime != 0 || s.MaxLifetime != 0 {
		t.Fatalf("before any flight: average=%v max=%v", s.AverageLifetime, s.MaxLifetime)
	}
	for _, d := range []time.Duration{5 * time.Millisecond, 10 * time.Millisecond} {
		f := mustJoin(t, r, context.Background(), "k", registry.Leader)
		time.Sleep(d)
		f.Publish("v", nil)
		f.Leave()
	}
	s := r.Stats()
	if s.Published != 2 {
		t.Fatalf("Published = %d, want 2", s.Published)
	}
	// Each flight lived at least as long as its sleep; allow any slowness.
	if s.MaxLifetime < 10*time.Millisecond || s.MaxLifetime > 5*time.Second {
		t.Errorf("MaxLifetime = %v, want 10ms..5s", s.MaxLifetime)
	}
	if s.AverageLifetime < 7500*time.Microsecond || s.AverageLifetime > s.MaxLifetime {
		t.Errorf("AverageLifetime = %v, want 7.5ms..MaxLifetime (%v)", s.AverageLifetime, s.MaxLifetime)
	}
}

func TestInflightListsFlights(t *testing.T) {
	r := registry.New[string](registry.Options{})
	before := time.Now()
	var leaders, followers []*registry.Flight[string]
	for _, key := range []string{"a", "b", "c"} {
		f, _ := r.Join(context.Background(), key, "GET /"+key)
		leaders = append(leaders, f)
	}
	for range 2 {
		followers = append(followers, mustJoin(t, r, context.Background(), "b", registry.Follower))
	}

	seen := map[string]registry.FlightInfo{}
	r.Inflight(0, func(fi registry.FlightInfo) { seen[fi.Key] = fi })
	if len(seen) != 3 {
		t.Fatalf("Inflight(0) listed %d flights, want 3: %v", len(seen), seen)
	}
	for _, key := range []string{"a", "b", "c"} {
		fi := seen[key]
		wantWaiters := 0
		if key == "b" {
			wantWaiters = 2
		}
		if fi.Note != "GET /"+key || fi.Waiters != wantWaiters || fi.Clients != wantWaiters+1 || fi.Started.Before(before) {
			t.Errorf("flight %q: %+v, want note %q, %d waiters, %d clients, started after %v", key, fi, "GET /"+key, wantWaiters, wantWaiters+1, before)
		}
	}
	for _, limit := range []int{1, 2, 3, 10, -1} {
		n := 0
		r.Inflight(limit, func(registry.FlightInfo) { n++ })
		want := 3
		if limit > 0 && limit < 3 {
			want = limit
		}
		if n != want {
			t.Errorf("Inflight(%d) listed %d flights, want %d", limit, n, want)
		}
	}

	for _, f := range leaders {
		f.Publish("v", nil)
		f.Leave()
	}
	for _, f := range followers {
		f.Wait(context.Background(), 0)
	}
	r.Inflight(0, func(fi registry.FlightInfo) { t.Errorf("still listed after publish: %+v", fi) })
	checkIdle(t, r)
}

func TestRoleString(t *testing.T) {
	for role, want := range map[registry.Role]string{
		registry.Leader: "leader", registry.Follower: "follower", registry.Rejected: "rejected",
	} {
		if role.String() != want {
			t.Errorf("%d.String() = %q, want %q", role, role.String(), want)
		}
	}
}

// Many clients on few keys, with clients disconnecting and leaders
// publishing, failing or leaving at random: every follower gets its own key's
// value or a documented error, nobody hangs, and nothing is left behind.
func TestStressRandomJoinsCancelsAndLeaves(t *testing.T) {
	const keys, clients = 8, 2000
	errUpstream := errors.New("upstream failed")
	r := registry.New[string](registry.Options{})
	start := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var flights []*registry.Flight[string]
	var followersServed atomic.Int64
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)

	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, uint64(i)))
			key := fmt.Sprint("key-", rng.IntN(keys))
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if rng.IntN(3) == 0 { // this client disconnects at some point
				timer := time.AfterFunc(time.Duration(rng.IntN(3000))*time.Microsecond, cancel)
				defer timer.Stop()
			}
			<-start
			time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)

			f, role := r.Join(ctx, key, "stress")
			switch role {
			case registry.Leader:
				mu.Lock()
				flights = append(flights, f)
				mu.Unlock()
				time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
				switch rng.IntN(4) {
				case 0:
					f.Leave() // without a result
				case 1:
					f.Publish("", errUpstream)
					f.Leave()
				default:
					f.Publish("value of "+key, nil)
					f.Leave()
				}
			case registry.Follower:
				maxWait := time.Duration(0)
				if rng.IntN(2) == 0 {
					maxWait = time.Duration(1+rng.IntN(3000)) * time.Microsecond
				}
				v, err := f.Wait(ctx, maxWait)
				switch {
				case err == nil:
					if v != "value of "+key {
						t.Errorf("follower of %q got %q", key, v)
					}
					followersServed.Add(1)
				case errors.Is(err, errUpstream), errors.Is(err, registry.ErrAbandoned),
					errors.Is(err, registry.ErrWaitTimeout), errors.Is(err, context.Canceled):
				default:
					t.Errorf("follower of %q: unexpected error %v", key, err)
				}
			default:
				t.Errorf("Join role = %v with default bounds", role)
			}
		}()
	}

	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	close(start)
	select {
	case <-finished:
	case <-time.After(5 * time.Second):
		t.Fatal("clients still running after 5s: someone hangs")
	}

	s := r.Stats()
	t.Logf("stats %+v, followers served %d", s, followersServed.Load())
	if s.Joined() != clients {
		t.Errorf("Joined() = %d, want %d", s.Joined(), clients)
	}
	if s.Published != s.Flights || int(s.Flights) != len(flights) {
		t.Errorf("Flights=%d Published=%d leaders=%d: every leader publishes exactly once", s.Flights, s.Published, len(flights))
	}
	if s.Abandoned > s.Flights {
		t.Errorf("Abandoned=%d > Flights=%d", s.Abandoned, s.Flights)
	}
	checkIdle(t, r)
	// Every flight's context is released once its clients are gone.
	for _, f := range flights {
		waitDone(t, f.Context(), "flight "+f.Key())
	}
}

func TestAnUnwatchedLeadersClientCountsUntilItIsWatched(t *testing.T) {
	r := registry.New[string](registry.Options{})
	leaderCtx, cancelLeader := context.WithCancel(context.Background())
	f, role := r.JoinUnwatched(leaderCtx, "k", "note k")
	if role != registry.Leader {
		t.Fatalf("role = %v, want Leader", role)
	}
	cancelLeader()
	// Nobody watches the client yet: its flight goes on, and a newcomer
	// joins it instead of starting another.
	follower := mustJoin(t, r, context.Background(), "k", registry.Follower)
	if err := f.Context().Err(); err != nil {
		t.Fatalf("the flight ended (%v) before its leader's client was watched", err)
	}
	got := wait(follower, context.Background(), 0)
	// Watched now: the client has gone already, so the leader no longer
	// counts, and the flight ends with its last client, the follower.
	if n := clientsOf(r, "k"); n != 2 {
		t.Fatalf("clients = %d before the watch, want 2 (the leader's and the follower)", n)
	}
	f.WatchLeader()
	f.WatchLeader() // a second call changes nothing
	waitClients(t, r, "k", 1)
	f.Publish("v", nil)
	if res := receive(t, got, "follower"); res.v != "v" || res.err != nil {
		t.Fatalf("follower got (%q, %v), want (v, nil)", res.v, res.err)
	}
	waitDone(t, f.Context(), "flight with every client gone")
	f.Leave()
	checkIdle(t, r)

	// A leader that leaves before its client is watched is released by
	// Leave, once; a watch asked for afterwards starts nothing.
	g, _ := r.JoinUnwatched(context.Background(), "k2", "note k2")
	g.Publish("w", nil)
	g.Leave()
	g.WatchLeader()
	waitDone(t, g.Context(), "flight after its leader left")
	checkIdle(t, r)
}
