package coalesce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fanout"
	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
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

// Config configures an Engine. The zero value of every field means its
// documented default, so Config{} is the configuration of a bare
// `coalesce`. Where 0 is the default of a duration and "none" is a setting
// too (TTL, MaxWait, HitForMiss), a negative duration, Off, means none.
type Config struct {
	// TTL is how long a response stays fresh in the micro-cache. 0: 50ms.
	// Off collapses concurrent requests only: nothing is fresh, and a
	// response is kept only for Stale or StaleIfError when they are set.
	// At most MaxTTL.
	TTL time.Duration
	// Stale serves an expired entry for this long after TTL while one
	// background request refreshes it (stale-while-revalidate). 0: never.
	// At most MaxStale.
	Stale time.Duration
	// StaleIfError serves the last good entry for this long after TTL when
	// the upstream fails or its breaker is open. 0: never. At most
	// MaxStaleIfError.
	StaleIfError time.Duration
	// MaxWait is the longest a follower waits for its leader; then it gets
	// 504. 0: 10s. Off: no bound other than the client's own. At most
	// MaxMaxWait.
	MaxWait time.Duration
	// MaxBody is the largest response body, in bytes, buffered for sharing;
	// larger responses stream to the leader and its followers send their
	// own requests. 0: 1 MiB.
	MaxBody int64
	// MaxEntries bounds the micro-cache's entries (and the hit-for-miss
	// marks). 0: 10000.
	MaxEntries int
	// MaxMemory bounds the micro-cache's bytes, bodies and headers. 0: 64 MiB.
	MaxMemory int64
	// MaxFlightMemory bounds the bytes all flights buffer at once, while
	// their leaders' clients read them. Past it, a new leader streams its
	// response to its own client without buffering it, and its followers
	// go upstream on their own (detail "flight-memory"). At least MaxBody.
	// 0: 64 MiB.
	MaxFlightMemory int64
	// KeyHeaders are more request headers whose values make responses
	// differ (added to the key). nil: none.
	KeyHeaders []string
	// IdentityHeaders are more request headers that identify the requester,
	// beside Authorization and Cookie. nil: none.
	IdentityHeaders []string
	// Public leaves the requester's identity (Authorization, Cookie,
	// IdentityHeaders) out of the key: everybody shares. Only for endpoints
	// whose answer does not depend on who asks. false: identity is keyed.
	Public bool
	// HitForMiss is how long a key whose response could not be shared
	// (Set-Cookie, private, Vary: *, a stream) is sent upstream without
	// collapsing, so that the next burst does not queue for nothing.
	// 0: 5s. Off: such keys are never marked. At most MaxHitForMiss.
	HitForMiss time.Duration
	// MaxFlights bounds the keys in flight at once; requests beyond it go
	// upstream on their own. 0: 100000.
	MaxFlights int

	// HotKeys configures the view of the keys asked for most (Engine.Top)
	// and the alert for a key asked for too often. The zero value: a
	// one-minute view, no alert.
	HotKeys HotKeysConfig
	// SSE turns on the fan-out of server-sent event streams (one upstream
	// stream per key, shared by every subscriber); its zero value means
	// the defaults of its fields. nil: event streams pass through.
	SSE *SSEConfig

	// Breaker configures the circuit breaker each upstream gets. The zero
	// value: on, with the defaults of its fields.
	Breaker BreakerConfig
	// Breakers is where the breakers live. A server shares one set between
	// its engines (and across configuration reloads) so that every route to
	// an upstream sees one state; nil gives the engine a set of its own.
	Breakers *Breakers

	// Shared turns on the shared tier of a fleet (see package fleet and
	// shared.go): a local leader asks Redis for the entry, or for the
	// fleet's leadership of the key, before it goes upstream, and breaker
	// trips are shared. Its Zone must be the same on every server for the
	// same handler. nil: every server acts alone.
	Shared *fleet.Options

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
	// HotKey is told when a key's request rate passes
	// HotKeysConfig.AlertRate, once per key per window.
	HotKey func(HotKey)
	// StreamTally is told what happens to fanned-out event streams (events,
	// replays, drops, upstream reconnects), for metrics. nil: nothing.
	StreamTally fanout.Tally
	// UpstreamFailed classifies an error returned by next as an upstream
	// failure (true) rather than something else, e.g. a client cancel
	// (false, not counted). nil: every error except context cancellation
	// is a failure.
	UpstreamFailed func(err error) bool
}

// Off, as TTL, MaxWait or HitForMiss, turns the setting off where 0 would
// mean its default; any negative duration does (as a negative
// flush_interval does in Caddy's reverse_proxy).
const Off time.Duration = -1

// Defaults of the fields whose zero value means a default.
const (
	DefaultTTL             = 50 * time.Millisecond
	DefaultMaxWait         = 10 * time.Second
	DefaultMaxBody         = 1 << 20
	DefaultMaxEntries      = 10_000
	DefaultMaxMemory       = 64 << 20
	DefaultMaxFlightMemory = 64 << 20
	DefaultHitForMiss      = 5 * time.Second
	DefaultMaxFlights      = 100_000
)

// DefaultConfig is the configuration of a bare `coalesce`: Config{} with
// its defaults written out.
func DefaultConfig() Config {
	return Config{}.WithDefaults()
}

// WithDefaults returns c with each zero field set to its default (New does
// this itself). Negative durations (Off) and other values stay as they are,
// so it may be applied any number of times.
func (c Config) WithDefaults() Config {
	zero := func(d *time.Duration, def time.Duration) {
		if *d == 0 {
			*d = def
		}
	}
	zero(&c.TTL, DefaultTTL)
	zero(&c.MaxWait, DefaultMaxWait)
	zero(&c.HitForMiss, DefaultHitForMiss)
	if c.MaxBody == 0 {
		c.MaxBody = DefaultMaxBody
	}
	if c.MaxEntries == 0 {
		c.MaxEntries = DefaultMaxEntries
	}
	if c.MaxMemory == 0 {
		c.MaxMemory = DefaultMaxMemory
	}
	if c.MaxFlightMemory == 0 {
		c.MaxFlightMemory = DefaultMaxFlightMemory
	}
	if c.MaxFlights == 0 {
		c.MaxFlights = DefaultMaxFlights
	}
	c.Breaker = c.Breaker.WithDefaults()
	if c.SSE != nil {
		sse := c.SSE.WithDefaults()
		c.SSE = &sse
	}
	return c
}

// Validate explains what is wrong with c (after WithDefaults), in words
// for an operator.
func (c Config) Validate() error {
	c = c.WithDefaults()
	var errs []error
	// Stale and StaleIfError are off at 0: a negative value means nothing.
	dur := func(name string, d time.Duration) {
		if d < 0 {
			errs = append(errs, fmt.Errorf("%s must not be negative (got %s); write 0 (off) or a positive duration", name, d))
		}
	}
	dur("stale", c.Stale)
	dur("stale_if_error", c.StaleIfError)
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
		errs = append(errs, fmt.Errorf("max_wait must be at most %s (got %s); write a shorter bound, or 0 for no bound but the client's own (-1 in JSON)", MaxMaxWait, c.MaxWait))
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
	if c.MaxFlightMemory <= 0 {
		errs = append(errs, fmt.Errorf("max_flight_memory must be positive (got %d)", c.MaxFlightMemory))
	} else if c.MaxBody > 0 && c.MaxFlightMemory < c.MaxBody {
		errs = append(errs, fmt.Errorf("max_flight_memory (%d bytes) is smaller than max_body (%d bytes): no response of max_body could be shared; write at least max_body, e.g. max_flight_memory 64MiB", c.MaxFlightMemory, c.MaxBody))
	}
	if c.MaxFlights <= 0 {
		errs = append(errs, fmt.Errorf("max_flights must be positive (got %d)", c.MaxFlights))
	}
	for _, h := range append(append([]string{}, c.KeyHeaders...), c.IdentityHeaders...) {
		if !validFieldName(h) {
			errs = append(errs, fmt.Errorf("%q is not a valid header field name; write a header name such as X-Api-Key", h))
		}
	}
	if c.SSE != nil {
		if err := c.SSE.Validate(); err != nil {
			errs = append(errs, err)
		}
	}
	if err := c.Breaker.Validate(); err != nil {
		errs = append(errs, err)
	}
	if c.Shared != nil {
		if err := c.Shared.Validate(); err != nil {
			errs = append(errs, err)
		}
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
