package coalesce

import (
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
	"github.com/edge-coalesce/caddy-coalesce/internal/redistest"
)

// server is one server of a fleet: its engine, its own breakers (as a
// separate process would have), in front of its own connection to the
// upstream.
type server struct {
	e   *Engine
	srv *httptest.Server
}

// newFleet starts n servers sharing redis, each in front of o.
func newFleet(t *testing.T, redis *redistest.Server, n int, o *origin, change func(*Config)) []server {
	t.Helper()
	var out []server
	for range n {
		e := newEngine(t, func(c *Config) {
			// A generous timeout: on a loaded machine under -race, 50ms
			// would send a herd's leaders upstream alone.
			c.Shared = &fleet.Options{URL: redis.URL(), Zone: "z", Prefix: "test:", Timeout: time.Second}
			if change != nil {
				change(c)
			}
		})
		out = append(out, server{e: e, srv: newServer(t, e.Handler(o))})
	}
	for i, s := range out {
		waitFor(t, fmt.Sprintf("server %d to listen to the fleet", i), func() bool { return s.e.Stats().Shared.Listening })
	}
	return out
}

// getAs is a GET to one server of the fleet, with the Host every server
// is sent behind a load balancer.
func getAs(t *testing.T, s server, path string, headers ...string) reply {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, s.srv.URL+path, nil)
	if err != nil {
		t.Error(err)
		return reply{}
	}
	req.Host = "api.example"
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	start := time.Now()
	resp, err := s.srv.Client().Do(req)
	if err != nil {
		t.Errorf("GET %s: %v", path, err)
		return reply{}
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Errorf("GET %s: reading body: %v", path, err)
	}
	return reply{status: resp.StatusCode, body: string(body), header: resp.Header, took: time.Since(start)}
}

// fleetWaits is how many local leaders of the fleet wait for another
// server's flight now, and waiters how many local followers wait.
func fleetWaiting(servers []server) (fleetWaits, waiters int64) {
	for _, s := range servers {
		st := s.e.Stats()
		fleetWaits += int64(st.Shared.Waits)
		waiters += st.Registry.Waiters
	}
	return
}

func TestFleetHerdMakesOneUpstreamCallPerIdentity(t *testing.T) {
	redis := redistest.Start(t)
	for _, identities := range []int{1, 2} {
		t.Run(fmt.Sprintf("%d identities", identities), func(t *testing.T) {
			g := newGate(t)
			o := newOrigin(nil)
			o.serve = func(w http.ResponseWriter, r *http.Request, n int64) {
				g.wait(r)
				// public: a shared cache stores an answer to a request with
				// Authorization only when it says so (RFC 9111 §3.5).
				w.Header().Set("Cache-Control", "public, max-age=60")
				fmt.Fprintf(w, "v%d %s", n, r.Header.Get("Authorization"))
			}
			servers := newFleet(t, redis, 3, o, func(c *Config) { c.Shared.Prefix = "test:" + t.Name() + ":" })
			const n = 300
			chans := make([]<-chan reply, n)
			for i := range n {
				s := servers[i%3]
				user := fmt.Sprintf("Bearer user%d", (i/3)%identities)
				chans[i] = async(func() reply { return getAs(t, s, "/herd", "Authorization", user) })
			}
			// Every server has one local leader per identity: one of them
			// per identity leads the fleet (upstream), the others wait for it.
			deadline := time.Now().Add(10 * time.Second)
			for {
				w, f := fleetWaiting(servers)
				if o.calls.Load() == int64(identities) && w == int64(2*identities) && f == int64(n-3*identities) {
					break
				}
				if time.Now().After(deadline) {
					g.open()
					t.Fatalf("after 10s: %d upstream calls, %d fleet waits, %d local followers; want %d, %d, %d",
						o.calls.Load(), w, f, identities, 2*identities, n-3*identities)
				}
				time.Sleep(time.Millisecond)
			}
			g.open()
			bodies := map[string]int{}
			for i, ch := range chans {
				r := receive(t, ch, fmt.Sprintf("reply %d", i))
				if r.status != 200 {
					t.Fatalf("reply %d: %d %q", i, r.status, r.body)
				}
				bodies[r.body]++
			}
			if got := o.calls.Load(); got != int64(identities) {
				t.Fatalf("%d upstream calls for %d identities over 3 servers, want %d", got, identities, identities)
			}
			if len(bodies) != identities {
				t.Fatalf("bodies %v: want one per identity", bodies)
			}
		})
	}
}

func TestSharedHitAndFleetFollowerSayHowInCacheStatus(t *testing.T) {
	redis := redistest.Start(t)
	o := numbered("Cache-Control", "max-age=60")
	servers := newFleet(t, redis, 2, o, func(c *Config) { c.TTL = time.Second })
	first := getAs(t, servers[0], "/a")
	if !strings.Contains(first.cacheStatus(), "detail=fleet-leader") {
		t.Fatalf("leader's Cache-Status %q", first.cacheStatus())
	}
	second := getAs(t, servers[1], "/a")
	if second.body != first.body || !strings.Contains(second.cacheStatus(), "hit") || !strings.Contains(second.cacheStatus(), "detail=shared-hit") {
		t.Fatalf("second server: %q %q, want a shared hit of %q", second.body, second.cacheStatus(), first.body)
	}
	// Kept locally: the next request is a local hit, without Redis.
	third := getAs(t, servers[1], "/a")
	if !strings.Contains(third.cacheStatus(), `detail="ttl-ms=`) || o.calls.Load() != 1 {
		t.Fatalf("third request: %q, %d upstream calls", third.cacheStatus(), o.calls.Load())
	}
	if st := servers[1].e.Stats().Shared; st.SharedHits != 1 {
		t.Fatalf("shared hits %d", st.SharedHits)
	}
}

func TestWhatMayNotBeStoredStaysOffTheFleet(t *testing.T) {
	redis := redistest.Start(t)
	for _, c := range []struct{ name, header, value string }{
		{"set-cookie", "Set-Cookie", "s=1"},
		{"private", "Cache-Control", "private"},
		{"no-store", "Cache-Control", "no-store"},
		{"vary star", "Vary", "*"},
		{"vary cookie", "Vary", "Cookie"},
	} {
		t.Run(c.name, func(t *testing.T) {
			o := numbered(c.header, c.value)
			servers := newFleet(t, redis, 2, o, func(cfg *Config) {
				cfg.TTL = time.Second
				cfg.Shared.Prefix = "test:" + t.Name() + ":"
			})
			getAs(t, servers[0], "/p", "Cookie", "id=1")
			r := getAs(t, servers[1], "/p", "Cookie", "id=1")
			if strings.Contains(r.cacheStatus(), "shared-hit") || o.calls.Load() != 2 {
				t.Fatalf("%s: second server %q after %d upstream calls; want its own call", c.name, r.cacheStatus(), o.calls.Load())
			}
		})
	}
}

func TestRedisKilledMidLoadFailsNoRequestAndComesBack(t *testing.T) {
	redis := redistest.Start(t)
	o := numbered("Cache-Control", "max-age=60")
	servers := newFleet(t, redis, 3, o, func(c *Config) { c.TTL = 200 * time.Millisecond })
	var sent sync.WaitGroup
	var mu sync.Mutex
	var bad []string
	stop := make(chan struct{})
	var stopOnce sync.Once
	halt := func() { stopOnce.Do(func() { close(stop) }); sent.Wait() }
	// The load runs until the test stops it (bounded in time and count),
	// so that there is load when Redis dies, however fast the machine;
	// a failing test stops it before its servers close.
	t.Cleanup(halt)
	end := time.Now().Add(30 * time.Second)
	load := func(w int) {
		defer sent.Done()
		for i := 0; i < 1_000_000 && time.Now().Before(end); i++ {
			select {
			case <-stop:
				return
			default:
			}
			r := getAs(t, servers[(w+i)%3], fmt.Sprintf("/k%d", i%7))
			if r.status != 200 {
				mu.Lock()
				bad = append(bad, fmt.Sprintf("%d %q", r.status, r.cacheStatus()))
				mu.Unlock()
			}
		}
	}
	for w := range 6 {
		sent.Add(1)
		go load(w)
	}
	leads := func() (n uint64) {
		for _, s := range servers {
			n += s.e.Stats().Shared.LeadershipsWon
		}
		return
	}
	waitFor(t, "the load to go through the tier", func() bool { return leads() >= 5 })
	redis.Stop()
	waitFor(t, "a server to find Redis down", func() bool {
		for _, s := range servers {
			if s.e.Stats().Shared.State == fleet.StateDown {
				return true
			}
		}
		return false
	})
	before := o.calls.Load()
	waitFor(t, "requests answered without Redis", func() bool { return o.calls.Load() >= before+5 })
	redis.Restart()
	restarted := time.Now()
	deadline := restarted.Add(5 * time.Second)
	for _, s := range servers {
		for st := s.e.Stats().Shared; st.State != fleet.StateUp || !st.Listening; st = s.e.Stats().Shared {
			if time.Now().After(deadline) {
				t.Fatalf("the tier is not back 5s after Redis: %+v", st)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	t.Logf("the tier was back %s after Redis", time.Since(restarted).Round(time.Millisecond))
	halt()
	if len(bad) > 0 {
		t.Fatalf("%d failed requests, e.g. %s", len(bad), bad[0])
	}
	// Sharing works again.
	getAs(t, servers[0], "/after")
	if r := getAs(t, servers[1], "/after"); !strings.Contains(r.cacheStatus(), "shared-hit") {
		t.Fatalf("after Redis came back: %q", r.cacheStatus())
	}
}

func TestDeadUpstreamGetsFailuresPlusProbesFromTheFleet(t *testing.T) {
	redis := redistest.Start(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	})
	servers := newFleet(t, redis, 3, o, func(c *Config) {
		c.Breaker = BreakerConfig{Failures: 5, Open: 10 * time.Second, Probes: 1}
	})
	statuses := map[int]int{}
	for i := range 60 {
		r := getAs(t, servers[i%3], fmt.Sprintf("/dead/%d", i))
		statuses[r.status]++
	}
	if got := o.calls.Load(); got > 5+1 {
		t.Fatalf("the dead upstream got %d requests from 3 servers (statuses %v), want at most failures 5 + probes 1", got, statuses)
	}
	if statuses[503] != 60 {
		t.Fatalf("statuses %v", statuses)
	}
	for i, s := range servers {
		for _, b := range s.e.guard.set.Snapshot() {
			if b.State != BreakerOpen {
				t.Fatalf("server %d: breaker of %s is %s", i, b.Upstream, b.State)
			}
		}
	}
}

// When the fleet's opening ends, each server's breaker is half-open and
// lets its probes through, not every request it holds at that moment; and
// the opening is each server's own state change, told once.
func TestFleetOpeningEndsInEachServersProbesOnly(t *testing.T) {
	redis := redistest.Start(t)
	var failing atomic.Bool
	var held atomic.Int64
	release := make(chan struct{})
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if !failing.Load() {
			fmt.Fprint(w, "ok")
			return
		}
		if strings.HasPrefix(r.URL.Path, "/held/") {
			held.Add(1)
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		http.Error(w, "down", http.StatusServiceUnavailable)
	})
	var mu sync.Mutex
	changes := make([][]BreakerChange, 3)
	made := 0
	servers := newFleet(t, redis, 3, o, func(c *Config) {
		n := made
		made++
		c.Breakers = NewBreakers(func(ch BreakerChange) {
			mu.Lock()
			defer mu.Unlock()
			changes[n] = append(changes[n], ch)
		})
		c.Breaker = BreakerConfig{Failures: 2, Open: time.Second, Probes: 1}
	})
	for i, s := range servers {
		if r := getAs(t, s, fmt.Sprintf("/warm/%d", i)); r.status != http.StatusOK {
			t.Fatalf("server %d before the failures: %d", i, r.status)
		}
	}
	failing.Store(true)
	getAs(t, servers[0], "/dead/1")
	getAs(t, servers[0], "/dead/2")
	opened := func(i int) bool {
		mu.Lock()
		defer mu.Unlock()
		return len(changes[i]) > 0 && changes[i][0].To == BreakerOpen
	}
	for i := range servers {
		waitFor(t, fmt.Sprintf("server %d to open", i), func() bool { return opened(i) })
	}
	mu.Lock()
	for i := 1; i < 3; i++ {
		if ch := changes[i][0]; ch.From != BreakerClosed || !strings.Contains(ch.Reason, "fleet") {
			t.Errorf("server %d: first change %+v, want closed to open by the fleet", i, ch)
		}
	}
	mu.Unlock()
	for i, s := range servers {
		waitFor(t, fmt.Sprintf("server %d to turn half-open", i), func() bool {
			for _, b := range s.e.guard.set.Snapshot() {
				if b.State != BreakerHalfOpen {
					return false
				}
			}
			return true
		})
	}

	before := o.calls.Load()
	const perServer = 4
	var refused atomic.Int64
	var wg sync.WaitGroup
	for i, s := range servers {
		for k := range perServer {
			wg.Go(func() {
				r := getAs(t, s, fmt.Sprintf("/held/%d-%d", i, k))
				if r.status == http.StatusServiceUnavailable && strings.Contains(r.cacheStatus(), "breaker-open") {
					refused.Add(1)
				}
			})
		}
	}
	all := int64(len(servers) * perServer)
	waitFor(t, "every request refused or at the upstream", func() bool { return refused.Load()+held.Load() >= all })
	probes := o.calls.Load() - before
	close(release)
	wg.Wait()
	if probes != int64(len(servers)) {
		t.Errorf("when the fleet's opening ended, %d of %d requests reached the dead upstream (%d refused), want %d: one probe per server", probes, all, refused.Load(), len(servers))
	}
}

func TestFleetLeaderThatDiesLeavesItsWaitersToGoAlone(t *testing.T) {
	redis := redistest.Start(t)
	hung := newGate(t)
	dead := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) { hung.wait(r) })
	alive := numbered()
	// The waiting server's local leader waits half of max_wait for the
	// fleet: time enough, on a loaded machine, for its nine local followers
	// to join it before it goes upstream alone.
	const maxWait = 2 * time.Second
	cfg := func(c *Config) { c.MaxWait = maxWait }
	leader := newFleet(t, redis, 1, dead, cfg)[0]
	other := newFleet(t, redis, 1, alive, cfg)[0]

	go getAs(t, leader, "/slow")
	waitFor(t, "the fleet leader upstream", func() bool { return dead.calls.Load() == 1 })
	start := time.Now()
	chans := make([]<-chan reply, 10)
	for i := range chans {
		chans[i] = async(func() reply { return getAs(t, other, "/slow") })
	}
	waitWaiters(t, other.e, int64(len(chans)-1))
	for i, ch := range chans {
		r := receive(t, ch, fmt.Sprintf("waiter %d", i))
		if r.status != 200 || r.body != "v1" {
			t.Fatalf("waiter %d: %d %q %q", i, r.status, r.body, r.cacheStatus())
		}
	}
	if took := time.Since(start); took >= maxWait {
		t.Fatalf("the waiters were answered after %s, max_wait is %s", took, maxWait)
	}
	if alive.calls.Load() != 1 {
		t.Fatalf("the waiting server went upstream %d times, want once", alive.calls.Load())
	}
	if st := other.e.Stats().Shared; st.WaitTimeouts != 1 {
		t.Fatalf("fleet wait timeouts %d", st.WaitTimeouts)
	}
	hung.open()
}

func TestLocalHitsAndLocalFollowersNeverTalkToRedis(t *testing.T) {
	redis := redistest.Start(t)
	g := newGate(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		g.wait(r)
		fmt.Fprintf(w, "v%d", n)
	})
	s := newFleet(t, redis, 1, o, func(c *Config) { c.TTL = time.Second })[0]
	// A local herd: its leader alone asks Redis.
	chans := []<-chan reply{async(func() reply { return getAs(t, s, "/local") })}
	waitFor(t, "the leader upstream", func() bool { return o.calls.Load() == 1 })
	for range 20 {
		chans = append(chans, async(func() reply { return getAs(t, s, "/local") }))
	}
	waitWaiters(t, s.e, 20)
	g.open()
	for i, ch := range chans {
		if r := receive(t, ch, fmt.Sprintf("reply %d", i)); r.body != "v1" {
			t.Fatalf("reply %d: %q", i, r.body)
		}
	}
	// Local hits.
	for range 20 {
		if r := getAs(t, s, "/local"); !strings.Contains(r.cacheStatus(), "hit") {
			t.Fatalf("not a local hit: %q", r.cacheStatus())
		}
	}
	st := s.e.Stats().Shared
	if asked := st.LeadershipsWon + st.LeadershipsLost + st.SharedHits; asked != 1 || st.Errors != 0 {
		t.Fatalf("41 requests for one key asked Redis %d times (%+v), want once", asked, *st)
	}
}

// An instance answered from Redis learns the upstream that answered: else,
// having seen only a dead upstream of the handler's two, it would guess that
// one for every request and refuse them all once the fleet opens its
// breaker.
func TestFleetAnswerTeachesTheUpstream(t *testing.T) {
	redis := redistest.Start(t)
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		if strings.HasPrefix(r.URL.Path, "/dead") {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprint(w, "ok")
	})
	servers := newFleet(t, redis, 3, o, func(c *Config) {
		c.TTL = time.Second
		c.Breaker = BreakerConfig{Failures: 5, Open: 30 * time.Second}
		c.Hooks.Upstream = func(r *http.Request) string {
			if strings.HasPrefix(r.URL.Path, "/dead") {
				return "dead:80"
			}
			return "api:80"
		}
	})
	for i := range 3 {
		// The first goes upstream; the other two are shared hits.
		getAs(t, servers[i], "/ok")
	}
	for i := range 30 {
		getAs(t, servers[i%3], fmt.Sprintf("/dead/%d", i))
	}
	for i := range 6 {
		if r := getAs(t, servers[i%3], fmt.Sprintf("/ok/%d", i)); r.status != 200 {
			t.Errorf("server %d: %d %q %q", i%3, r.status, r.body, r.cacheStatus())
		}
	}
}
