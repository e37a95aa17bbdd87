package coalesce

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// BreakerConfig configures the circuit breaker that each upstream gets. The
// zero value of every field means its default: BreakerConfig{} trips on 5
// consecutive failures, stays open 10s, then lets one probe through; 502,
// 503 and 504 are failures, and so is a GET without response headers after
// 30s.
type BreakerConfig struct {
	// Disabled turns the breakers off: every request goes upstream.
	Disabled bool
	// Failures is how many consecutive failures trip the breaker. 0: 5,
	// or, when Ratio is set, only Ratio trips it (set both to trip on
	// either).
	Failures int
	// Ratio trips the breaker when at least this fraction (0 < Ratio <= 1)
	// of the requests answered within Window failed, once MinRequests of
	// them have been answered. 0: only Failures trips it.
	Ratio float64
	// MinRequests is the smallest sample Ratio judges. 0: 20.
	MinRequests int
	// Window is the rolling window Ratio counts in. 0: 30s.
	Window time.Duration
	// Open is how long a tripped breaker refuses requests before it lets
	// Probes requests through to decide (half-open). 0: 10s.
	Open time.Duration
	// Probes is how many requests test a half-open upstream. 0: 1.
	Probes int
	// Statuses are the response statuses that count as failures; transport
	// errors always do. Empty: 502, 503 and 504.
	Statuses []int
	// Timeout bounds the wait for the response headers of a GET or HEAD
	// request without a body: past it the upstream request is cut, answered
	// 504 (ErrUpstreamTimeout) and counted as a failure, so that a hung
	// upstream trips the breaker. 0: DefaultBreakerTimeout (30s). Off (a
	// negative duration): no bound. At most MaxBreakerTimeout.
	Timeout time.Duration
}

// MaxBreakerTimeout is the largest BreakerConfig.Timeout: a longer wait for
// response headers is a typo (1h for 1s), or wants no bound at all (Off).
const MaxBreakerTimeout = time.Hour

// DefaultBreakerTimeout is BreakerConfig.Timeout when it is 0.
const DefaultBreakerTimeout = 30 * time.Second

// DefaultBreakerConfig is BreakerConfig{} with its defaults written out.
// The ratio mode, when Ratio is set, waits for 20 answers within a rolling
// 30s window.
func DefaultBreakerConfig() BreakerConfig {
	return BreakerConfig{}.WithDefaults()
}

// WithDefaults returns c with each zero field set to its default.
func (c BreakerConfig) WithDefaults() BreakerConfig {
	if c.Failures == 0 && c.Ratio == 0 {
		c.Failures = 5
	}
	if c.MinRequests == 0 {
		c.MinRequests = 20
	}
	if c.Window == 0 {
		c.Window = 30 * time.Second
	}
	if c.Open == 0 {
		c.Open = 10 * time.Second
	}
	if c.Probes == 0 {
		c.Probes = 1
	}
	if len(c.Statuses) == 0 {
		c.Statuses = []int{502, 503, 504}
	}
	if c.Timeout == 0 {
		c.Timeout = DefaultBreakerTimeout
	}
	return c
}

// Validate explains what is wrong with c, in words for an operator.
func (c BreakerConfig) Validate() error {
	if c.Disabled {
		return nil
	}
	c = c.WithDefaults()
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf("breaker: "+format, args...)) }
	if c.Failures < 0 {
		bad("failures must not be negative (got %d)", c.Failures)
	}
	if math.IsNaN(c.Ratio) || c.Ratio < 0 || c.Ratio > 1 {
		bad("ratio is a fraction of the requests between 0 and 1, e.g. 0.5 (got %g)", c.Ratio)
	}
	if c.Ratio > 0 && c.MinRequests < 1 {
		bad("ratio needs a minimum sample of at least 1 request (min %d), or two requests at night could trip it", c.MinRequests)
	}
	if c.Window < 0 {
		bad("window must not be negative (got %s)", c.Window)
	}
	if c.Open < 0 {
		bad("open must not be negative (got %s)", c.Open)
	}
	if c.Probes < 1 || c.Probes > 10_000 {
		bad("probes is how many requests test a half-open upstream, from 1 to 10000 (got %d)", c.Probes)
	}
	if c.Timeout > MaxBreakerTimeout {
		bad("timeout must be at most %s (got %s): it bounds the wait for response headers; write a shorter duration, or 0 to turn it off (-1 in JSON)", MaxBreakerTimeout, c.Timeout)
	}
	for _, s := range c.Statuses {
		if s < 100 || s > 599 {
			bad("status %d is not an HTTP status code (100-599)", s)
		}
	}
	return errors.Join(errs...)
}

// fingerprint tells breaker settings apart: an upstream has one breaker per
// distinct setting, shared by every handler that uses it. Timeout is not
// one of them: it is how the handler judges a request, not how the breaker
// counts.
func (c BreakerConfig) fingerprint() string {
	return fmt.Sprintf("failures=%d ratio=%g min=%d window=%s open=%s probes=%d status=%v",
		c.Failures, c.Ratio, c.MinRequests, c.Window, c.Open, c.Probes, c.Statuses)
}
