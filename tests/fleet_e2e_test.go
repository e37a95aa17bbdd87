package tests

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/internal/redistest"
)

// instance is one Caddy process of a fleet.
type instance struct {
	base, admin string
	*builtCaddy
}

// startFleetInstance runs bin with a Caddyfile whose coalesce handler
// shares redis; site is what goes inside the site block.
func startFleetInstance(t *testing.T, bin, dir, name, site string) *instance {
	t.Helper()
	adminPort, port := freePort(t), freePort(t)
	idir := filepath.Join(dir, name)
	if err := os.MkdirAll(idir, 0o755); err != nil {
		t.Fatal(err)
	}
	return &instance{base: fmt.Sprintf("http://127.0.0.1:%d", port), admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort),
		builtCaddy: startBuiltCaddy(t, bin, idir, siteCaddyfile(adminPort, port, site), adminPort, port)}
}

// shared is the tier's part of the instance's /coalesce/stats, and
// waiters its local followers waiting now.
func (in *instance) shared(client *http.Client) (shared map[string]any, waiters float64) {
	f := get(client, "GET", in.admin+"/coalesce/stats")
	var st struct {
		Total struct {
			Registry struct {
				Waiters float64 `json:"waiters"`
			} `json:"registry"`
			Shared map[string]any `json:"shared"`
		} `json:"total"`
	}
	if f.err != nil || json.Unmarshal([]byte(f.body), &st) != nil {
		return nil, 0
	}
	return st.Total.Shared, st.Total.Registry.Waiters
}

// getHost is a GET with the Host every instance is sent behind a load
// balancer.
func getHost(client *http.Client, url string, headers ...string) fetched {
	req, err := http.NewRequestWithContext(context.Background(), "GET", url, nil)
	if err != nil {
		return fetched{err: err}
	}
	req.Host = "api.fleet.test"
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

func TestFleetOfThreeCaddiesEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test builds Caddy with xcaddy; skipped with -short")
	}
	redis := redistest.Start(t)
	dir := t.TempDir()
	bin := buildCaddy(t, dir, false)

	var release sync.Once
	gate := make(chan struct{})
	t.Cleanup(func() { release.Do(func() { close(gate) }) })
	var seq, slow atomic.Int64
	dead := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/herd"):
			select {
			case <-gate:
			case <-r.Context().Done():
				return
			}
			w.Header().Set("Cache-Control", "public, max-age=60")
			fmt.Fprintf(w, "answer %d for %s", seq.Add(1), r.Header.Get("Authorization"))
		case r.URL.Path == "/hot":
			time.Sleep(50 * time.Millisecond) // the upstream's latency
			fmt.Fprint(w, "hot")
		case r.URL.Path == "/slow":
			// The first is held until the test ends: its instance is
			// killed while it leads the fleet.
			if slow.Add(1) == 1 {
				<-r.Context().Done()
				return
			}
			fmt.Fprint(w, "answer for /slow")
		default:
			fmt.Fprintf(w, "answer for %s", r.URL.Path)
		}
	})
	// Two handlers, each in front of one upstream: the API, and one that
	// is down.
	site := fmt.Sprintf(`	handle /dead/* {
		coalesce {
			zone dead
			breaker {
				failures 5
				open 30s
			}
			shared %[1]s {
				timeout 1s
			}
		}
		reverse_proxy %[2]s
	}
	handle {
		coalesce {
			ttl 1s
			zone api
			shared %[1]s {
				timeout 1s
			}
		}
		reverse_proxy %[3]s
	}`, redis.URL(), dead.addr, up.addr)
	var fleet []*instance
	for i := range 3 {
		fleet = append(fleet, startFleetInstance(t, bin, dir, fmt.Sprintf("c%d", i), site))
	}
	client := newClient(t)
	for _, in := range fleet {
		if !waitFor(10*time.Second, func() bool { s, _ := in.shared(client); return s["listening"] == true }) {
			t.Fatalf("an instance does not listen to the fleet")
		}
	}

	herdOver3 := func(t *testing.T, path string, identities int) {
		const n = 300
		var got []fetched
		done := make(chan struct{})
		go func() {
			defer close(done)
			got = together(n, func(i int) fetched {
				return getHost(client, fleet[i%3].base+path, "Authorization: Bearer user"+fmt.Sprint((i/3)%identities))
			})
		}()
		ok := waitFor(30*time.Second, func() bool {
			waits, followers := 0.0, 0.0
			for _, in := range fleet {
				s, w := in.shared(client)
				if s != nil {
					waits += s["fleet_waits"].(float64)
				}
				followers += w
			}
			return up.PathCalls(path) == identities && int(waits) >= 2*identities && int(followers) == n-3*identities
		})
		release.Do(func() { close(gate) })
		<-done
		if !ok {
			t.Fatalf("the herd never gathered: %d upstream calls", up.PathCalls(path))
		}
		bodies := map[string]int{}
		for i, f := range got {
			if f.err != nil || f.status != 200 {
				t.Fatalf("client %d: %d %v", i, f.status, f.err)
			}
			bodies[f.body]++
		}
		if c := up.PathCalls(path); c != identities || len(bodies) != identities {
			t.Fatalf("%d upstream calls and bodies %v for %d identities over 3 instances", c, bodies, identities)
		}
	}
	t.Run("300 identical GETs over 3 instances make one upstream call", func(t *testing.T) { herdOver3(t, "/herd1", 1) })
	gate = make(chan struct{})
	release = sync.Once{}
	t.Run("two identities make two", func(t *testing.T) { herdOver3(t, "/herd2", 2) })

	t.Run("a dead upstream gets failures + probes requests from the fleet", func(t *testing.T) {
		statuses := map[int]int{}
		for i := range 60 {
			f := getHost(client, fleet[i%3].base+fmt.Sprintf("/dead/%d", i))
			statuses[f.status]++
		}
		if c := dead.Calls(); c > 5+1 {
			t.Fatalf("the dead upstream got %d requests from the fleet (statuses %v), want at most 6", c, statuses)
		}
		if statuses[503] != 60 {
			t.Fatalf("statuses %v", statuses)
		}
		t.Logf("the dead upstream got %d requests from 3 instances (failures 5, probes 1)", dead.Calls())
	})

	t.Run("redis-server killed mid-load fails no request, the tier is back within 5s", func(t *testing.T) {
		var failed atomic.Int64
		var firstFailure atomic.Value
		var sent atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < 20000; i++ {
					select {
					case <-stop:
						return
					default:
					}
					f := getHost(client, fleet[(w+i)%3].base+fmt.Sprintf("/load/%d", i%5))
					sent.Add(1)
					if f.err != nil || f.status != 200 {
						failed.Add(1)
						firstFailure.CompareAndSwap(nil, fmt.Sprintf("%d %v %q", f.status, f.err, f.header.Get("Cache-Status")))
					}
				}
			}()
		}
		waitFor(10*time.Second, func() bool { return sent.Load() >= 50 })
		errorsNow := func() (n float64) {
			for _, in := range fleet {
				if s, _ := in.shared(client); s != nil {
					n += s["redis_errors"].(float64)
				}
			}
			return n
		}
		before := errorsNow()
		redis.Stop()
		if !waitFor(10*time.Second, func() bool { return errorsNow() > before }) {
			t.Fatal("no instance noticed that Redis was gone")
		}
		mark := sent.Load()
		waitFor(10*time.Second, func() bool { return sent.Load() >= mark+50 })
		redis.Restart()
		restarted := time.Now()
		back := waitFor(5*time.Second, func() bool {
			for _, in := range fleet {
				s, _ := in.shared(client)
				if s == nil || s["state"] != "up" || s["listening"] != true {
					return false
				}
			}
			return true
		})
		close(stop)
		wg.Wait()
		if !back {
			t.Fatalf("the tier was not back 5s after redis-server")
		}
		t.Logf("tier back %s after redis-server restarted; %d requests sent", time.Since(restarted).Round(time.Millisecond), sent.Load())
		if n := failed.Load(); n != 0 {
			t.Fatalf("%d of %d client requests failed, the first: %v", n, sent.Load(), firstFailure.Load())
		}
	})

	t.Run("a hot key for 10s over 3 instances: one upstream call per ttl + latency for the fleet", func(t *testing.T) {
		const duration, ttl, latency = 10 * time.Second, time.Second, 50 * time.Millisecond
		var failed atomic.Int64
		start := time.Now()
		var wg sync.WaitGroup
		for w := range 6 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; time.Since(start) < duration && i < 100000; i++ {
					f := getHost(client, fleet[(w+i)%3].base+"/hot")
					if f.err != nil || f.status != 200 {
						failed.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		calls := up.PathCalls("/hot")
		windows := int(math.Ceil(float64(duration) / float64(ttl+latency)))
		t.Logf("hot key for %s over 3 instances: %d upstream calls (bound 1.05 x %d)", duration, calls, windows)
		if float64(calls) > 1.05*float64(windows) || failed.Load() != 0 {
			t.Fatalf("%d upstream calls in %s (want at most 1.05 x %d), %d failed requests", calls, duration, windows, failed.Load())
		}
	})

	t.Run("a fleet leader killed mid-request: its waiters are answered within max_wait", func(t *testing.T) {
		go getHost(client, fleet[2].base+"/slow")
		if !waitFor(10*time.Second, func() bool { return up.PathCalls("/slow") == 1 }) {
			t.Fatal("the fleet leader never went upstream")
		}
		_ = fleet[2].cmd.Process.Kill()
		<-fleet[2].exited
		const maxWait = 10 * time.Second // the default
		start := time.Now()
		got := together(20, func(i int) fetched { return getHost(client, fleet[i%2].base+"/slow") })
		took := time.Since(start)
		for i, f := range got {
			if f.err != nil || f.status != 200 || f.body != "answer for /slow" {
				t.Fatalf("waiter %d: %d %v %q", i, f.status, f.err, f.body)
			}
		}
		if took >= maxWait {
			t.Fatalf("the waiters were answered after %s; max_wait is %s", took, maxWait)
		}
		t.Logf("the waiters of the killed leader were answered after %s (max_wait %s)", took.Round(time.Millisecond), maxWait)
	})
}
