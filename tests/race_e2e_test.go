package tests

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The Caddy binary built with the race detector, under a bounded mixed load
// that reaches every path where the module's goroutines meet Caddy's
// per-request state: background refreshes of a hot key (ttl 10ms, stale 1s)
// while the clients' access log reads their vars, HEADs and conditional
// requests answered from shared copies, cold keys, a breaker that trips on a
// failing upstream, a flapping upstream with stale_if_error, a pool behind
// `lb_policy breaker round_robin` with a dead member, clients that give up,
// and config reloads through the admin API while all of it runs. Any report
// of the race detector, or any fatal error of the runtime (a `concurrent map
// read and map write` in a normal build), fails the test with the report.

const (
	raceLoadDuration = 12 * time.Second
	// Each client stops at the deadline or after this many requests.
	raceRequestsPerClient = 20000
)

// raceCaddyfile is the configuration under load. An even generation changes
// the settings of the hot key's handler (a reload that gives it new state);
// an odd one is the first configuration (a reload that keeps its state).
func raceCaddyfile(adminPort, port int, accessLog, api, flaky, failing, live, dead string, generation int) string {
	hotOptions := "ttl 10ms\n\t\t\tstale 1s"
	proxyExtra := ""
	if generation%2 == 0 {
		hotOptions = "ttl 10ms\n\t\t\tstale 1s\n\t\t\tmax_wait 5s"
		proxyExtra = "header_up X-Config-Generation " + strconv.Itoa(generation)
	}
	return siteCaddyfile(adminPort, port, fmt.Sprintf(`log {
		output file %s
		format json
	}
	log_append coalesce_status {http.coalesce.status}
	log_append coalesce_key {http.coalesce.key_hash}
	log_append coalesce_waiters {http.coalesce.waiters}
	log_append coalesce_detail {http.coalesce.detail}

	handle /api/* {
		coalesce {
			%s
		}
		reverse_proxy %s {
			%s
		}
	}
	handle /flaky/* {
		coalesce {
			ttl 10ms
			stale 1s
			stale_if_error 2s
			breaker {
				failures 3
				open 300ms
			}
		}
		reverse_proxy %s
	}
	handle /down/* {
		coalesce {
			ttl 10ms
			breaker {
				failures 3
				open 300ms
			}
		}
		reverse_proxy %s
	}
	handle /pool/* {
		coalesce {
			ttl 10ms
			stale 1s
			breaker {
				failures 3
				open 500ms
			}
		}
		reverse_proxy %s %s {
			lb_policy breaker round_robin
			lb_retries 2
		}
	}`, accessLog, hotOptions, api, proxyExtra, flaky, failing, live, dead))
}

func TestRaceBuildOfCaddyReportsNothingUnderMixedLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test builds Caddy with xcaddy and the race detector (several minutes the first time); skipped with -short")
	}
	dir := t.TempDir()
	bin := buildCaddy(t, dir, true)

	// The API: 5 ms per answer, with validators so that conditional
	// requests can be answered 304 from a shared copy.
	lastModified := time.Now().Add(-time.Hour).UTC().Format(http.TimeFormat)
	api := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(5 * time.Millisecond)
		w.Header().Set("ETag", `"v1"`)
		w.Header().Set("Last-Modified", lastModified)
		w.Header().Set("Content-Type", "application/json")
		_, _ = fmt.Fprintf(w, `{"path":%q}`, r.URL.Path)
	})
	// A failing upstream: healthy for 300 ms, then 503 for 700 ms, over and
	// over, so that its breaker trips, probes and closes again while stale
	// copies stand in for it.
	epoch := time.Now()
	flaky := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(2 * time.Millisecond)
		if time.Since(epoch)%time.Second >= 300*time.Millisecond {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprint(w, "flaky "+r.URL.Path)
	})
	// An upstream that always fails: its breaker trips, and requests for
	// which no copy is stored are answered for the open breaker.
	failing := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	})
	// A pool member whose process is gone but whose port still accepts:
	// every connection is closed at once, a transport error each time.
	dead := newRawUpstream(t, func(net.Conn) {})

	adminPort, port := freePort(t), freePort(t)
	accessLog := filepath.Join(dir, "access.log")
	config := func(generation int) string {
		return raceCaddyfile(adminPort, port, accessLog, api.addr, flaky.addr, failing.addr, api.addr, dead.addr(), generation)
	}
	caddy := startBuiltCaddy(t, bin, dir, config(1), adminPort, port)

	client := newClient(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	deadline := time.Now().Add(raceLoadDuration)

	// What the clients saw, by kind of request: "kind status" → count, and
	// the first errors of each kind.
	var seenMu sync.Mutex
	seen := map[string]int{}
	var errorSamples []string
	record := func(kind string, f fetched) {
		key := kind + " " + strconv.Itoa(f.status)
		if f.err != nil {
			key = kind + " error"
		}
		seenMu.Lock()
		defer seenMu.Unlock()
		if seen[key]++; f.err != nil && seen[key] <= 3 && kind != "impatient GET" {
			at := raceLoadDuration - time.Until(deadline)
			errorSamples = append(errorSamples, fmt.Sprintf("%s, %s into the load, after %s: %v", kind, at.Round(time.Millisecond), f.took.Round(time.Millisecond), f.err))
		}
	}

	var wg sync.WaitGroup
	clients := func(n int, kind string, request func(worker, i int) fetched) {
		for w := range n {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < raceRequestsPerClient && time.Now().Before(deadline); i++ {
					record(kind, request(w, i))
				}
			}()
		}
	}
	hot := base + "/api/hot"
	clients(32, "hot GET", func(int, int) fetched { return get(client, "GET", hot) })
	clients(4, "hot HEAD", func(int, int) fetched { return get(client, "HEAD", hot) })
	clients(4, "hot If-None-Match", func(int, int) fetched { return get(client, "GET", hot, `If-None-Match: "v1"`) })
	clients(2, "hot If-Modified-Since", func(int, int) fetched {
		return get(client, "GET", hot, "If-Modified-Since: "+lastModified)
	})
	clients(2, "hot with identity", func(w, _ int) fetched {
		return get(client, "GET", hot, "Authorization: Bearer user"+strconv.Itoa(w))
	})
	clients(4, "cold GET", func(w, i int) fetched {
		return get(client, "GET", fmt.Sprintf("%s/api/cold/%d-%d", base, w, i))
	})
	clients(1, "hot POST", func(int, int) fetched { return get(client, "POST", hot) })
	clients(2, "impatient GET", func(w, i int) fetched {
		// Clients that give up after 0–9 ms: leaders and followers that leave.
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%10)*time.Millisecond)
		defer cancel()
		return getCtx(ctx, client, "GET", fmt.Sprintf("%s/api/hot%d", base, i%3))
	})
	clients(4, "flaky GET", func(w, i int) fetched {
		return get(client, "GET", fmt.Sprintf("%s/flaky/%d", base, (w+i)%4))
	})
	clients(2, "down GET", func(w, i int) fetched {
		return get(client, "GET", fmt.Sprintf("%s/down/%d", base, (w+i)%4))
	})
	clients(4, "pool GET", func(w, i int) fetched {
		return get(client, "GET", fmt.Sprintf("%s/pool/%d", base, (w+i)%8))
	})

	// Reloads while the load runs: one with other settings (new handler
	// state), one back to the first configuration, one unchanged.
	reloads := 0
	for i, generation := range []int{2, 3, 3} {
		at := deadline.Add(-raceLoadDuration + time.Duration(i+1)*raceLoadDuration/4)
		time.Sleep(time.Until(at))
		start := time.Now()
		if err := caddy.load(config(generation)); err != nil {
			t.Errorf("reload %d: %v", i+1, err)
			continue
		}
		reloads++
		t.Logf("reload %d (generation %d) %s into the load took %s", i+1, generation, (raceLoadDuration - time.Until(deadline)).Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
	}
	wg.Wait()
	caddy.stop(t)

	t.Logf("%d reloads; what the clients saw: %v", reloads, seen)
	if len(errorSamples) > 0 {
		t.Logf("errors the clients saw:\n%s", strings.Join(errorSamples, "\n"))
	}
	if reports := raceReports(caddy.output.String()); len(reports) > 0 {
		for i, r := range reports {
			if i == 3 {
				t.Errorf("... %d reports in all", len(reports))
				break
			}
			t.Errorf("report %d of %d in Caddy's output:\n%s", i+1, len(reports), r)
		}
	}

	// The load reached the paths it is meant to: stale answers with their
	// background refreshes, HEADs and 304s answered from shared copies, an
	// open breaker, the pool around its dead member.
	outcomes := accessLogOutcomes(t, accessLog)
	t.Logf("access log, coalesce_status: %v", outcomes)
	stale := 0
	for outcome, n := range outcomes {
		if strings.HasPrefix(outcome, "stale") {
			stale += n
		}
	}
	switch {
	case stale == 0:
		t.Errorf("no request was answered stale (no background refresh ran): %v", outcomes)
	case outcomes["breaker_open"] == 0:
		t.Errorf("no request was answered for an open breaker: %v", outcomes)
	}
	for _, want := range []string{"hot GET 200", "hot HEAD 200", "hot If-None-Match 304", "hot If-Modified-Since 304", "cold GET 200", "flaky GET 200", "down GET 503", "pool GET 200"} {
		if seen[want] == 0 {
			t.Errorf("no %q during the load: %v", want, seen)
		}
	}
}

// load replaces the running configuration through the admin API, as
// `caddy reload` does.
func (c *builtCaddy) load(caddyfile string) error {
	req, err := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/load", c.adminPort), strings.NewReader(caddyfile))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "text/caddyfile")
	client := &http.Client{Timeout: 60 * time.Second}
	defer client.CloseIdleConnections()
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("POST /load: %d %s", resp.StatusCode, body)
	}
	return nil
}

// stop asks Caddy to exit through the admin API (POST /stop) and waits for
// it, so that everything it reports on the way out is in its output.
func (c *builtCaddy) stop(t *testing.T) {
	t.Helper()
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	if f := get(client, "POST", fmt.Sprintf("http://127.0.0.1:%d/stop", c.adminPort)); f.err != nil || f.status != http.StatusOK {
		// It may have died under the load: the output says why.
		t.Errorf("POST /stop: %d %v", f.status, f.err)
	}
	select {
	case <-c.exited:
		// A race-enabled binary that reported a race exits with status 66.
		if c.waitErr != nil {
			t.Errorf("caddy exited with %v", c.waitErr)
		}
	case <-time.After(30 * time.Second):
		t.Errorf("caddy did not exit within 30s of POST /stop")
	}
}

// raceReports is every report of the race detector in out (from its
// WARNING line to the separator that closes it), and every fatal error or
// unrecovered panic of the runtime with the goroutines that follow it.
func raceReports(out string) []string {
	var reports []string
	lines := strings.Split(out, "\n")
	for i := 0; i < len(lines); i++ {
		line := lines[i]
		switch {
		case line == "WARNING: DATA RACE":
			j := i + 1
			for j < len(lines) && lines[j] != "==================" {
				j++
			}
			reports = append(reports, strings.Join(lines[i:min(j+1, len(lines))], "\n"))
			i = j
		case strings.HasPrefix(line, "fatal error:"), strings.HasPrefix(line, "panic:"),
			strings.Contains(line, "concurrent map"), strings.Contains(line, "http: panic serving"):
			j := min(i+400, len(lines))
			reports = append(reports, strings.Join(lines[i:j], "\n"))
			i = j
		}
	}
	return reports
}

// tail is the last n bytes of s.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "..." + s[len(s)-n:]
}

// accessLogOutcomes counts the access log's coalesce_status values.
func accessLogOutcomes(t *testing.T, path string) map[string]int {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("access log: %v", err)
	}
	defer f.Close()
	counts := map[string]int{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		var line struct {
			Status *string `json:"coalesce_status"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil || line.Status == nil {
			continue
		}
		counts[*line.Status]++
	}
	if err := sc.Err(); err != nil {
		t.Fatalf("access log: %v", err)
	}
	return counts
}
