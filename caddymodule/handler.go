// Package caddymodule is the Caddy glue of caddy-coalesce: the
// http.handlers.coalesce module, its Caddyfile directive, state that
// survives config reloads, placeholders, metrics and the admin API.
package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// Handler collapses concurrent identical GET and HEAD requests into one
// upstream request, keeps the answer for a short TTL, and shares it with
// every client that may receive it. Place it before `reverse_proxy`.
//
// Requests are keyed by method, scheme, host, path, query, the requester's
// identity (Authorization and Cookie, hashed), the Accept-Encoding class and
// `key_headers`. A response is shared only when it has no Set-Cookie, no
// `Cache-Control: private` and no `Vary: *`, and only with requests that
// match its Vary. Every response that passes through gets a `Cache-Status`
// header (RFC 9211).
type Handler struct {
	// How long a response stays fresh in the micro-cache. Default (0 or
	// absent): 50ms. A negative duration (-1, the Caddyfile's `ttl 0`)
	// collapses concurrent requests but nothing is ever fresh: a response
	// is kept only for `stale` or `stale_if_error` when they are set. At
	// most 1s. An origin's smaller max-age / s-maxage wins.
	TTL caddy.Duration `json:"ttl,omitempty"`

	// Serve an expired entry for this long after `ttl` while exactly one
	// background request refreshes it (stale-while-revalidate). Default
	// (0 or absent): never. At most 1h.
	Stale caddy.Duration `json:"stale,omitempty"`

	// Serve the last good entry for this long after `ttl` when the upstream
	// fails (transport error or a 5xx) or its breaker is open. Default
	// (0 or absent): never. At most 24h.
	StaleIfError caddy.Duration `json:"stale_if_error,omitempty"`

	// The longest a follower waits for its leader's response before it is
	// answered 504 Gateway Timeout. Default (0 or absent): 10s. A negative
	// duration (-1, the Caddyfile's `max_wait 0`): no bound other than the
	// client's own. At most 1h.
	MaxWait caddy.Duration `json:"max_wait,omitempty"`

	// The largest response body, in bytes, buffered for sharing. Larger
	// responses stream to the leader while its followers send their own
	// requests. Default: 1 MiB.
	MaxBody int64 `json:"max_body,omitempty"`

	// The most entries the micro-cache holds. Default: 10000.
	MaxEntries int `json:"max_entries,omitempty"`

	// The most bytes (bodies and headers) the micro-cache holds.
	// Default: 64 MiB.
	MaxMemory int64 `json:"max_memory,omitempty"`

	// The most bytes all flights of this handler buffer at once while
	// their leaders' clients read them (responses up to max_body each).
	// Past it, a new leader streams its response to its own client without
	// buffering it, and its followers send their own requests
	// (Cache-Status detail "flight-memory"); nothing is stored from such a
	// flight. At least max_body. Default: 64 MiB.
	MaxFlightMemory int64 `json:"max_flight_memory,omitempty"`

	// More request header fields whose values make responses differ; they
	// become part of the key.
	KeyHeaders []string `json:"key_headers,omitempty"`

	// More request header fields that identify the requester, beside
	// Authorization and Cookie (e.g. X-Api-Key). Hashed into the key.
	IdentityHeaders []string `json:"identity_headers,omitempty"`

	// Leave the requester's identity out of the key, so that everybody
	// shares one response. Only for endpoints whose answer does not depend
	// on who asks. Default: false.
	Public bool `json:"public,omitempty"`

	// How long a key whose response could not be shared (Set-Cookie,
	// private, Vary: *, a stream, a too large body) goes upstream without
	// collapsing, so that the next burst does not queue for nothing
	// (Varnish's hit-for-miss). Default (0 or absent): 5s. A negative
	// duration (-1, the Caddyfile's `hit_for_miss 0`): such keys are never
	// marked, and the next burst queues behind its leader again. At most 1h.
	HitForMiss caddy.Duration `json:"hit_for_miss,omitempty"`

	// The most keys in flight at once; requests for further keys go
	// upstream without collapsing. Default: 100000.
	MaxFlights int `json:"max_flights,omitempty"`

	// The circuit breaker each upstream gets: after `failures` consecutive
	// failures (transport errors, 502, 503, 504, a GET without response
	// headers within `timeout`) the handler answers for
	// the upstream for `open` (a stale copy within `stale_if_error`, else
	// 503 with Retry-After) instead of calling it. Default: on, with the
	// defaults of its fields; `{"off": true}` turns it off.
	Breaker *BreakerOptions `json:"breaker,omitempty"`

	// Fan out server-sent event streams: one upstream stream per key,
	// shared by every subscriber, with replay for Last-Event-ID. Default:
	// off (event streams pass straight through); `{}` turns it on with the
	// defaults of its fields.
	SSE *SSEOptions `json:"sse,omitempty"`

	// The shared tier of a fleet of instances on Redis (see SharedOptions):
	// one upstream request per key for the whole fleet, and breakers that
	// trip on every instance at once. Default: off (each instance acts
	// alone). Name a `zone` for it.
	Shared *SharedOptions `json:"shared,omitempty"`

	// Names the state (registry of flights, micro-cache, hit-for-miss marks)
	// this handler uses, and labels its metrics and admin API entries.
	// Handlers with the same zone and the same settings share one state,
	// also across routes: give the same zone only to handlers in front of
	// the same API. A reload keeps a zone's state while the new config has
	// a handler with that zone and those settings.
	//
	// Default: none. A handler without a zone never shares state with
	// another handler. A reload keeps its state only while its top-level
	// route (the server's route that holds it, with every matcher, handler
	// and upstream nested in it: in the Caddyfile, its site block) and the
	// server's listen addresses are unchanged; any change there starts it
	// afresh, so that no reload hands one route's entries to another.
	// Handlers without a zone report together under the label "default".
	Zone string `json:"zone,omitempty"`

	// Log a warning (and count it in caddy_coalesce_hot_key_alerts_total)
	// when requests for one key (method, host and path) pass this rate, as
	// "<n>/<duration>", e.g. "20/1m": once per key per duration. The
	// duration (1s to 1h) is also the window of GET /coalesce/top's rates.
	// Default: off, and /coalesce/top measures over one minute.
	HotKeyRate string `json:"hot_key_rate,omitempty"`

	engine  *coalesce.Engine
	poolKey string
	rank    *routeRank
	logger  *zap.Logger
	metrics *zoneMetrics
	listed  bool // in zones, for the metrics collector and the admin API
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.coalesce",
		New: func() caddy.Module { return new(Handler) },
	}
}

// config turns the JSON fields into the engine's configuration: both
// mean the defaults by their zero values and "off" by a negative duration.
func (h *Handler) config() coalesce.Config {
	return coalesce.Config{
		TTL:             time.Duration(h.TTL),
		Stale:           time.Duration(h.Stale),
		StaleIfError:    time.Duration(h.StaleIfError),
		MaxWait:         time.Duration(h.MaxWait),
		MaxBody:         h.MaxBody,
		MaxEntries:      h.MaxEntries,
		MaxMemory:       h.MaxMemory,
		MaxFlightMemory: h.MaxFlightMemory,
		KeyHeaders:      h.KeyHeaders,
		IdentityHeaders: h.IdentityHeaders,
		Public:          h.Public,
		HitForMiss:      time.Duration(h.HitForMiss),
		MaxFlights:      h.MaxFlights,
		HotKeys:         h.hotKeysConfig(),
		SSE:             h.SSE.config(),
		Breaker:         h.Breaker.config(),
		Breakers:        breakers,
		Shared:          h.Shared.options(""),
	}
}

// Validate reports settings that cannot work.
func (h *Handler) Validate() error {
	if h.HotKeyRate != "" {
		if _, _, err := parseHotKeyRate(h.HotKeyRate); err != nil {
			return fmt.Errorf("coalesce: %w", err)
		}
	}
	if err := h.config().Validate(); err != nil {
		return fmt.Errorf("coalesce: %w", err)
	}
	return nil
}

// Provision loads (or creates) the shared state of this handler.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	if err := registerMetrics(ctx); err != nil {
		return fmt.Errorf("coalesce: registering metrics: %w", err)
	}
	if err := h.Validate(); err != nil {
		return err
	}
	cfg := h.config().WithDefaults()
	settings, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if h.Shared != nil {
		zone, err := fleetZone(ctx, h)
		if err != nil {
			return err
		}
		cfg.Shared = h.Shared.options(zone)
		cfg.Shared.OnState = tierStateLogger(h.logger, zoneName(h.Zone))
		fleet.SetClientLogger(redisClientLog)
	}
	key, rank := poolKey(ctx, h.Zone, settings)
	h.rank = rank
	val, _, err := engines.LoadOrNew(key, func() (caddy.Destructor, error) {
		e, err := coalesce.New(cfg)
		if err != nil {
			return nil, err
		}
		return pooledEngine{e}, nil
	})
	if err != nil {
		return fmt.Errorf("coalesce: %w", err)
	}
	// Only a held key is set: Caddy cleans up after a failed Provision too.
	h.poolKey = key
	listEngine(h.poolKey, zoneName(h.Zone), val.(pooledEngine).Engine, cfg)
	h.listed = true
	h.metrics = metricsFor(zoneName(h.Zone))
	h.engine = val.(pooledEngine).WithHooks(coalesce.Hooks{
		Disabled: bypassAll.Load,
		Observe:  h.observe,
		Upstream: upstreamOf,
		Detach:   detach,

		UpstreamFailed: upstreamFailed,
		HotKey:         h.hotKeyAlert,
		StreamTally:    newStreamTally(zoneName(h.Zone)),
	})
	if srv, ok := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server); ok && h.SSE != nil {
		// On a reload, Cleanup closes the old config's streams. When the
		// process exits, Caddy waits for the servers' requests before any
		// Cleanup, without a bound by default (grace_period): event streams
		// would keep it from exiting. They close when the server begins to
		// shut down.
		srv.RegisterOnShutdown(h.engine.CloseStreams)
	}
	breakerLogger.Store(h.logger)
	return nil
}

// Cleanup releases this handler's hold on the shared state. Requests of this
// config still running keep working: the state lives until the last holder
// lets go, and a reload of the same config holds it already.
func (h *Handler) Cleanup() error {
	h.rank.release()
	h.rank = nil
	if h.poolKey == "" {
		return nil
	}
	if h.engine != nil {
		h.engine.CloseStreams()
	}
	if h.listed {
		unlistEngine(h.poolKey)
	}
	_, err := engines.Delete(h.poolKey)
	return err
}

// ServeHTTP implements caddyhttp.MiddlewareHandler.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	err := h.engine.Serve(w, r, func(w http.ResponseWriter, r *http.Request) error {
		h.metrics.upstream.Inc()
		return next.ServeHTTP(w, r)
	})
	if err == nil {
		return nil
	}
	var se *coalesce.StatusError // declared past the nil check: it escapes
	if errors.As(err, &se) {
		return caddyhttp.Error(se.Status, se)
	}
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		// The client went away while it waited, as reverse_proxy reports it.
		return caddyhttp.Error(coalesce.StatusClientClosed, err)
	}
	return err
}

// observe sets the placeholders and logs the decision.
func (h *Handler) observe(r *http.Request, ev coalesce.Event) {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		setPlaceholders(repl, ev)
	}
	h.metrics.observe(ev)
	if ce := h.logger.Check(zapcore.DebugLevel, "coalesce decision"); ce != nil {
		ce.Write(
			zap.String("outcome", string(ev.Outcome)),
			zap.String("detail", ev.Detail),
			zap.String("key_hash", ev.Key.String()),
			zap.Int("waiters", ev.Waiters),
			zap.Duration("wait", ev.Wait),
			zap.Bool("stored", ev.Stored),
		)
	}
	if ev.Outcome == coalesce.OutcomeTimeout {
		h.logger.Warn("follower gave up waiting for its leader",
			zap.String("key_hash", ev.Key.String()), zap.Duration("wait", ev.Wait))
	}
	if ev.Abandoned {
		h.logger.Warn("flight abandoned: every client waiting for it went away, upstream request cancelled",
			zap.String("zone", zoneName(h.Zone)), zap.String("key_hash", ev.Key.String()), zap.Duration("flight", ev.Flight))
	}
}

// setPlaceholders makes {http.coalesce.*} report ev. They are worked out
// only when asked for (an access log's log_append):
// most requests are logged without them, and setting four static values
// on every request costs more than the one provider. A request observed
// twice gets the later event as static values, which come first.
func setPlaceholders(repl *caddy.Replacer, ev coalesce.Event) {
	if _, observed := repl.Get("http.coalesce.status"); !observed {
		d := decision(ev)
		repl.Map(d.placeholder)
		return
	}
	for _, name := range placeholderNames {
		v, _ := decision(ev).placeholder(name)
		repl.Set(name, v)
	}
}

var placeholderNames = [...]string{"http.coalesce.status", "http.coalesce.key_hash", "http.coalesce.waiters", "http.coalesce.detail"}

// decision is the event the {http.coalesce.*} placeholders of a request
// report.
type decision coalesce.Event

func (d decision) placeholder(name string) (any, bool) {
	switch name {
	case "http.coalesce.status":
		return string(d.Outcome), true
	case "http.coalesce.key_hash":
		if d.Key == (coalesce.Key{}) {
			return "", true // a bypassed request has no key: empty, not unset (null in JSON logs)
		}
		return d.Key.String(), true
	case "http.coalesce.waiters":
		return strconv.Itoa(d.Waiters), true
	case "http.coalesce.detail":
		return d.Detail, true
	}
	return nil, false
}

// upstreamOf is the upstream reverse_proxy reported for r, as host:port.
func upstreamOf(r *http.Request) string {
	repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if !ok {
		return ""
	}
	v, _ := repl.GetString("http.reverse_proxy.upstream.hostport")
	return v
}

// detach copies r for a background refresh with a replacer of its own, so
// that what the refresh's reverse_proxy sets does not land in the access log
// line of the client that triggered it. The request's vars are copied.
func detach(r *http.Request, ctx context.Context) *http.Request {
	br := r.Clone(ctx)
	srv, _ := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	br = caddyhttp.PrepareRequest(br, caddy.NewReplacer(), nil, srv)
	if old, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		if vars, ok := br.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
			for k, v := range old {
				vars[k] = v
			}
		}
	}
	return br
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
