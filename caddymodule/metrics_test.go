package caddymodule

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

func TestRegisterMetricsTwiceInOneRegistryAndInTheNext(t *testing.T) {
	for load := range 2 {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		for handler := range 2 {
			if err := registerMetrics(ctx); err != nil {
				t.Fatalf("config %d, handler %d: %v", load, handler, err)
			}
		}
		// Caddy's registry is pedantic: it checks that what the collectors
		// describe is what they collect.
		if _, err := ctx.GetMetricsRegistry().Gather(); err != nil {
			t.Errorf("config %d: gathering: %v", load, err)
		}
		cancel()
	}
}

// gaugeOf reads one series of the state collector.
func gaugeOf(t *testing.T, reg *prometheus.Registry, name, zone string) (float64, bool) {
	t.Helper()
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fams {
		if f.GetName() != name {
			continue
		}
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "handler" && l.GetValue() == zone {
					if m.Counter != nil {
						return m.Counter.GetValue(), true
					}
					return m.Gauge.GetValue(), true
				}
			}
		}
	}
	return 0, false
}

func TestStateCollectorReadsListedEnginesAndKeepsEvictionsAcrossThem(t *testing.T) {
	initMetrics()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(metrics.state)
	// The zone's evictions counter lives as long as the process: an earlier
	// run of this test (go test -count=N) left its engine's evictions in it.
	evictedBefore, _ := gaugeOf(t, reg, "caddy_coalesce_cache_evictions_total", "unit-state")

	// A cache of one entry per shard evicts as soon as two keys meet (each
	// asked for twice: a full cache stores a key's second miss, not its
	// first).
	cfg := coalesce.DefaultConfig()
	cfg.TTL, cfg.MaxEntries = time.Second, 1
	e, err := coalesce.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	listEngine("unit-state/1", "unit-state", e, cfg)
	listEngine("unit-state/1", "unit-state", e, cfg) // a reload with the same settings
	h := e.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = w.Write([]byte("body")) }))
	for i := range 128 {
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", fmt.Sprintf("/k/%d", i/2), nil))
	}
	st := e.Stats().Cache
	if st.Evictions == 0 {
		t.Fatalf("the test needs evictions; cache %+v", st)
	}
	for name, want := range map[string]float64{
		"caddy_coalesce_cache_entries":         float64(st.Entries),
		"caddy_coalesce_cache_bytes":           float64(st.Bytes),
		"caddy_coalesce_cache_max_entries":     1,
		"caddy_coalesce_cache_max_bytes":       float64(cfg.MaxMemory),
		"caddy_coalesce_cache_evictions_total": evictedBefore + float64(st.Evictions),
		"caddy_coalesce_inflight_flights":      0,
		"caddy_coalesce_waiting_followers":     0,
	} {
		if got, ok := gaugeOf(t, reg, name, "unit-state"); !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", name, got, ok, want)
		}
	}

	unlistEngine("unit-state/1") // the old config's cleanup: still held by the new one
	if _, ok := gaugeOf(t, reg, "caddy_coalesce_cache_entries", "unit-state"); !ok {
		t.Errorf("the engine left the list while a config still holds it")
	}
	unlistEngine("unit-state/1")
	if _, ok := gaugeOf(t, reg, "caddy_coalesce_cache_entries", "unit-state"); ok {
		t.Errorf("an engine no config holds is still reported")
	}
	if got, _ := gaugeOf(t, reg, "caddy_coalesce_cache_evictions_total", "unit-state"); got != evictedBefore+float64(st.Evictions) {
		t.Errorf("evictions after the engine left: %v, want %v (a counter never goes down)", got, evictedBefore+float64(st.Evictions))
	}
}

// valueOf reads a counter, or a histogram's sample count.
func valueOf(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var out dto.Metric
	if err := m.Write(&out); err != nil {
		t.Fatal(err)
	}
	if out.Histogram != nil {
		return float64(out.Histogram.GetSampleCount())
	}
	return out.Counter.GetValue()
}

func TestZoneMetricsCountOutcomesWaitsAndAbandonedFlights(t *testing.T) {
	m := metricsFor("unit-count")
	// The counters are the process's: measure what this run adds to them
	// (go test -count=N runs the test again on the same counters).
	collapsed := metrics.requests.WithLabelValues("unit-count", "collapsed")
	added := metrics.requests.WithLabelValues("unit-count", "something-new")
	abandoned := metrics.abandoned.WithLabelValues("unit-count")
	waits := metrics.waitTime.WithLabelValues("unit-count").(prometheus.Metric)
	flights := metrics.flightTime.WithLabelValues("unit-count").(prometheus.Metric)
	before := map[prometheus.Metric]float64{}
	for _, c := range []prometheus.Metric{collapsed, added, abandoned, waits, flights} {
		before[c] = valueOf(t, c)
	}
	m.observe(coalesce.Event{Outcome: coalesce.OutcomeCollapsed, Wait: 3 * time.Millisecond})
	m.observe(coalesce.Event{Outcome: coalesce.OutcomeLeader, Detail: "abandoned", Abandoned: true, Flight: time.Second})
	m.observe(coalesce.Event{Outcome: "something-new"})
	for _, c := range []struct {
		metric prometheus.Metric
		what   string
	}{
		{collapsed, "collapsed requests"},
		{added, "requests of an outcome added later"},
		{abandoned, "abandoned flights"},
		{waits, "follower waits observed"},
		{flights, "flight durations observed"},
	} {
		if got := valueOf(t, c.metric) - before[c.metric]; got != 1 {
			t.Errorf("%s: counted %v times, want 1", c.what, got)
		}
	}
}

func TestObserveLogsWarningsAndNeverTheKey(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	h := &Handler{Zone: "unit-log", logger: zap.New(core), metrics: metricsFor("unit-log")}
	r := httptest.NewRequest("GET", "/x", nil)
	var key coalesce.Key
	for i := range key {
		key[i] = byte(0xa0 + i)
	}

	h.observe(r, coalesce.Event{Outcome: coalesce.OutcomeHit, Key: key})
	h.observe(r, coalesce.Event{Outcome: coalesce.OutcomeTimeout, Key: key, Wait: 10 * time.Second})
	h.observe(r, coalesce.Event{Outcome: coalesce.OutcomeLeader, Key: key, Detail: "abandoned", Abandoned: true, Flight: time.Second})

	if n := logs.FilterLevelExact(zapcore.DebugLevel).FilterMessage("coalesce decision").Len(); n != 3 {
		t.Errorf("%d debug decision lines, want one per request (3)", n)
	}
	warns := logs.FilterLevelExact(zapcore.WarnLevel).All()
	if len(warns) != 2 || !strings.Contains(warns[0].Message, "gave up") || !strings.Contains(warns[1].Message, "abandoned") {
		t.Errorf("warnings %v: want a follower timeout and an abandoned flight", warns)
	}
	full := fmt.Sprintf("%x", key[:])
	for _, e := range logs.All() {
		for k, v := range e.ContextMap() {
			if s := fmt.Sprint(v); strings.Contains(s, full) {
				t.Errorf("%q logs the whole key in %s=%s", e.Message, k, s)
			}
		}
		if e.ContextMap()["key_hash"] != key.String() {
			t.Errorf("%q: key_hash %v, want %s", e.Message, e.ContextMap()["key_hash"], key.String())
		}
	}
}

// The documentation and the dashboard name only metrics that exist, and
// the documentation describes every one.
func TestDocsAndDashboardMatchTheMetrics(t *testing.T) {
	initMetrics()
	served := map[string]bool{}
	descs := make(chan *prometheus.Desc, 64)
	for _, c := range collectors() {
		c.Describe(descs)
	}
	close(descs)
	fqName := regexp.MustCompile(`fqName: "([^"]+)"`)
	for d := range descs {
		served[fqName.FindStringSubmatch(d.String())[1]] = true
	}

	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := os.ReadFile("../docs/OBSERVABILITY.md")
	if err != nil {
		t.Fatal(err)
	}
	dash, err := os.ReadFile("../docs/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var board struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(dash, &board); err != nil || len(board.Panels) == 0 {
		t.Fatalf("docs/grafana-dashboard.json is not a dashboard: %v", err)
	}
	named := regexp.MustCompile(`caddy_coalesce_[a-z_]+`)
	for file, text := range map[string][]byte{"README.md": readme, "OBSERVABILITY.md": doc, "grafana-dashboard.json": dash} {
		for _, m := range named.FindAllString(string(text), -1) {
			name := m
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				if base, ok := strings.CutSuffix(m, suffix); ok && served[base] {
					name = base
				}
			}
			if !served[name] {
				t.Errorf("%s names %s, which is not a metric", file, m)
			}
		}
	}
	for name := range served {
		if !strings.Contains(string(readme), "| `"+name+"` |") {
			t.Errorf("README.md has no table row for %s", name)
		}
	}
	for _, o := range outcomes {
		if !strings.Contains(string(readme), "`"+string(o)+"` (") {
			t.Errorf("README.md's row for caddy_coalesce_requests_total does not explain the outcome %s", o)
		}
	}
}
