package caddymodule

import (
	"errors"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// Every metric has the label handler, the zone of the coalesce handler (one
// per coalesce directive in a Caddyfile), so its cardinality is bounded by
// the configuration; keys and paths never become labels. The README's
// Metrics section describes each metric.
const (
	metricsNamespace = "caddy"
	metricsSubsystem = "coalesce"
)

// Outcomes are the values of the outcome label, all created at zero when a
// handler is provisioned so that rate() and ratios work from the start.
var outcomes = []coalesce.Outcome{
	coalesce.OutcomeHit, coalesce.OutcomeStale, coalesce.OutcomeStaleIfError, coalesce.OutcomeCollapsed,
	coalesce.OutcomeLeader, coalesce.OutcomeBypass, coalesce.OutcomeUncollapsible,
	coalesce.OutcomeBreakerOpen, coalesce.OutcomeTimeout, coalesce.OutcomeError,
	coalesce.OutcomeSharedHit, coalesce.OutcomeFleetFollower,
}

// durationBuckets suit waits and flights from a millisecond to max_wait's
// default of 10s.
var durationBuckets = []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}

// Collectors are created once per process and registered in every config's
// registry (which is new on each load), as reverse_proxy's metrics are.
// Counters and histograms live here and keep counting across reloads; the
// gauges are read from the listed engines when /metrics is scraped.
var metrics = struct {
	once       sync.Once
	requests   *prometheus.CounterVec
	upstream   *prometheus.CounterVec
	abandoned  *prometheus.CounterVec
	waitTime   *prometheus.HistogramVec
	flightTime *prometheus.HistogramVec
	// breakerTransitions is per upstream; addresses come from the
	// configuration (dynamic upstreams add theirs as they appear).
	breakerTransitions *prometheus.CounterVec
	hotKeyAlerts       *prometheus.CounterVec
	state              *stateCollector
}{}

func initMetrics() {
	metrics.once.Do(func() {
		metrics.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "requests_total",
			Help: "Requests seen by coalesce handlers, by outcome (hit, stale, stale_if_error, collapsed, leader, bypass, uncollapsible, breaker_open, timeout, error, shared_hit, fleet_follower).",
		}, []string{"handler", "outcome"})
		metrics.upstream = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "upstream_requests_total",
			Help: "Requests coalesce handlers passed to the next handler (leaders, bypasses, uncollapsible requests, background refreshes).",
		}, []string{"handler"})
		metrics.abandoned = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "flights_abandoned_total",
			Help: "Flights cancelled because every client waiting for them went away before the upstream answered.",
		}, []string{"handler"})
		metrics.waitTime = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "follower_wait_seconds",
			Help:    "How long followers waited for their leader (answered, timed out or released with an error).",
			Buckets: durationBuckets,
		}, []string{"handler"})
		metrics.flightTime = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "flight_duration_seconds",
			Help:    "How long flights ran, from the leader's arrival until the upstream answered or failed.",
			Buckets: durationBuckets,
		}, []string{"handler"})
		metrics.breakerTransitions = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "breaker_transitions_total",
			Help: "State changes of the upstreams' circuit breakers (closed, open, half-open).",
		}, []string{"upstream", "from", "to"})
		metrics.hotKeyAlerts = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "hot_key_alerts_total",
			Help: "Keys (method, host, path) whose request rate passed hot_key_rate, once per key per window.",
		}, []string{"handler"})
		metrics.state = newStateCollector()
	})
}

// collectors are every collector of the module.
func collectors() []prometheus.Collector {
	return append([]prometheus.Collector{
		metrics.requests, metrics.upstream, metrics.abandoned, metrics.waitTime,
		metrics.flightTime, metrics.breakerTransitions, metrics.hotKeyAlerts, metrics.state,
	}, sseCollectors()...)
}

// registerMetrics puts the collectors in this config's registry.
func registerMetrics(ctx caddy.Context) error {
	initMetrics()
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range collectors() {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

// zoneMetrics are the children of the collectors for one zone, resolved once
// per handler so that a request does not hash label values.
type zoneMetrics struct {
	requests   map[coalesce.Outcome]prometheus.Counter
	upstream   prometheus.Counter
	abandoned  prometheus.Counter
	waitTime   prometheus.Observer
	flightTime prometheus.Observer
	zone       string
}

func metricsFor(zone string) *zoneMetrics {
	initMetrics()
	m := &zoneMetrics{
		requests:   make(map[coalesce.Outcome]prometheus.Counter, len(outcomes)),
		upstream:   metrics.upstream.WithLabelValues(zone),
		abandoned:  metrics.abandoned.WithLabelValues(zone),
		waitTime:   metrics.waitTime.WithLabelValues(zone),
		flightTime: metrics.flightTime.WithLabelValues(zone),
		zone:       zone,
	}
	for _, o := range outcomes {
		m.requests[o] = metrics.requests.WithLabelValues(zone, string(o))
	}
	return m
}

// observe counts one request's outcome.
func (m *zoneMetrics) observe(ev coalesce.Event) {
	if c, ok := m.requests[ev.Outcome]; ok {
		c.Inc()
	} else {
		metrics.requests.WithLabelValues(m.zone, string(ev.Outcome)).Inc()
	}
	if ev.Wait > 0 {
		m.waitTime.Observe(ev.Wait.Seconds())
	}
	if ev.Flight > 0 {
		m.flightTime.Observe(ev.Flight.Seconds())
	}
	if ev.Abandoned {
		m.abandoned.Inc()
	}
}

// countBreakerChange counts one state change of a breaker. Like
// logBreakerChange it runs under that breaker's lock.
func countBreakerChange(c coalesce.BreakerChange) {
	initMetrics()
	metrics.breakerTransitions.WithLabelValues(c.Upstream, string(c.From), string(c.To)).Inc()
}

// breakerStateValue is the value of caddy_coalesce_breaker_state.
func breakerStateValue(s coalesce.BreakerState) float64 {
	switch s {
	case coalesce.BreakerOpen:
		return 2
	case coalesce.BreakerHalfOpen:
		return 1
	default:
		return 0
	}
}

// stateCollector reports what the listed engines hold now: flights, waiting
// followers, micro-cache size and budget, evictions, the kill switch, and the
// state of every upstream's breaker. It
// reads them at scrape time, so the values are right after any number of
// reloads without anyone keeping gauges up to date.
type stateCollector struct {
	flights, waiters, entries, bytes, maxEntries, maxBytes, evictions, bypass, breaker *prometheus.Desc
	// The shared tier's, per handler with one.
	tierState, tierErrors, sharedHits, leaderships, fleetWaits, fleetWaitTimeouts, fleetTrips *prometheus.Desc
}

func newStateCollector() *stateCollector {
	desc := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, name), help, labels, nil)
	}
	return &stateCollector{
		flights:    desc("inflight_flights", "Flights (keys with a request upstream that followers may join) in progress now.", "handler"),
		waiters:    desc("waiting_followers", "Followers waiting for their leader now.", "handler"),
		entries:    desc("cache_entries", "Entries in the micro-cache now.", "handler"),
		bytes:      desc("cache_bytes", "Bytes (bodies and headers) in the micro-cache now.", "handler"),
		maxEntries: desc("cache_max_entries", "The micro-cache's entry budget (max_entries).", "handler"),
		maxBytes:   desc("cache_max_bytes", "The micro-cache's byte budget (max_memory).", "handler"),
		evictions:  desc("cache_evictions_total", "Entries pushed out of the micro-cache to stay within its budgets.", "handler"),
		bypass:     desc("bypass_enabled", "1 while the kill switch (POST /coalesce/bypass) makes every coalesce handler pass requests straight through, else 0."),
		breaker:    desc("breaker_state", "State of the upstream's circuit breaker: 0 closed, 1 half-open, 2 open (the worst, if handlers use different breaker settings for it).", "upstream"),

		tierState:         desc("shared_state", "State of the shared tier (shared): 0 up, 1 probing Redis, 2 down (acting alone).", "handler"),
		tierErrors:        desc("shared_redis_errors_total", "Redis operations of the shared tier that failed or passed its timeout.", "handler"),
		sharedHits:        desc("shared_hits_total", "Fresh entries found in Redis that answered a local leader.", "handler"),
		leaderships:       desc("shared_leaderships_total", "Attempts to become the fleet leader of a key: won (went upstream for the fleet) or lost (another instance leads).", "handler", "result"),
		fleetWaits:        desc("shared_waits_total", "Waits for another instance's flight.", "handler"),
		fleetWaitTimeouts: desc("shared_wait_timeouts_total", "Waits for another instance's flight that ran out of time (the instance went upstream itself).", "handler"),
		fleetTrips:        desc("shared_breaker_trips_total", "Fleet-wide breaker openings this instance published.", "handler"),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.flights, c.waiters, c.entries, c.bytes, c.maxEntries, c.maxBytes, c.evictions, c.bypass, c.breaker,
		c.tierState, c.tierErrors, c.sharedHits, c.leaderships, c.fleetWaits, c.fleetWaitTimeouts, c.fleetTrips} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	for _, z := range snapshotZones() {
		ch <- prometheus.MustNewConstMetric(c.evictions, prometheus.CounterValue, float64(z.RetiredEvictions+z.Stats.Cache.Evictions), z.Zone)
		if len(z.Engines) == 0 {
			continue // only retired engines: nothing in flight or cached
		}
		gauge(c.flights, float64(z.Stats.Registry.ActiveKeys), z.Zone)
		gauge(c.waiters, float64(z.Stats.Registry.Waiters), z.Zone)
		gauge(c.entries, float64(z.Stats.Cache.Entries), z.Zone)
		gauge(c.bytes, float64(z.Stats.Cache.Bytes), z.Zone)
		gauge(c.maxEntries, float64(z.MaxEntries), z.Zone)
		gauge(c.maxBytes, float64(z.MaxBytes), z.Zone)
		if s := z.Stats.Shared; s != nil {
			counter := func(d *prometheus.Desc, v uint64, labels ...string) {
				ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
			}
			gauge(c.tierState, tierStateValue(s.State), z.Zone)
			counter(c.tierErrors, s.Errors, z.Zone)
			counter(c.sharedHits, s.SharedHits, z.Zone)
			counter(c.leaderships, s.LeadershipsWon, z.Zone, "won")
			counter(c.leaderships, s.LeadershipsLost, z.Zone, "lost")
			counter(c.fleetWaits, s.Waits, z.Zone)
			counter(c.fleetWaitTimeouts, s.WaitTimeouts, z.Zone)
			counter(c.fleetTrips, s.BreakerTrips, z.Zone)
		}
	}
	var on float64
	if bypassAll.Load() {
		on = 1
	}
	gauge(c.bypass, on)

	// Snapshot is ordered by upstream: one series per upstream, its worst state.
	var last string
	worst := -1.0
	for _, b := range breakers.Snapshot() {
		if b.Upstream != last && worst >= 0 {
			gauge(c.breaker, worst, last)
			worst = -1
		}
		last, worst = b.Upstream, max(worst, breakerStateValue(b.State))
	}
	if worst >= 0 {
		gauge(c.breaker, worst, last)
	}
}

// Interface guards
var _ prometheus.Collector = (*stateCollector)(nil)
