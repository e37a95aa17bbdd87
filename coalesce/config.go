package coalesce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// Limits of the configuration.
const (
	MaxTTL = time.Second
	// A copy older than these is not a stand-in anybody wants, and a
	// follower or a hit-for-miss mark held longer is a resource held for
	// nothing: a longer value is a typo (1h for 1s), refused.
	MaxStale        = time.Hour
	MaxStaleIfError = 24 * time.Hour
	MaxMaxWait      = time.Hour
	MaxHitForMiss   = time.Hour
)

// Config configures an Engine. Start from DefaultConfig: the zero value of a
// field is a meaningful setting (for TTL: collapse only, no cache).
type Config struct {
	// TTL is how long a response stays fresh in the micro-cache. 0 means
	// collapse concurrent requests only: nothing is fresh, and a response is
	// kept only for Stale or StaleIfError when they are set. At most MaxTTL.
	TTL time.Duration
	// Stale serves an expired entry for this long after TTL while one
	// background request refreshes it (stale-while-revalidate).
	Stale time.Duration
	// StaleIfError serves the last good entry for this long after TTL when
	// the upstream fails or its breaker is open.
	StaleIfError time.Duration
	// MaxWait is the longest a follower waits for its leader; then it gets
	// 504. 0 means no bound other than the client's own.
	MaxWait time.Duration
	// MaxBody is the largest response body buffered for sharing; larger
	// responses stream to the leader and its followers send their own
	// requests.
	MaxBody int64
	// MaxEntries and MaxMemory bound the micro-cache.
	MaxEntries int
	MaxMemory  int64
	// KeyHeaders are more request headers whose values make responses
	// differ (added to the key).
	KeyHeaders []string
	// IdentityHeaders are more request headers that identify the requester,
	// beside Authorization and Cookie.
	IdentityHeaders []string
	// Public leaves the requester's identity (Authorization, Cookie,
	// IdentityHeaders) out of the key: everybody shares. Only for endpoints
	// whose answer does not depend on who asks.
	Public bool
	// HitForMiss is how long a key whose response could not be shared
	// (Set-Cookie, private, Vary: *, a stream) is sent upstream without
	// collapsing, so that the next burst does not queue for nothing.
	HitForMiss time.Duration
	// MaxFlights bounds the keys in flight at once; requests beyond it go
	// upstream on their own.
	MaxFlights int

	// Breaker configures the circuit breaker each upstream gets.
	Breaker BreakerConfig
	// Breakers is where the breakers live. A server shares one set between
	// its engines (and across configuration reloads) so that every route to
	// an upstream sees one state; nil gives the engine a set of its own.
	Breakers *Breakers

	// Hooks connect the engine to its host server. Engines made by WithHooks
	// share everything else.
	Hooks Hooks
}

// Hooks connect an engine to the server it runs in. Every hook may be nil.
type Hooks struct {
	// Disabled, when it returns true, makes every request pass straight
	// through (a kill switch that needs no reload).
	Disabled func() bool
	// Observe is told the outcome of every request.
	Observe func(r *http.Request, ev Event)
	// Upstream names the upstream that answered r, after next returned; it
	// keys the breakers. nil: every request goes to one upstream, "default".
	// "": this request reached no upstream (its outcome is not counted).
	Upstream func(r *http.Request) string
	// Detach prepares a copy of r for a request made on nobody's behalf (a
	// stale-while-revalidate refresh). nil means r.Clone.
	Detach func(r *http.Request, ctx context.Context) *http.Request
	// UpstreamFailed classifies an error returned by next as an upstream
	// failure (true) rather than something else, e.g. a client cancel
	// (false, not counted). nil: every error except context cancellation
	// is a failure.
	UpstreamFailed func(err error) bool
}

// DefaultConfig is the configuration of a bare `coalesce`.
func DefaultConfig() Config {
	return Config{
		TTL:        50 * time.Millisecond,
		MaxWait:    10 * time.Second,
		MaxBody:    1 << 20,
		MaxEntries: 10_000,
		MaxMemory:  64 << 20,
		HitForMiss: 5 * time.Second,
		MaxFlights: 100_000,
		Breaker:    DefaultBreakerConfig(),
	}
}

// Validate explains the first thing wrong with c, in words for an operator.
func (c Config) Validate() error {
	var errs []error
	dur := func(name string, d time.Duration) {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (got %s); write 0 or a positive duration", name, d))
		}
	}
	dur("ttl", c.TTL)
	dur("stale", c.Stale)
	dur("stale_if_error", c.StaleIfError)
	dur("max_wait", c.MaxWait)
	dur("hit_for_miss", c.HitForMiss)
	if c.TTL > MaxTTL {
		errs = append(errs, fmt.Errorf("ttl must be at most %s: this is a micro-cache for bursts (got %s); use a real cache for longer lifetimes", MaxTTL, c.TTL))
	}
	if c.Stale > MaxStale {
		errs = append(errs, fmt.Errorf("stale must be at most %s (got %s); write a shorter duration", MaxStale, c.Stale))
	}
	if c.StaleIfError > MaxStaleIfError {
		errs = append(errs, fmt.Errorf("stale_if_error must be at most %s (got %s); write a shorter duration", MaxStaleIfError, c.StaleIfError))
	}
	if c.MaxWait > MaxMaxWait {
		errs = append(errs, fmt.Errorf("max_wait must be at most %s (got %s); write a shorter bound, or 0 for no bound but the client's own", MaxMaxWait, c.MaxWait))
	}
	if c.HitForMiss > MaxHitForMiss {
		errs = append(errs, fmt.Errorf("hit_for_miss must be at most %s (got %s); write a shorter duration (Varnish uses 2m)", MaxHitForMiss, c.HitForMiss))
	}
	if c.MaxBody <= 0 {
		errs = append(errs, fmt.Errorf("max_body must be positive (got %d)", c.MaxBody))
	}
	if c.MaxEntries <= 0 {
		errs = append(errs, fmt.Errorf("max_entries must be positive (got %d)", c.MaxEntries))
	}
	if c.MaxMemory <= 0 {
		errs = append(errs, fmt.Errorf("max_memory must be positive (got %d)", c.MaxMemory))
	}
	if c.MaxFlights <= 0 {
		errs = append(errs, fmt.Errorf("max_flights must be positive (got %d)", c.MaxFlights))
	}
	for _, h := range append(append([]string{}, c.KeyHeaders...), c.IdentityHeaders...) {
		if !validFieldName(h) {
			errs = append(errs, fmt.Errorf("%q is not a valid header field name; write a header name such as X-Api-Key", h))
		}
	}
	if err := c.Breaker.Validate(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func validFieldName(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		ok := c == '!' || c == '#' || c == '$' || c == '%' || c == '&' || c == '\'' || c == '*' ||
			c == '+' || c == '-' || c == '.' || c == '^' || c == '_' || c == '`' || c == '|' || c == '~' ||
			(c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
		if !ok {
			return false
		}
	}
	return true
}
