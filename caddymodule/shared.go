package caddymodule

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
)

// SharedOptions configure the shared tier of a fleet: several Caddy
// instances behind a load balancer share one Redis (or Valkey), so that one
// instance's request goes upstream for a key on behalf of all of them, and
// an upstream's breaker trips on all of them at once.
//
// Local first: an instance's micro-cache and its own collapsing come before
// Redis (a local hit never touches it), and only the one local request that
// would go upstream asks Redis. When Redis is slow (past `timeout`) or
// down, each instance acts alone, without a client error; the tier checks
// Redis again once a second and comes back by itself.
//
// Redis keys are `<prefix><zone>:...`: give the handler a `zone` so that
// every instance names it the same; without one, the zone is derived from
// the handler's site block (its route, matchers, handlers and upstreams,
// not its listen address), which is the same only while every instance
// runs the same Caddyfile.
type SharedOptions struct {
	// The Redis server: redis://[user:password@]host:port[/db], or
	// rediss:// for TLS. Required.
	URL string `json:"url,omitempty"`

	// Starts every Redis key and channel the tier uses. Default:
	// "coalesce:".
	Prefix string `json:"prefix,omitempty"`

	// The longest one Redis operation may take before the instance acts
	// alone for that request. Default: 50ms. At most 10s.
	Timeout caddy.Duration `json:"timeout,omitempty"`
}

// options turns the JSON into the tier's options for the handler's zone.
func (o *SharedOptions) options(zone string) *fleet.Options {
	if o == nil {
		return nil
	}
	return &fleet.Options{URL: o.URL, Prefix: o.Prefix, Timeout: time.Duration(o.Timeout), Zone: zone}
}

// unmarshalShared parses
//
//	shared redis://[user:password@]host:port[/db] {
//		prefix  <string>
//		timeout <duration>
//	}
func (h *Handler) unmarshalShared(d *caddyfile.Dispenser) error {
	o := &SharedOptions{}
	h.Shared = o
	if !d.NextArg() {
		return d.Errf("shared needs the Redis URL, e.g. shared redis://127.0.0.1:6379")
	}
	o.URL = d.Val()
	if _, err := fleet.ParseURL(o.URL); err != nil {
		return d.Errf("%v", err)
	}
	if d.NextArg() {
		return d.Errf("shared takes one Redis URL, got another argument %q; put options in its block", d.Val())
	}
	seen := map[string]string{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if err := once(d, seen); err != nil {
			return err
		}
		switch opt {
		case "prefix":
			if !d.NextArg() {
				return d.Errf("prefix needs a string, e.g. prefix coalesce:")
			}
			o.Prefix = d.Val()
			if d.NextArg() {
				return d.Errf("prefix takes one string, got another argument %q; remove it", d.Val())
			}
		case "timeout":
			dur, err := parseDurationLike(d, 1, "50ms")
			if err != nil {
				return err
			}
			o.Timeout = dur
		default:
			return d.Errf("unrecognized shared option %q; the options are prefix and timeout", opt)
		}
		if err := o.options("").Validate(); err != nil {
			return d.Errf("%v", err)
		}
	}
	return nil
}

// fleetZone names the handler's keys in Redis: the same on every instance
// that runs the same Caddyfile, whatever its ports. The zone when there is
// one, else the handler's route without the server's listen addresses, with
// the handler's settings either way (the Redis URL left out), so that
// handlers whose keys mean different things never share entries.
func fleetZone(ctx caddy.Context, h *Handler) (string, error) {
	c := *h
	c.Shared = nil
	settings, err := json.Marshal(&c)
	if err != nil {
		return "", err
	}
	sum := sha256.Sum256(settings)
	name := h.Zone
	if name == "" {
		route, ok := routeOfHandler(ctx)
		if !ok {
			return "", fmt.Errorf("shared: this handler has no zone and is not in a site block's route; give it a zone, e.g. zone api")
		}
		name = "route-" + route
	}
	return name + "/" + hex.EncodeToString(sum[:6]), nil
}

// routeOfHandler fingerprints the top-level route being provisioned (see
// provisioningRoute) without the server's listen addresses.
func routeOfHandler(ctx caddy.Context) (string, bool) {
	srv, _ := ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if srv == nil {
		return "", false
	}
	for i := range srv.Routes {
		r := &srv.Routes[i]
		if len(r.HandlersRaw) == 0 {
			continue
		}
		hash := sha256.New()
		fmt.Fprintf(hash, "group %q terminal %t\n", r.Group, r.Terminal)
		for _, set := range r.MatcherSets {
			fmt.Fprintln(hash, "match")
			for _, m := range set {
				b, err := json.Marshal(m)
				if err != nil {
					return "", false
				}
				fmt.Fprintf(hash, "%T %s\n", m, b)
			}
		}
		holds := false
		for _, raw := range r.HandlersRaw {
			fmt.Fprintf(hash, "handle %s\n", raw)
			holds = holds || strings.Contains(string(raw), `"coalesce"`)
		}
		if !holds {
			return "", false
		}
		return hex.EncodeToString(hash.Sum(nil)[:8]), true
	}
	return "", false
}

// redisClientLog is where the Redis client's own messages go: Caddy's
// logger at debug level. The tier's state changes (logged once each, at
// warn and info) already say when Redis is unreachable; the client would
// repeat it on every dial.
func redisClientLog(msg string) {
	caddy.Log().Named("http.handlers.coalesce.shared").Debug("redis client", zap.String("message", msg))
}

// tierStateLogger logs each change of the shared tier's state once.
func tierStateLogger(logger *zap.Logger, zone string) func(fleet.State, error) {
	return func(s fleet.State, _ error) {
		switch s {
		case fleet.StateDown:
			logger.Warn("shared tier down: Redis failed or was too slow; acting alone until it answers again",
				zap.String("zone", zone), zap.Duration("retry_in", time.Second))
		case fleet.StateProbing:
			logger.Info("shared tier probing Redis", zap.String("zone", zone))
		case fleet.StateUp:
			logger.Info("shared tier up: Redis answers again", zap.String("zone", zone))
		}
	}
}

// tierStateValue is the shared_state metric's value of a state.
func tierStateValue(s fleet.State) float64 {
	switch s {
	case fleet.StateProbing:
		return 1
	case fleet.StateDown:
		return 2
	default:
		return 0
	}
}
