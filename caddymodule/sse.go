package caddymodule

import (
	"net/http"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
	"github.com/edge-coalesce/caddy-coalesce/coalesce/fanout"
)

// SSEOptions turn on the fan-out of server-sent event streams: every `GET`
// with `Accept: text/event-stream` joins the one upstream stream of its key
// (the usual key: path, query and the requester's identity; not
// Last-Event-ID), which the first subscriber starts through the rest of the
// route and every later one shares. Without `sse`, event streams pass
// straight through. Each field's zero value means its default.
type SSEOptions struct {
	// How many recent events each stream keeps, so that a subscriber that
	// reconnects with Last-Event-ID is sent what it missed. A Last-Event-ID
	// older than that sends the subscriber upstream on its own, carrying
	// its Last-Event-ID (`Cache-Status: ...; detail=replay-miss`).
	// Default: 256. -1 keeps none. At most 100000.
	Replay int `json:"replay,omitempty"`

	// How many events may wait for one subscriber. A subscriber further
	// behind (a client that stopped reading) is dropped: its connection is
	// closed, and EventSource reconnects with Last-Event-ID. Default: 64.
	Buffer int `json:"buffer,omitempty"`

	// How long the upstream stream stays open after its last subscriber
	// left; a subscriber that arrives meanwhile reuses it. Default: 2s.
	// -1 closes it at once. At most 10m.
	Linger caddy.Duration `json:"linger,omitempty"`

	// Write a `:` comment to the subscribers of a stream that has been
	// silent this long, so that proxies and browsers keep the connection.
	// Default: 15s. -1 turns it off. At least 100ms, at most 1h.
	Heartbeat caddy.Duration `json:"heartbeat,omitempty"`

	// The most subscribers of one stream; more are sent upstream on their
	// own. Default: 10000.
	MaxSubscribers int `json:"max_subscribers,omitempty"`
}

// config turns the options into the engine's.
func (o *SSEOptions) config() *coalesce.SSEConfig {
	if o == nil {
		return nil
	}
	return &coalesce.SSEConfig{
		Replay:         o.Replay,
		Buffer:         o.Buffer,
		Linger:         time.Duration(o.Linger),
		Heartbeat:      time.Duration(o.Heartbeat),
		MaxSubscribers: o.MaxSubscribers,
	}
}

// unmarshalSSE parses `sse` and its block:
//
//	sse {
//		replay          <n>
//		buffer          <n>
//		linger          <duration>
//		heartbeat       <duration>
//		max_subscribers <n>
//	}
func (h *Handler) unmarshalSSE(d *caddyfile.Dispenser) error {
	o := &SSEOptions{}
	h.SSE = o
	if d.NextArg() {
		return d.Errf("sse takes a block or nothing (got %q); e.g. sse { replay 256 }", d.Val())
	}
	seen := map[string]string{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if err := once(d, seen); err != nil {
			return err
		}
		switch opt {
		case "replay":
			n, err := parseCountFrom(d, 0)
			if err != nil {
				return err
			}
			if n == 0 {
				n = -1 // none; 0 is the default in JSON
			}
			o.Replay = n
		case "buffer":
			n, err := parseCountFrom(d, 1)
			if err != nil {
				return err
			}
			o.Buffer = n
		case "max_subscribers":
			n, err := parseCountFrom(d, 1)
			if err != nil {
				return err
			}
			o.MaxSubscribers = n
		case "linger":
			dur, err := parseDurationOrOff(d)
			if err != nil {
				return err
			}
			o.Linger = dur
		case "heartbeat":
			dur, err := parseDurationOrOff(d)
			if err != nil {
				return err
			}
			o.Heartbeat = dur
		default:
			return d.Errf("unrecognized sse option %q; the options are replay, buffer, linger, heartbeat and max_subscribers", opt)
		}
		if err := o.config().Validate(); err != nil {
			return d.Errf("%v", err)
		}
	}
	return nil
}

// parseCountFrom reads one whole number of at least least.
func parseCountFrom(d *caddyfile.Dispenser, least int) (int, error) {
	opt := d.Val()
	if !d.NextArg() {
		return 0, d.Errf("%s needs a number, e.g. %s 64", opt, opt)
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n < least {
		return 0, d.Errf("%s must be a whole number of at least %d (got %q)", opt, least, d.Val())
	}
	if d.NextArg() {
		return 0, d.Errf("%s takes one number, got another argument %q; remove it", opt, d.Val())
	}
	return n, nil
}

// Metrics of the fan-out. Counters live for the process, like the others;
// the gauges (open streams, subscribers) are read from the listed engines
// at scrape time.
var sseMetrics = struct {
	once       sync.Once
	events     *prometheus.CounterVec
	replays    *prometheus.CounterVec
	drops      *prometheus.CounterVec
	reconnects *prometheus.CounterVec
	fanout     *prometheus.HistogramVec
	state      *streamCollector
}{}

func initSSEMetrics() {
	sseMetrics.once.Do(func() {
		counter := func(name, help string, labels ...string) *prometheus.CounterVec {
			return prometheus.NewCounterVec(prometheus.CounterOpts{
				Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: name, Help: help,
			}, append([]string{"handler"}, labels...))
		}
		sseMetrics.events = counter("sse_events_total", "Events received from upstream event streams and fanned out to their subscribers.")
		sseMetrics.replays = counter("sse_replays_total", "Subscribers that sent Last-Event-ID: answered from the stream's recent events (hit) or sent upstream on their own (miss).", "result")
		sseMetrics.drops = counter("sse_drops_total", "Subscribers closed by their stream, by reason: slow (more than buffer events behind), upstream (the upstream stream ended for good), closed (config reload or shutdown).", "reason")
		sseMetrics.reconnects = counter("sse_upstream_reconnects_total", "Upstream event stream requests sent again after the connection ended, with Last-Event-ID.")
		sseMetrics.fanout = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "sse_fanout_seconds",
			Help: "Time to hand one upstream event to every subscriber of its stream (what the last one in line waits for): writing it to detached subscribers' connections, queueing it for the others.",
			// Queueing for 1 000 subscribers takes tens of microseconds;
			// writing to 1 000 connections a few milliseconds.
			Buckets: []float64{5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1},
		}, []string{"handler"})
		sseMetrics.state = &streamCollector{
			streams:     prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "sse_streams"), "Event streams fanned out now (one upstream request each).", []string{"handler"}, nil),
			subscribers: prometheus.NewDesc(prometheus.BuildFQName(metricsNamespace, metricsSubsystem, "sse_subscribers"), "Subscribers of fanned-out event streams now.", []string{"handler"}, nil),
		}
	})
}

// sseCollectors are registered with the others in every config's registry.
func sseCollectors() []prometheus.Collector {
	initSSEMetrics()
	return []prometheus.Collector{sseMetrics.events, sseMetrics.replays, sseMetrics.drops, sseMetrics.reconnects, sseMetrics.fanout, sseMetrics.state}
}

// streamTally counts one zone's stream events; children are resolved once.
type streamTally struct {
	events, hits, misses, reconnects prometheus.Counter
	drops                            map[fanout.Reason]prometheus.Counter
	fanout                           prometheus.Observer
}

func newStreamTally(zone string) *streamTally {
	initSSEMetrics()
	t := &streamTally{
		events:     sseMetrics.events.WithLabelValues(zone),
		hits:       sseMetrics.replays.WithLabelValues(zone, "hit"),
		misses:     sseMetrics.replays.WithLabelValues(zone, "miss"),
		reconnects: sseMetrics.reconnects.WithLabelValues(zone),
		fanout:     sseMetrics.fanout.WithLabelValues(zone),
		drops:      map[fanout.Reason]prometheus.Counter{},
	}
	for _, r := range fanout.Reasons {
		t.drops[r] = sseMetrics.drops.WithLabelValues(zone, string(r))
	}
	return t
}

func (t *streamTally) Event()     { t.events.Inc() }
func (t *streamTally) Reconnect() { t.reconnects.Inc() }
func (t *streamTally) FanOut(d time.Duration) {
	t.fanout.Observe(d.Seconds())
}
func (t *streamTally) Replay(hit bool) {
	if hit {
		t.hits.Inc()
	} else {
		t.misses.Inc()
	}
}
func (t *streamTally) Drop(r fanout.Reason) {
	if c, ok := t.drops[r]; ok {
		c.Inc()
	}
}

// streamCollector reports the open streams and their subscribers per zone.
type streamCollector struct {
	streams, subscribers *prometheus.Desc
}

func (c *streamCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.streams
	ch <- c.subscribers
}

func (c *streamCollector) Collect(ch chan<- prometheus.Metric) {
	for _, z := range snapshotZones() {
		if len(z.Engines) == 0 {
			continue
		}
		var streams, subs float64
		for _, e := range z.Engines {
			st := e.Stats().Streams
			streams += float64(st.Streams)
			subs += float64(st.Subscribers)
		}
		ch <- prometheus.MustNewConstMetric(c.streams, prometheus.GaugeValue, streams, z.Zone)
		ch <- prometheus.MustNewConstMetric(c.subscribers, prometheus.GaugeValue, subs, z.Zone)
	}
}

// Bounds of GET /coalesce/streams?limit=.
const (
	defaultStreamsLimit = 100
	maxStreamsLimit     = 1000
)

// streamView is one stream in /coalesce/streams.
type streamView struct {
	Zone string `json:"zone"`
	// Key is a short hash of the key, as in /coalesce/inflight.
	Key         string    `json:"key"`
	Path        string    `json:"path"`
	Subscribers int       `json:"subscribers"`
	Events      uint64    `json:"events"`
	Since       time.Time `json:"since"`
	AgeNS       int64     `json:"age_ns"`
	Age         string    `json:"age"`
	Reconnects  int       `json:"upstream_reconnects"`
	State       string    `json:"state"`
}

type streamsResponse struct {
	// Total is the number of streams open now, listed or not.
	Total       int          `json:"total"`
	Subscribers int64        `json:"subscribers"`
	Limit       int          `json:"limit"`
	Truncated   bool         `json:"truncated"`
	Streams     []streamView `json:"streams"`
}

// handleStreams lists the event streams fanned out now, the most
// subscribed first.
func (a *adminAPI) handleStreams(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	limit := defaultStreamsLimit
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > maxStreamsLimit {
			return apiError(http.StatusBadRequest, "limit must be a whole number from 1 to %d (got %q)", maxStreamsLimit, v)
		}
		limit = n
	}
	now := time.Now()
	resp := streamsResponse{Limit: limit, Streams: []streamView{}}
	for _, z := range snapshotZones() {
		for _, e := range z.Engines {
			st := e.Stats().Streams
			resp.Total += st.Streams
			resp.Subscribers += st.Subscribers
			for _, s := range e.Streams(0) {
				age := now.Sub(s.Since)
				resp.Streams = append(resp.Streams, streamView{
					Zone: z.Zone, Key: s.Key, Path: s.Path, Subscribers: s.Subscribers, Events: s.Events,
					Since: s.Since.UTC(), AgeNS: int64(age), Age: age.Round(time.Millisecond).String(),
					Reconnects: s.Reconnects, State: s.State,
				})
			}
		}
	}
	sort.Slice(resp.Streams, func(i, j int) bool {
		a, b := resp.Streams[i], resp.Streams[j]
		if a.Subscribers != b.Subscribers {
			return a.Subscribers > b.Subscribers
		}
		return a.Since.Before(b.Since)
	})
	if len(resp.Streams) > limit {
		resp.Streams = resp.Streams[:limit]
	}
	resp.Truncated = len(resp.Streams) < resp.Total
	return writeJSON(w, resp)
}
