package caddymodule

import (
	"errors"
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// Collectors are created once per process and registered in every config's
// registry (which is new on each load), as reverse_proxy's metrics are.
var metrics = struct {
	once     sync.Once
	requests *prometheus.CounterVec
	upstream prometheus.Counter
	waitTime prometheus.Histogram
}{}

func initMetrics() {
	metrics.once.Do(func() {
		metrics.requests = prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "coalesce", Name: "requests_total",
			Help: "Requests seen by coalesce handlers, by outcome.",
		}, []string{"outcome"})
		metrics.upstream = prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "coalesce", Name: "upstream_requests_total",
			Help: "Requests coalesce handlers sent upstream (leaders, bypasses, uncollapsible requests, refreshes).",
		})
		metrics.waitTime = prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: "caddy", Subsystem: "coalesce", Name: "follower_wait_seconds",
			Help:    "How long collapsed followers waited for their leader.",
			Buckets: []float64{.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		})
	})
}

// registerMetrics puts the collectors in this config's registry.
func registerMetrics(ctx caddy.Context) error {
	initMetrics()
	reg := ctx.GetMetricsRegistry()
	if reg == nil {
		return nil
	}
	for _, c := range []prometheus.Collector{metrics.requests, metrics.upstream, metrics.waitTime} {
		if err := reg.Register(c); err != nil {
			var already prometheus.AlreadyRegisteredError
			if !errors.As(err, &already) {
				return err
			}
		}
	}
	return nil
}

func observeMetrics(_ *http.Request, ev coalesce.Event) {
	if metrics.requests == nil {
		return
	}
	metrics.requests.WithLabelValues(string(ev.Outcome)).Inc()
	if ev.Upstream {
		metrics.upstream.Inc()
	}
	if ev.Outcome == coalesce.OutcomeCollapsed {
		metrics.waitTime.Observe(ev.Wait.Seconds())
	}
}
