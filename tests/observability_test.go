package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape is one read of the admin endpoint's /metrics.
type scrape map[string]*dto.MetricFamily

func scrapeMetrics(t testing.TB, client *http.Client) scrape {
	t.Helper()
	resp, err := client.Get(adminURL + "/metrics")
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping /metrics: status %d", resp.StatusCode)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	return fams
}

// value is the value of the series name{labels...} (labels as name, value
// pairs; a series may carry more labels), or for a histogram its sample
// count; ok is false when there is no such series.
func (s scrape) value(name string, labels ...string) (v float64, ok bool) {
	fam := s[name]
	if fam == nil {
		return 0, false
	}
next:
	for _, m := range fam.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				if l.GetName() == labels[i] && l.GetValue() == labels[i+1] {
					found = true
				}
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.Counter.GetValue(), true
		case m.Gauge != nil:
			return m.Gauge.GetValue(), true
		case m.Histogram != nil:
			return float64(m.Histogram.GetSampleCount()), true
		}
	}
	return 0, false
}

// get is value for a series that must exist.
func (s scrape) get(t testing.TB, name string, labels ...string) float64 {
	t.Helper()
	v, ok := s.value(name, labels...)
	if !ok {
		t.Fatalf("/metrics has no series %s%v", name, labels)
	}
	return v
}

// delta is how much a series grew from before to after (a missing series
// counts as 0).
func delta(before, after scrape, name string, labels ...string) float64 {
	a, _ := after.value(name, labels...)
	b, _ := before.value(name, labels...)
	return a - b
}

// expectDelta fails t unless the series grew by want.
func expectDelta(t testing.TB, before, after scrape, want float64, name string, labels ...string) {
	t.Helper()
	if got := delta(before, after, name, labels...); got != want {
		t.Errorf("%s%v grew by %v, want %v", name, labels, got, want)
	}
}

// setBypass switches the kill switch through the admin API.
func setBypass(t testing.TB, client *http.Client, on bool) {
	t.Helper()
	var got struct{ Enabled bool }
	if st := adminJSON(t, client, "POST", "/coalesce/bypass", fmt.Sprintf(`{"enabled": %v}`, on), &got); st != http.StatusOK || got.Enabled != on {
		t.Fatalf("POST /coalesce/bypass enabled=%v: status %d, enabled %v", on, st, got.Enabled)
	}
}

// Shapes of the admin API's answers, as docs/OBSERVABILITY.md documents them.
type (
	adminRegistryStats struct {
		ActiveKeys        int64  `json:"active_keys"`
		Waiters           int64  `json:"waiters"`
		Flights           uint64 `json:"flights"`
		Collapsed         uint64 `json:"collapsed"`
		Rejected          uint64 `json:"rejected"`
		TimedOut          uint64 `json:"timed_out"`
		Abandoned         uint64 `json:"abandoned"`
		Published         uint64 `json:"published"`
		AverageLifetimeNS int64  `json:"average_lifetime_ns"`
		MaxLifetimeNS     int64  `json:"max_lifetime_ns"`
	}
	adminZoneStats struct {
		Engines  int                `json:"engines"`
		Registry adminRegistryStats `json:"registry"`
		Cache    struct {
			Entries   int64  `json:"entries"`
			Bytes     int64  `json:"bytes"`
			Evictions uint64 `json:"evictions"`
		} `json:"cache"`
		Uncollapsible int `json:"uncollapsible_keys"`
		CacheBudget   struct {
			MaxEntries int64 `json:"max_entries"`
			MaxBytes   int64 `json:"max_bytes"`
		} `json:"cache_budget"`
	}
	adminStats struct {
		Bypass struct {
			Enabled bool       `json:"enabled"`
			Changed *time.Time `json:"changed"`
		} `json:"bypass"`
		Total adminZoneStats            `json:"total"`
		Zones map[string]adminZoneStats `json:"zones"`
	}
	adminFlight struct {
		Zone    string `json:"zone"`
		Key     string `json:"key"`
		Method  string `json:"method"`
		Path    string `json:"path"`
		Refresh bool   `json:"refresh"`
		AgeNS   int64  `json:"age_ns"`
		Age     string `json:"age"`
		Waiters int    `json:"waiters"`
	}
	adminInflight struct {
		Total     int64         `json:"total"`
		Limit     int           `json:"limit"`
		Truncated bool          `json:"truncated"`
		Flights   []adminFlight `json:"flights"`
	}
	adminError struct {
		Error string `json:"error"`
	}
)

// gated is an upstream handler that answers body once gate is closed.
func gated(gate <-chan struct{}, body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-gate:
		case <-r.Context().Done():
			return
		}
		_, _ = fmt.Fprint(w, body)
	}
}

// eventually polls cond every 10ms for up to 15s (generous: a loaded
// two-core machine under -race is slow).
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("gave up after 15s waiting for %s", what)
}

func TestMetricsCountALeaderThenAHit(t *testing.T) {
	up := newUpstream(t, slow(0, "cached answer"))
	startCaddy(t, site("ttl 1s\n\t\tzone obs-hit"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	zone := []string{"handler", "obs-hit"}

	before := scrapeMetrics(t, client)
	if f := get(client, "GET", url); f.status != 200 || !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("first GET: %d, Cache-Status %q; want a stored 200", f.status, f.cacheStatus())
	}
	if f := get(client, "GET", url); f.status != 200 || !strings.Contains(f.cacheStatus(), "hit") {
		t.Fatalf("second GET: %d, Cache-Status %q; want a hit", f.status, f.cacheStatus())
	}
	after := scrapeMetrics(t, client)

	expectDelta(t, before, after, 1, "caddy_coalesce_requests_total", append(zone, "outcome", "leader")...)
	expectDelta(t, before, after, 1, "caddy_coalesce_requests_total", append(zone, "outcome", "hit")...)
	expectDelta(t, before, after, 0, "caddy_coalesce_requests_total", append(zone, "outcome", "collapsed")...)
	expectDelta(t, before, after, 1, "caddy_coalesce_upstream_requests_total", zone...)
	expectDelta(t, before, after, 1, "caddy_coalesce_flight_duration_seconds", zone...)
	expectDelta(t, before, after, 0, "caddy_coalesce_follower_wait_seconds", zone...)
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
	if v := after.get(t, "caddy_coalesce_cache_entries", zone...); v != 1 {
		t.Errorf("caddy_coalesce_cache_entries = %v, want 1", v)
	}
	if v := after.get(t, "caddy_coalesce_cache_bytes", zone...); v < float64(len("cached answer")) {
		t.Errorf("caddy_coalesce_cache_bytes = %v, want at least the body's %d bytes", v, len("cached answer"))
	}
	if v := after.get(t, "caddy_coalesce_cache_max_bytes", zone...); v != 64<<20 {
		t.Errorf("caddy_coalesce_cache_max_bytes = %v, want the default 64 MiB", v)
	}
	// Every outcome exists from the start, so that ratios work at once.
	for _, o := range []string{"hit", "stale", "stale_if_error", "collapsed", "leader", "bypass", "uncollapsible", "breaker_open", "timeout", "error"} {
		if _, ok := after.value("caddy_coalesce_requests_total", append(zone, "outcome", o)...); !ok {
			t.Errorf("caddy_coalesce_requests_total has no outcome=%q series", o)
		}
	}
}

func TestMetricsAndAdminFollowAHerd(t *testing.T) {
	gate := make(chan struct{})
	up := newUpstream(t, gated(gate, "herd answer"))
	startCaddy(t, site("ttl 0\n\t\tzone obs-herd"), up)
	client := newClient(t)
	warm(t, client, 50)
	path := pathFor(t, "")
	zone := []string{"handler", "obs-herd"}

	before := scrapeMetrics(t, client)
	done := make(chan []fetched)
	go func() { done <- herd(client, 50, "GET", baseURL+path+"?token=secret") }()

	// While the leader waits for the upstream: one flight, 49 followers.
	eventually(t, "49 waiting followers in /metrics", func() bool {
		v, _ := scrapeMetrics(t, client).value("caddy_coalesce_waiting_followers", zone...)
		return v == 49
	})
	during := scrapeMetrics(t, client)
	if v := during.get(t, "caddy_coalesce_inflight_flights", zone...); v != 1 {
		t.Errorf("caddy_coalesce_inflight_flights during the herd = %v, want 1", v)
	}
	var inflight adminInflight
	if st := adminJSON(t, client, "GET", "/coalesce/inflight", "", &inflight); st != http.StatusOK {
		t.Fatalf("GET /coalesce/inflight: status %d", st)
	}
	var ours []adminFlight
	for _, f := range inflight.Flights {
		if f.Zone == "obs-herd" {
			ours = append(ours, f)
		}
	}
	if len(ours) != 1 {
		t.Fatalf("GET /coalesce/inflight lists %d flights of zone obs-herd, want 1: %+v", len(ours), inflight)
	}
	f := ours[0]
	if f.Method != "GET" || f.Path != path || f.Waiters != 49 || f.Refresh || f.AgeNS <= 0 || f.Age == "" {
		t.Errorf("flight %+v: want GET %s (no query), 49 waiters, a positive age", f, path)
	}
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(f.Key) {
		t.Errorf("flight key %q is not a short hex hash", f.Key)
	}
	if inflight.Limit != 100 || inflight.Total < 1 {
		t.Errorf("GET /coalesce/inflight: limit %d total %d, want the default limit 100 and at least 1 flight", inflight.Limit, inflight.Total)
	}

	close(gate)
	got := <-done
	expectAll(t, got, http.StatusOK, "herd answer")
	after := scrapeMetrics(t, client)

	expectDelta(t, before, after, 1, "caddy_coalesce_requests_total", append(zone, "outcome", "leader")...)
	expectDelta(t, before, after, 49, "caddy_coalesce_requests_total", append(zone, "outcome", "collapsed")...)
	expectDelta(t, before, after, 1, "caddy_coalesce_upstream_requests_total", zone...)
	expectDelta(t, before, after, 49, "caddy_coalesce_follower_wait_seconds", zone...)
	expectDelta(t, before, after, 1, "caddy_coalesce_flight_duration_seconds", zone...)
	for _, gauge := range []string{"caddy_coalesce_inflight_flights", "caddy_coalesce_waiting_followers", "caddy_coalesce_cache_entries"} {
		if v := after.get(t, gauge, zone...); v != 0 {
			t.Errorf("%s after the herd = %v, want 0 (ttl 0 stores nothing)", gauge, v)
		}
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}

	var stats adminStats
	if st := adminJSON(t, client, "GET", "/coalesce/stats", "", &stats); st != http.StatusOK {
		t.Fatalf("GET /coalesce/stats: status %d", st)
	}
	z, ok := stats.Zones["obs-herd"]
	if !ok {
		t.Fatalf("GET /coalesce/stats has no zone obs-herd: %+v", stats)
	}
	r := z.Registry
	if z.Engines != 1 || r.Flights != 1 || r.Collapsed != 49 || r.Published != 1 || r.ActiveKeys != 0 || r.Waiters != 0 {
		t.Errorf("zone obs-herd: %+v; want 1 engine, 1 flight, 49 collapsed, 1 published, nothing active", z)
	}
	if r.AverageLifetimeNS <= 0 || r.MaxLifetimeNS < r.AverageLifetimeNS {
		t.Errorf("zone obs-herd lifetimes: average %dns max %dns; want 0 < average <= max", r.AverageLifetimeNS, r.MaxLifetimeNS)
	}
	if stats.Total.Registry.Collapsed < r.Collapsed || stats.Total.Engines < 1 {
		t.Errorf("total %+v does not include zone obs-herd", stats.Total)
	}
	if stats.Bypass.Enabled {
		t.Errorf("stats report the kill switch on")
	}
}

func TestBypassKillSwitchTurnsCollapsingOffAndOnWithoutReload(t *testing.T) {
	// The upstream holds every request until the phase's gate opens, so the
	// 100 requests of a phase are concurrent however slow the machine is.
	var mu sync.Mutex
	gate := make(chan struct{})
	currentGate := func() chan struct{} { mu.Lock(); defer mu.Unlock(); return gate }
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		gated(currentGate(), "answer")(w, r)
	})
	startCaddy(t, site("ttl 0\n\t\tzone obs-bypass"), up)
	client := newClient(t)
	t.Cleanup(func() { setBypass(t, client, false) })
	warm(t, client, 100)
	url := baseURL + pathFor(t, "")
	zone := []string{"handler", "obs-bypass"}

	before := scrapeMetrics(t, client)
	reloaded := before.get(t, "caddy_config_last_reload_success_timestamp_seconds")

	setBypass(t, client, true)
	var stats adminStats
	adminJSON(t, client, "GET", "/coalesce/stats", "", &stats)
	if !stats.Bypass.Enabled || stats.Bypass.Changed == nil {
		t.Errorf("GET /coalesce/stats while the kill switch is on: bypass %+v, want enabled with a change time", stats.Bypass)
	}
	if v := scrapeMetrics(t, client).get(t, "caddy_coalesce_bypass_enabled"); v != 1 {
		t.Errorf("caddy_coalesce_bypass_enabled = %v, want 1", v)
	}

	done := make(chan []fetched)
	go func() { done <- herd(client, 100, "GET", url) }()
	eventually(t, "100 requests at the upstream at once", func() bool { return up.inflight.Load() == 100 })
	close(currentGate())
	got := <-done
	expectAll(t, got, http.StatusOK, "answer")
	if n := up.Calls(); n != 100 {
		t.Errorf("kill switch on: 100 concurrent GETs made %d upstream calls, want 100", n)
	}
	for i, f := range got {
		if cs := f.cacheStatus(); !strings.Contains(cs, "fwd=bypass") {
			t.Errorf("client %d: Cache-Status %q, want a bypass", i, cs)
			break
		}
	}
	mid := scrapeMetrics(t, client)
	expectDelta(t, before, mid, 100, "caddy_coalesce_requests_total", append(zone, "outcome", "bypass")...)
	expectDelta(t, before, mid, 100, "caddy_coalesce_upstream_requests_total", zone...)

	setBypass(t, client, false)
	mu.Lock()
	gate = make(chan struct{})
	mu.Unlock()
	go func() { done <- herd(client, 100, "GET", url) }()
	eventually(t, "one leader with 99 followers", func() bool {
		v, _ := scrapeMetrics(t, client).value("caddy_coalesce_waiting_followers", zone...)
		return v == 99
	})
	close(currentGate())
	got = <-done
	expectAll(t, got, http.StatusOK, "answer")
	if n := up.Calls() - 100; n != 1 {
		t.Errorf("kill switch off again: 100 concurrent GETs made %d upstream calls, want 1", n)
	}
	after := scrapeMetrics(t, client)
	expectDelta(t, mid, after, 0, "caddy_coalesce_requests_total", append(zone, "outcome", "bypass")...)
	expectDelta(t, mid, after, 99, "caddy_coalesce_requests_total", append(zone, "outcome", "collapsed")...)
	if v := after.get(t, "caddy_coalesce_bypass_enabled"); v != 0 {
		t.Errorf("caddy_coalesce_bypass_enabled = %v, want 0", v)
	}
	if v := after.get(t, "caddy_config_last_reload_success_timestamp_seconds"); v != reloaded {
		t.Errorf("the config was reloaded (last reload %v, before %v); the kill switch must not need one", v, reloaded)
	}
}

func TestAdminEndpointsAnswerWrongRequestsClearly(t *testing.T) {
	up := newUpstream(t, slow(0, "x"))
	startCaddy(t, site("zone obs-admin"), up)
	client := newClient(t)
	t.Cleanup(func() { setBypass(t, client, false) })

	cases := []struct {
		method, path, body string
		status             int
		mention            string
	}{
		{"POST", "/coalesce/stats", "", http.StatusMethodNotAllowed, "GET"},
		{"DELETE", "/coalesce/inflight", "", http.StatusMethodNotAllowed, "GET"},
		{"PUT", "/coalesce/bypass", `{"enabled": true}`, http.StatusMethodNotAllowed, "POST"},
		{"POST", "/coalesce/breakers", "", http.StatusMethodNotAllowed, "GET"},
		{"GET", "/coalesce/inflight?limit=0", "", http.StatusBadRequest, "limit"},
		{"GET", "/coalesce/inflight?limit=1001", "", http.StatusBadRequest, "1000"},
		{"GET", "/coalesce/inflight?limit=ten", "", http.StatusBadRequest, "limit"},
		{"POST", "/coalesce/bypass", `{"enabled": tru`, http.StatusBadRequest, "enabled"},
		{"POST", "/coalesce/bypass", `{}`, http.StatusBadRequest, "missing"},
		{"POST", "/coalesce/bypass", `{"enabled": "yes"}`, http.StatusBadRequest, "enabled"},
		{"POST", "/coalesce/bypass", `{"enable": true}`, http.StatusBadRequest, "enable"},
		{"POST", "/coalesce/bypass", `{"enabled": true} {"enabled": false}`, http.StatusBadRequest, "after"},
		{"POST", "/coalesce/bypass", ``, http.StatusBadRequest, "enabled"},
	}
	for _, c := range cases {
		var e adminError
		st := adminJSON(t, client, c.method, c.path, c.body, &e)
		if st != c.status || !strings.Contains(e.Error, c.mention) {
			t.Errorf("%s %s %s: %d %q, want %d and a message that mentions %q", c.method, c.path, c.body, st, e.Error, c.status, c.mention)
		}
	}
	// None of the refused requests switched the kill switch.
	var state struct{ Enabled bool }
	if st := adminJSON(t, client, "GET", "/coalesce/bypass", "", &state); st != http.StatusOK || state.Enabled {
		t.Errorf("GET /coalesce/bypass: %d enabled=%v, want 200 and off", st, state.Enabled)
	}
	var inflight adminInflight
	if st := adminJSON(t, client, "GET", "/coalesce/inflight?limit=1000", "", &inflight); st != http.StatusOK || inflight.Limit != 1000 || inflight.Flights == nil {
		t.Errorf("GET /coalesce/inflight?limit=1000: %d %+v, want 200, limit 1000 and a (possibly empty) list", st, inflight)
	}
	var breakers map[string]any
	if st := adminJSON(t, client, "GET", "/coalesce/breakers", "", &breakers); st != http.StatusOK {
		t.Errorf("GET /coalesce/breakers: %d", st)
	}
}

func TestMetricsKeepCountingAcrossReloads(t *testing.T) {
	up := newUpstream(t, slow(0, "answer"))
	// Two coalesce handlers in one config register the same collectors
	// twice in one registry; a reload registers them again in a new one.
	twoZones := func(ttl string) string {
		return fmt.Sprintf(`:%d {
	handle /a/* {
		coalesce {
			ttl %s
			zone obs-reload-a
		}
		reverse_proxy {up}
	}
	handle /b/* {
		coalesce {
			zone obs-reload-b
		}
		reverse_proxy {up}
	}
}
`, httpPort, ttl)
	}
	client := newClient(t)
	zoneA := []string{"handler", "obs-reload-a"}
	count := func() float64 {
		v, _ := scrapeMetrics(t, client).value("caddy_coalesce_requests_total", append(zoneA, "outcome", "leader")...)
		return v
	}

	startCaddy(t, twoZones("0"), up, up)
	start := count()
	for i := range 3 {
		if f := get(client, "GET", fmt.Sprintf("%s/a/%s-%d", baseURL, t.Name(), i)); f.status != 200 {
			t.Fatalf("GET before the reload: %d", f.status)
		}
	}
	if n := count() - start; n != 3 {
		t.Fatalf("leaders counted before the reload: %v, want 3", n)
	}

	// The same config again (same state kept), then changed settings for
	// zone a (a new registry and cache under the same zone).
	startCaddy(t, twoZones("0"), up, up)
	startCaddy(t, twoZones("100ms"), up, up)
	for i := range 2 {
		if f := get(client, "GET", fmt.Sprintf("%s/a/%s-after-%d", baseURL, t.Name(), i)); f.status != 200 {
			t.Fatalf("GET after the reloads: %d", f.status)
		}
	}
	if n := count() - start; n != 5 {
		t.Errorf("leaders counted across the reloads: %v, want 3 + 2", n)
	}
	var stats adminStats
	adminJSON(t, client, "GET", "/coalesce/stats", "", &stats)
	if a := stats.Zones["obs-reload-a"]; a.Engines != 1 || a.Registry.Flights != 2 || a.Cache.Entries != 2 {
		t.Errorf("zone obs-reload-a after the reload that changed its settings: %+v; want 1 engine with the 2 new flights and entries", a)
	}
	if _, ok := stats.Zones["obs-reload-b"]; !ok {
		t.Errorf("zone obs-reload-b missing from /coalesce/stats")
	}
}

func TestMetricsAndAdminShowABreakerTrip(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
	})
	startCaddy(t, site("ttl 0\n\t\tzone obs-breaker\n\t\tbreaker {\n\t\t\tfailures 3\n\t\t\topen 5s\n\t\t}"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	zone := []string{"handler", "obs-breaker"}
	upstream := []string{"upstream", up.addr}

	before := scrapeMetrics(t, client)
	for i := range 3 {
		if f := get(client, "GET", url); f.status != http.StatusServiceUnavailable {
			t.Fatalf("failing request %d: %d, want the upstream's 503", i, f.status)
		}
	}
	refused := get(client, "GET", url)
	if refused.status != http.StatusServiceUnavailable || refused.header.Get("Retry-After") == "" {
		t.Fatalf("after 3 failures: %d, Retry-After %q; want 503 from the open breaker", refused.status, refused.header.Get("Retry-After"))
	}
	if n := up.Calls(); n != 3 {
		t.Errorf("upstream calls: %d, want 3 (the open breaker answers the 4th)", n)
	}
	after := scrapeMetrics(t, client)
	if v := after.get(t, "caddy_coalesce_breaker_state", upstream...); v != 2 {
		t.Errorf("caddy_coalesce_breaker_state{upstream=%q} = %v, want 2 (open)", up.addr, v)
	}
	expectDelta(t, before, after, 1, "caddy_coalesce_breaker_transitions_total", append(upstream, "from", "closed", "to", "open")...)
	expectDelta(t, before, after, 1, "caddy_coalesce_requests_total", append(zone, "outcome", "breaker_open")...)
	expectDelta(t, before, after, 3, "caddy_coalesce_requests_total", append(zone, "outcome", "leader")...)
	expectDelta(t, before, after, 3, "caddy_coalesce_upstream_requests_total", zone...)

	var breakers struct {
		Breakers []struct {
			Upstream string `json:"upstream"`
			State    string `json:"state"`
			Counts   struct {
				Requests            uint32 `json:"requests"`
				ConsecutiveFailures uint32 `json:"consecutive_failures"`
			} `json:"counts"`
			OpenUntil    *time.Time `json:"open_until"`
			HalfOpenInNS int64      `json:"half_open_in_ns"`
			HalfOpenIn   string     `json:"half_open_in"`
			Settings     string     `json:"settings"`
		} `json:"breakers"`
	}
	if st := adminJSON(t, client, "GET", "/coalesce/breakers", "", &breakers); st != http.StatusOK {
		t.Fatalf("GET /coalesce/breakers: %d", st)
	}
	found := false
	for _, b := range breakers.Breakers {
		if b.Upstream != up.addr {
			continue
		}
		found = true
		if b.State != "open" || b.OpenUntil == nil || b.HalfOpenInNS <= 0 || b.HalfOpenInNS > int64(5*time.Second) || b.HalfOpenIn == "" || b.Settings == "" {
			t.Errorf("breaker of %s: %+v; want open, half-open within 5s", up.addr, b)
		}
	}
	if !found {
		t.Errorf("GET /coalesce/breakers does not list %s: %+v", up.addr, breakers)
	}
	var stats struct {
		Breakers struct {
			Closed, Open int
			HalfOpen     int `json:"half_open"`
		} `json:"breakers"`
	}
	adminJSON(t, client, "GET", "/coalesce/stats", "", &stats)
	if stats.Breakers.Open < 1 {
		t.Errorf("GET /coalesce/stats breakers %+v: want at least one open", stats.Breakers)
	}
}

func TestMetricsCountAnAbandonedFlight(t *testing.T) {
	up := newUpstream(t, slow(20*time.Second, "too late"))
	startCaddy(t, site("zone obs-abandon"), up)
	client := newClient(t)
	zone := []string{"handler", "obs-abandon"}

	before := scrapeMetrics(t, client)
	impatient := *client
	impatient.Timeout = 500 * time.Millisecond
	if f := get(&impatient, "GET", baseURL+pathFor(t, "")); f.err == nil {
		t.Fatalf("the impatient client got %d, want it to give up", f.status)
	}
	eventually(t, "the abandoned flight in /metrics", func() bool {
		return delta(before, scrapeMetrics(t, client), "caddy_coalesce_flights_abandoned_total", zone...) == 1
	})
	eventually(t, "the upstream request to be cancelled", func() bool { return up.inflight.Load() == 0 })
	after := scrapeMetrics(t, client)
	if v := after.get(t, "caddy_coalesce_inflight_flights", zone...); v != 0 {
		t.Errorf("caddy_coalesce_inflight_flights = %v after the flight was abandoned, want 0", v)
	}
}

func TestObservabilityPlaceholdersInAccessLog(t *testing.T) {
	up := newUpstream(t, slow(0, "logged"))
	logFile := filepath.Join(t.TempDir(), "access.log")
	startCaddy(t, fmt.Sprintf(`:%d {
	log {
		output file %s
		format json
	}
	log_append coalesce_status {http.coalesce.status}
	log_append coalesce_key {http.coalesce.key_hash}
	log_append coalesce_waiters {http.coalesce.waiters}
	log_append coalesce_detail {http.coalesce.detail}
	coalesce {
		ttl 1s
		zone obs-log
	}
	reverse_proxy {up}
}
`, httpPort, logFile), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	get(client, "GET", url, "Authorization: Bearer do-not-log-me")
	get(client, "GET", url, "Authorization: Bearer do-not-log-me")
	get(client, "POST", url)

	var lines []map[string]any
	eventually(t, "three access log lines", func() bool {
		raw, _ := os.ReadFile(logFile)
		lines = nil
		for _, l := range bytes.Split(bytes.TrimSpace(raw), []byte("\n")) {
			var m map[string]any
			if json.Unmarshal(l, &m) == nil && m["coalesce_status"] != nil {
				lines = append(lines, m)
			}
		}
		return len(lines) >= 3
	})
	if lines[0]["coalesce_status"] != "leader" || lines[1]["coalesce_status"] != "hit" {
		t.Errorf("coalesce_status: %v then %v, want leader then hit", lines[0]["coalesce_status"], lines[1]["coalesce_status"])
	}
	key, _ := lines[0]["coalesce_key"].(string)
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(key) || lines[1]["coalesce_key"] != key {
		t.Errorf("coalesce_key: %v then %v, want the same 16-hex-digit hash", lines[0]["coalesce_key"], lines[1]["coalesce_key"])
	}
	if lines[2]["coalesce_status"] != "bypass" || lines[2]["coalesce_key"] != "" {
		t.Errorf("a POST logged coalesce_status %v, coalesce_key %#v; want bypass and an empty key", lines[2]["coalesce_status"], lines[2]["coalesce_key"])
	}
	if lines[0]["coalesce_waiters"] != "0" {
		t.Errorf("coalesce_waiters of a lone leader: %v, want \"0\"", lines[0]["coalesce_waiters"])
	}
	raw, _ := os.ReadFile(logFile)
	if bytes.Contains(raw, []byte("do-not-log-me")) {
		t.Errorf("the access log contains the Authorization value")
	}
}

// The example in the repository must stay a config Caddy accepts, with the
// access log fields that docs/OBSERVABILITY.md points to.
func TestObservabilityCaddyfileExampleAdapts(t *testing.T) {
	src, err := os.ReadFile("../Caddyfile.example")
	if err != nil {
		t.Fatal(err)
	}
	adapter := caddyconfig.GetAdapter("caddyfile")
	cfgJSON, warnings, err := adapter.Adapt(src, map[string]any{"filename": "Caddyfile.example"})
	if err != nil {
		t.Fatalf("caddy adapt Caddyfile.example: %v", err)
	}
	for _, w := range warnings {
		t.Logf("adapt warning: %s", w)
	}
	if !bytes.Contains(cfgJSON, []byte(`{http.coalesce.status}`)) {
		t.Errorf("Caddyfile.example does not log {http.coalesce.status}")
	}
	var cfg caddy.Config
	if err := json.Unmarshal(cfgJSON, &cfg); err != nil {
		t.Fatal(err)
	}
	if err := caddy.Validate(&cfg); err != nil {
		t.Errorf("caddy validate Caddyfile.example: %v", err)
	}
}
