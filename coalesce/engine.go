// Package coalesce collapses concurrent identical GET and HEAD requests into
// one upstream request and keeps the answer for a short TTL. It is plain
// net/http middleware: Engine.Handler wraps an http.Handler, Engine.Serve
// wraps a handler that returns an error (the shape of Caddy's handlers).
package coalesce

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fanout"
	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// Next is the rest of the handler chain. It returns an error instead of
// writing one, as Caddy's handlers do.
type Next func(w http.ResponseWriter, r *http.Request) error

// StatusError is an error answered with an HTTP status.
type StatusError struct {
	Status int
	Err    error
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("%d %s: %v", e.Status, http.StatusText(e.Status), e.Err)
}
func (e *StatusError) Unwrap() error { return e.Err }

// Errors followers receive.
var (
	ErrLeaderFailed = errors.New("coalesce: the request this one was collapsed with failed")
	ErrWaitTimeout  = errors.New("coalesce: timed out waiting for the collapsed request")
	errIncomplete   = errors.New("coalesce: upstream body shorter or longer than its Content-Length")
)

// StatusClientClosed is the status reverse proxies (NGINX, Caddy) log when
// the client went away before the answer.
const StatusClientClosed = 499

// Outcome is what the engine did with a request.
type Outcome string

const (
	OutcomeHit           Outcome = "hit"            // fresh micro-cache entry
	OutcomeStale         Outcome = "stale"          // expired entry while one refresh runs (stale-while-revalidate)
	OutcomeStaleIfError  Outcome = "stale_if_error" // last good copy for a failed upstream or an open breaker
	OutcomeLeader        Outcome = "leader"         // went upstream for itself and its followers
	OutcomeCollapsed     Outcome = "collapsed"      // received the leader's response
	OutcomeUncollapsible Outcome = "uncollapsible"  // could not share; went upstream on its own
	OutcomeBypass        Outcome = "bypass"         // not eligible (method, Range, stream, kill switch, ...)
	OutcomeBreakerOpen   Outcome = "breaker_open"   // answered for an open breaker
	OutcomeTimeout       Outcome = "timeout"        // follower gave up after max_wait
	OutcomeError         Outcome = "error"          // follower released with the leader's error
)

// Event describes the handling of one request, for logs and metrics.
type Event struct {
	Outcome Outcome
	// Key is the request's key (zero for bypassed requests). Only its
	// String form is meant to leave the process.
	Key Key
	// Detail is the reason behind the outcome, e.g. "set-cookie", "range".
	Detail string
	// Waiters: for a leader, the followers that waited for it.
	Waiters int
	// Wait: for a follower, how long it waited.
	Wait time.Duration
	// Upstream: whether this request caused an upstream request.
	Upstream bool
	// Abandoned: for a leader, every client waiting for its flight went
	// away and the upstream request was cancelled.
	Abandoned bool
	// Stored: the response was put in the micro-cache.
	Stored bool
	// Flight: for a leader, how long its flight ran until the upstream
	// answered or failed.
	Flight time.Duration
}

// Engine holds the registry and the micro-cache of one coalescing handler.
// Engines returned by WithHooks share them.
type Engine struct {
	*core
	hooks Hooks
	// seen: the upstreams this engine's requests went to, to guard the next
	// ones (see passage.go); per hooks, like what Hooks.Upstream reports.
	seen *seenUpstreams
	// owner: the event streams this engine started and serves (sse.go).
	owner *fanout.Owner
}

type core struct {
	cfg   Config
	keys  *keyDeriver
	reg   *registry.Registry[*result]
	cache *microCache
	// hitForMiss marks the keys whose responses could not be shared.
	hitForMiss *marks
	// variants remembers the fields keys' responses vary on (variants.go).
	variants *variants
	// flightMemory is what all flights may buffer at once.
	flightMemory flightMemory
	guard        *guard // nil when breakers are off
	hotKeys      *HotKeys
	hub          *fanout.Hub // nil when sse is off
	tier         *fleet.Tier // nil without a shared tier

	// stop ends when the engine is closed: it cancels running refreshes.
	// closeMu orders a refresh's start (refreshes.Add) before Close's Wait.
	refreshes sync.WaitGroup
	closeOnce sync.Once
	closeMu   sync.Mutex
	stop      context.Context
	stopAll   context.CancelFunc
}

// New builds an engine; cfg must pass Validate. Its zero fields take
// their defaults.
func New(cfg Config) (*Engine, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	stop, stopAll := context.WithCancel(context.Background())
	c := &core{
		cfg:          cfg,
		keys:         newKeyDeriver(cfg.IdentityHeaders, cfg.Public, cfg.KeyHeaders),
		reg:          registry.New[*result](registry.Options{MaxFlights: cfg.MaxFlights}),
		cache:        newMicroCache(cfg.MaxEntries, cfg.MaxMemory),
		hitForMiss:   newMarks(cfg.MaxEntries),
		variants:     newVariants(cfg.MaxEntries),
		flightMemory: flightMemory{max: cfg.MaxFlightMemory},
		guard:        newGuard(cfg),
		hotKeys:      NewHotKeys(cfg.HotKeys, cfg.IdentityHeaders),
		hub:          newHub(cfg),
		stop:         stop,
		stopAll:      stopAll,
	}
	if cfg.Shared != nil {
		t, err := c.openTier(*cfg.Shared)
		if err != nil {
			stopAll()
			return nil, err
		}
		c.tier = t
	}
	return c.engine(cfg.Hooks), nil
}

func (c *core) engine(h Hooks) *Engine {
	e := &Engine{core: c, hooks: h, seen: new(seenUpstreams)}
	if c.hub != nil {
		e.owner = c.hub.NewOwner(h.StreamTally)
	}
	return e
}

// WithHooks returns an engine that shares e's registry, cache, breakers and
// configuration but reports to other hooks and learns its upstreams anew. A
// server that keeps engines across configuration reloads gives each
// configuration's handler its own.
func (e *Engine) WithHooks(h Hooks) *Engine {
	return e.core.engine(h)
}

// Close stops new background refreshes, cancels the running ones and waits
// for them to end. (A server closes an engine while it reloads its
// configuration: it must not wait for a refresh on a hung upstream.)
func (e *Engine) Close() {
	e.closeOnce.Do(func() {
		e.closeMu.Lock()
		e.stopAll()
		e.closeMu.Unlock()
	})
	e.refreshes.Wait()
	if e.hub != nil {
		e.hub.Close() // every event stream, with its subscribers
	}
	if e.tier != nil {
		_ = e.tier.Close()
	}
}

// Handler wraps a plain http.Handler.
func (e *Engine) Handler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		err := e.Serve(w, r, func(w http.ResponseWriter, r *http.Request) error {
			next.ServeHTTP(w, r)
			return nil
		})
		var se *StatusError
		switch {
		case err == nil:
		case errors.As(err, &se):
			http.Error(w, http.StatusText(se.Status), se.Status)
		case errors.Is(err, context.Canceled):
		default:
			http.Error(w, http.StatusText(http.StatusBadGateway), http.StatusBadGateway)
		}
	})
}

// Stats summarise the engine's registry and cache.
type Stats struct {
	Registry      registry.Stats `json:"registry"`
	Cache         CacheStats     `json:"cache"`
	Uncollapsible int            `json:"uncollapsible_keys"`
	// HotKeysBytes is the memory the hot-key view holds (see Top).
	HotKeysBytes int64 `json:"hot_keys_bytes"`
	// Streams are the event streams fanned out now and their subscribers.
	Streams fanout.Stats `json:"streams"`
	// FlightBytes is what flights buffer now, against MaxFlightMemory.
	FlightBytes int64 `json:"flight_bytes"`
	// Shared is the shared tier's state and counts; nil without one.
	Shared *SharedStats `json:"shared,omitempty"`
}

// Stats returns a snapshot.
func (e *Engine) Stats() Stats {
	e.hitForMiss.mu.RLock()
	n := e.hitForMiss.lru.Len()
	e.hitForMiss.mu.RUnlock()
	st := Stats{Registry: e.reg.Stats(), Cache: e.cache.stats(), Uncollapsible: n, HotKeysBytes: e.hotKeys.MemoryBytes(),
		FlightBytes: e.flightMemory.used.Load()}
	if e.hub != nil {
		st.Streams = e.hub.Stats()
	}
	if e.tier != nil {
		s := e.tier.Stats()
		st.Shared = &s
	}
	return st
}

// Top lists up to limit (method, host, path) keys with the highest request
// rate now, highest first (see HotKeys).
func (e *Engine) Top(limit int) []HotKey { return e.hotKeys.Top(limit, time.Now()) }

// FlightInfo describes a flight in progress.
type FlightInfo struct {
	Key    string `json:"key"` // short hash
	Method string `json:"method"`
	Path   string `json:"path"`
	// Refresh: a background refresh of a stale copy, on nobody's behalf.
	Refresh bool `json:"refresh"`
	// Variant: the flight of the requests that differ from another flight
	// of the key in a field its responses vary on (Vary).
	Variant bool          `json:"variant,omitempty"`
	Age     time.Duration `json:"age_ns"`
	Waiters int           `json:"waiters"`
	// Clients is whom the flight still answers: the waiting followers, and
	// its leader (a client's request, until that client goes away, or a
	// refresh, until its timeout).
	Clients int `json:"clients"`
}

// flightNote is what a flight is noted with in the registry, for Inflight.
type flightNote struct {
	method, path string
	refresh      bool
	// base is the key of a variant's flight (variants.go), which the
	// registry holds under the variant's key.
	base *Key
}

// Inflight lists up to limit flights in progress.
func (e *Engine) Inflight(limit int) []FlightInfo {
	var out []FlightInfo
	now := time.Now()
	e.reg.Inflight(limit, func(f registry.FlightInfo) {
		var k Key
		copy(k[:], f.Key)
		note, _ := f.Note.(flightNote)
		if note.base != nil {
			k = *note.base
		}
		out = append(out, FlightInfo{Key: k.String(), Method: note.method, Path: note.path, Refresh: note.refresh, Variant: note.base != nil,
			Age: now.Sub(f.Started), Waiters: f.Waiters, Clients: f.Clients})
	})
	return out
}

func (e *Engine) observe(r *http.Request, ev Event) {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		if row, alert := e.hotKeys.Record(r, ev, time.Now()); alert && e.hooks.HotKey != nil {
			e.hooks.HotKey(row)
		}
	}
	if e.hooks.Observe != nil {
		e.hooks.Observe(r, ev)
	}
}
