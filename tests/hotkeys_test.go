package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// topKey is one row of GET /coalesce/top.
type topKey struct {
	Zone       string  `json:"zone"`
	Method     string  `json:"method"`
	Host       string  `json:"host"`
	Path       string  `json:"path"`
	Requests   float64 `json:"requests_per_minute"`
	Upstream   float64 `json:"upstream_per_minute"`
	Hit        float64 `json:"hit_share"`
	Collapsed  float64 `json:"collapsed_share"`
	Stale      float64 `json:"stale_share"`
	Identities int     `json:"identities"`
	Count      uint64  `json:"count"`
}

func topKeys(t *testing.T, client *http.Client, limit int) []topKey {
	t.Helper()
	var out struct {
		Keys []topKey `json:"keys"`
	}
	if st := adminJSON(t, client, "GET", fmt.Sprintf("/coalesce/top?limit=%d", limit), "", &out); st != http.StatusOK {
		t.Fatalf("GET /coalesce/top: status %d", st)
	}
	return out.Keys
}

func TestTopListsTheHeaviestKeysOfAZipfLoadFirst(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, r.URL.Path) })
	startCaddy(t, site("ttl 1s\n\t\tzone top-zipf"), up)
	client := newClient(t)
	prefix := pathFor(t, "/")

	rng := rand.New(rand.NewPCG(7, 11))
	zipf := rand.NewZipf(rng, 1.2, 1, 9_999)
	paths := make([]string, 4_000)
	exact := map[string]int{}
	for i := range paths {
		paths[i] = fmt.Sprintf("%sitem-%d", prefix, zipf.Uint64())
		exact[paths[i]]++
	}
	// 8 clients, each its share of the requests in order.
	var wg sync.WaitGroup
	for c := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := c; i < len(paths); i += 8 {
				if f := get(client, "GET", baseURL+paths[i]+"?secret=do-not-show"); f.status != http.StatusOK {
					t.Errorf("GET %s: %d %v", paths[i], f.status, f.err)
					return
				}
			}
		}()
	}
	wg.Wait()

	type kv struct {
		path string
		n    int
	}
	var truth []kv
	for p, n := range exact {
		truth = append(truth, kv{p, n})
	}
	slices.SortFunc(truth, func(a, b kv) int { return b.n - a.n })

	var mine []topKey
	for _, k := range topKeys(t, client, 1000) {
		if strings.HasPrefix(k.Path, prefix) {
			mine = append(mine, k)
		}
		raw, _ := json.Marshal(k)
		if bytes.Contains(raw, []byte("do-not-show")) || bytes.Contains(raw, []byte("secret")) {
			t.Errorf("/coalesce/top shows the query: %s", raw)
		}
	}
	if len(mine) < 5 {
		t.Fatalf("/coalesce/top lists %d of this test's keys, want at least 5", len(mine))
	}
	// The five heaviest keys, in order, where the exact counts differ.
	for i := range 5 {
		if mine[i].Path != truth[i].path && exact[mine[i].Path] != truth[i].n {
			t.Errorf("row %d: %s (%d requests), want %s (%d requests)", i, mine[i].Path, exact[mine[i].Path], truth[i].path, truth[i].n)
		}
		if mine[i].Zone != "top-zipf" || mine[i].Method != "GET" {
			t.Errorf("row %d: zone %q method %q, want top-zipf GET", i, mine[i].Zone, mine[i].Method)
		}
		if mine[i].Identities != 1 {
			t.Errorf("row %d: %d identities, want 1 (no credentials were sent)", i, mine[i].Identities)
		}
	}
	// The heaviest key was fetched once and then answered from the
	// micro-cache.
	if top := mine[0]; top.Hit < 0.5 || top.Upstream >= top.Requests {
		t.Errorf("heaviest key: hit share %.2f, %.1f upstream/min of %.1f requests/min; want mostly hits", top.Hit, top.Upstream, top.Requests)
	}
}

func TestHotKeyRateAlertsOncePerKeyPerWindow(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, r.URL.Path) })
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	global := strings.Replace(globalOptions, "skip_install_trust\n", fmt.Sprintf("skip_install_trust\n\tlog {\n\t\toutput file %s\n\t\tformat json\n\t}\n", logFile), 1)
	loadFirst(t, global+withUpstreams(site("ttl 0\n\t\thot_key_rate 20/1m\n\t\tzone hot-rate"), []*upstream{up}), "caddyfile")
	client := newClient(t)
	before := scrapeMetrics(t, client)

	one := pathFor(t, "/one-identity")
	many := pathFor(t, "/ten-identities")
	// 40 requests each: one user polling, and ten users sharing the load.
	for i := range 40 {
		for _, f := range []fetched{
			get(client, "GET", baseURL+one, "Authorization: Bearer only-user"),
			get(client, "GET", baseURL+many, fmt.Sprintf("Authorization: Bearer user-%d", i%10)),
		} {
			if f.status != http.StatusOK {
				t.Fatalf("status %d %v", f.status, f.err)
			}
		}
	}
	after := scrapeMetrics(t, client)
	expectDelta(t, before, after, 2, "caddy_coalesce_hot_key_alerts_total", "handler", "hot-rate")

	var alerts []map[string]any
	eventually(t, "two hot-key warnings in the log", func() bool {
		raw, _ := os.ReadFile(logFile)
		alerts = nil
		for _, l := range bytes.Split(bytes.TrimSpace(raw), []byte("\n")) {
			var m map[string]any
			if json.Unmarshal(l, &m) == nil && strings.HasPrefix(fmt.Sprint(m["msg"]), "hot key") {
				alerts = append(alerts, m)
			}
		}
		return len(alerts) >= 2
	})
	byPath := map[string]map[string]any{}
	for _, a := range alerts {
		if a["level"] != "warn" {
			t.Errorf("hot-key line at level %v, want warn", a["level"])
		}
		byPath[fmt.Sprint(a["path"])] = a
	}
	if len(alerts) != 2 || byPath[one] == nil || byPath[many] == nil {
		t.Fatalf("hot-key lines %v, want one for %s and one for %s", alerts, one, many)
	}
	if n := byPath[many]["identities"].(float64); n < 9 || n > 11 {
		t.Errorf("%s: %v identities, want about 10", many, n)
	}
	if n := byPath[one]["identities"].(float64); n != 1 {
		t.Errorf("%s: %v identities, want 1", one, n)
	}
	raw, _ := os.ReadFile(logFile)
	if bytes.Contains(raw, []byte("only-user")) || bytes.Contains(raw, []byte("user-3")) {
		t.Errorf("the log shows a credential")
	}
}
