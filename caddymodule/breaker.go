package caddymodule

import (
	"context"
	"errors"
	"math"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// breakers holds every upstream's circuit breaker for the whole process,
// keyed by upstream address and breaker settings: two routes to one host
// share its state, and a config reload keeps it. The lb_policy `breaker`
// reads the same set.
var breakers = coalesce.NewBreakers(func(c coalesce.BreakerChange) {
	countBreakerChange(c)
	logBreakerChange(c)
})

// breakerLogger is the logger of the handler provisioned last. A breaker's
// state belongs to the process, not to a config, so its changes are logged
// once, by whichever config is current.
var breakerLogger atomic.Pointer[zap.Logger]

// logBreakerChange is told a change after the breaker's lock is released,
// by the request that caused it: a stalled log sink holds up that request
// only.
func logBreakerChange(c coalesce.BreakerChange) {
	log := breakerLogger.Load()
	if log == nil {
		log = caddy.Log().Named("http.handlers.coalesce")
	}
	fields := []zap.Field{
		zap.String("upstream", c.Upstream),
		zap.String("from", string(c.From)),
		zap.String("to", string(c.To)),
		zap.String("reason", c.Reason),
	}
	switch c.To {
	case coalesce.BreakerOpen:
		if c.From == coalesce.BreakerClosed {
			fields = append(fields,
				zap.Uint32("consecutive_failures", c.Counts.ConsecutiveFailures),
				zap.Uint32("failures", c.Counts.Failures),
				zap.Uint32("successes", c.Counts.Successes),
				zap.Uint32("requests", c.Counts.Requests))
		}
		fields = append(fields, zap.Time("probes_from", c.Until))
		log.Warn("circuit breaker opened: answering for the upstream without calling it", fields...)
	case coalesce.BreakerHalfOpen:
		log.Info("circuit breaker half-open: probing the upstream", fields...)
	default:
		log.Info("circuit breaker closed: the upstream answers again", fields...)
	}
}

// BreakerOptions configure the circuit breaker that every upstream behind a
// coalesce handler gets. State is kept per upstream address (as
// reverse_proxy reports it in `{http.reverse_proxy.upstream.hostport}`) and
// per setting, for the whole process: routes to one host with the same
// settings share it, and a config reload keeps it.
//
// A failure is a transport error (reverse_proxy could not connect, or the
// connection broke) or a response whose status is in `status`. A client
// that went away is neither success nor failure.
type BreakerOptions struct {
	// Turn the breaker off: every request goes upstream. Default: on.
	Off bool `json:"off,omitempty"`

	// Consecutive failures that trip the breaker. Default: 5, or none when
	// `ratio` is set (then give both to trip on either).
	Failures int `json:"failures,omitempty"`

	// Trip the breaker when at least this fraction of the requests answered
	// within `window` failed (0 < ratio <= 1), once `min` of them were
	// answered. Default: not used.
	Ratio float64 `json:"ratio,omitempty"`

	// The smallest sample `ratio` judges, so that two requests at night
	// cannot trip it. Default: 20.
	Min int `json:"min,omitempty"`

	// The rolling window `ratio` counts in. Default: 30s.
	Window caddy.Duration `json:"window,omitempty"`

	// How long a tripped breaker answers for its upstream (with a stale copy
	// or 503 and Retry-After) before it lets `probes` requests through to
	// decide. Default: 10s.
	Open caddy.Duration `json:"open,omitempty"`

	// How many requests test a half-open upstream; the others are answered
	// as while open. All must succeed to close the breaker; one failure
	// opens it again. Default: 1.
	Probes int `json:"probes,omitempty"`

	// Response statuses that count as failures. Default: [502, 503, 504].
	Status []int `json:"status,omitempty"`

	// How long a GET or HEAD request waits for the upstream's response
	// headers. Past it the upstream request is cut, its clients get 504
	// Gateway Timeout (`Cache-Status: ...; fwd-status=504;
	// detail="upstream-timeout"`, or a copy within `stale_if_error`), and
	// it counts as a failure: a hung upstream trips the breaker like a
	// failing one. Once the headers are in, the body takes as long as it
	// takes. Requests with a body (uploads, writes) and other methods are
	// never cut. An endpoint that holds requests longer on purpose (long
	// polling) needs a larger value, or none. Default (0 or absent): 30s.
	// A negative duration (-1, the Caddyfile's `timeout 0`) turns it off.
	// At most 1h.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// config turns the options into the engine's breaker settings; zero fields
// take the defaults, nonsense is left for Validate to explain.
func (o *BreakerOptions) config() coalesce.BreakerConfig {
	c := coalesce.DefaultBreakerConfig()
	if o == nil {
		return c
	}
	c.Disabled = o.Off
	if o.Ratio != 0 {
		c.Ratio = o.Ratio
		c.Failures = 0
	}
	if o.Failures != 0 {
		c.Failures = o.Failures
	}
	if o.Min != 0 {
		c.MinRequests = o.Min
	}
	if o.Window != 0 {
		c.Window = time.Duration(o.Window)
	}
	if o.Open != 0 {
		c.Open = time.Duration(o.Open)
	}
	if o.Probes != 0 {
		c.Probes = o.Probes
	}
	if o.Status != nil {
		c.Statuses = o.Status
	}
	if o.Timeout != 0 {
		c.Timeout = time.Duration(o.Timeout)
	}
	return c
}

// unmarshalBreaker parses
//
//	breaker off
//	breaker {
//		failures <n>
//		ratio    <0..1> [min <n>] [window <duration>]
//		open     <duration>
//		probes   <n>
//		status   <code...>
//		timeout  <duration>
//	}
func (h *Handler) unmarshalBreaker(d *caddyfile.Dispenser) error {
	o := &BreakerOptions{}
	h.Breaker = o
	if d.NextArg() {
		if d.Val() != "off" {
			return d.Errf("breaker takes a block, or `off` (got %q)", d.Val())
		}
		if d.NextArg() {
			return d.ArgErr()
		}
		o.Off = true
		if d.NextBlock(d.Nesting()) {
			return d.Err("`breaker off` takes no block")
		}
		return nil
	}
	seen := map[string]string{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if err := once(d, seen); err != nil {
			return err
		}
		var err error
		switch opt {
		case "failures":
			o.Failures, err = parseCount(d)
		case "ratio":
			if !d.NextArg() {
				return d.Err("ratio needs a fraction between 0 and 1, e.g. ratio 0.5 min 20 window 30s")
			}
			r, err := strconv.ParseFloat(d.Val(), 64)
			if err != nil || math.IsNaN(r) || r <= 0 || r > 1 {
				return d.Errf("ratio: %q is not a fraction of the requests above 0 and at most 1 (e.g. 0.5)", d.Val())
			}
			o.Ratio = r
			for d.NextArg() {
				switch d.Val() {
				case "min":
					if !d.NextArg() {
						return d.Err("min needs a number of requests, e.g. min 20")
					}
					n, err := strconv.Atoi(d.Val())
					if err != nil || n < 1 {
						return d.Errf("min: %q is not a positive whole number of requests", d.Val())
					}
					o.Min = n
				case "window":
					if !d.NextArg() {
						return d.Err("window needs a duration, e.g. window 30s")
					}
					dur, err := caddy.ParseDuration(d.Val())
					if err != nil || dur <= 0 {
						return d.Errf("window: %q is not a positive duration (write e.g. 30s, 1m)", d.Val())
					}
					o.Window = caddy.Duration(dur)
				default:
					return d.Errf("ratio: unexpected %q; write ratio <0..1> [min <n>] [window <duration>]", d.Val())
				}
			}
		case "open":
			o.Open, err = parsePositiveDuration(d)
		case "probes":
			o.Probes, err = parseCount(d)
		case "status":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.Err("status needs at least one HTTP status code, e.g. status 502 503 504")
			}
			o.Status = o.Status[:0]
			for _, a := range args {
				n, err := strconv.Atoi(a)
				if err != nil || n < 100 || n > 599 {
					return d.Errf("status: %q is not an HTTP status code; write codes between 100 and 599, e.g. status 502 503 504", a)
				}
				o.Status = append(o.Status, n)
			}
		case "timeout":
			if o.Timeout, err = parseDurationOrOff(d); err == nil && time.Duration(o.Timeout) > coalesce.MaxBreakerTimeout {
				err = d.Errf("timeout must be at most 1h (got %s): it bounds the wait for response headers; write a shorter duration, or 0 to turn it off", d.Val())
			}
		default:
			return d.Errf("unrecognized breaker option %q (want failures, ratio, open, probes, status or timeout)", opt)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// upstreamFailed tells an upstream failure from other errors next returns.
// reverse_proxy returns a HandlerError: 502 or 504 when it could not reach
// the upstream (or the connection broke), 499 when the client went away;
// other handlers return 4xx errors that are not the upstream's fault.
func upstreamFailed(err error) bool {
	if errors.Is(err, context.Canceled) {
		return false
	}
	var he caddyhttp.HandlerError
	if errors.As(err, &he) {
		return he.StatusCode >= 500
	}
	return true
}
