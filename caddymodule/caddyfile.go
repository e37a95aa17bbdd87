package caddymodule

import (
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("coalesce", parseCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("coalesce", httpcaddyfile.Before, "reverse_proxy")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	handler := new(Handler)
	if err := handler.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return handler, nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	coalesce [<matcher>] {
//		ttl             <duration>   # default 50ms; 0 = collapse only (plus stale copies if set); max 1s
//		stale           <duration>   # serve expired entries this long while one refresh runs
//		stale_if_error  <duration>   # serve the last good entry this long when the upstream fails
//		max_wait        <duration>   # longest a follower waits; default 10s
//		max_body        <size>       # largest response buffered for sharing; default 1MiB
//		max_entries     <n>          # micro-cache entries; default 10000
//		max_memory      <size>       # micro-cache bytes; default 64MiB
//		max_flight_memory <size>     # bytes all flights buffer at once; past it leaders stream; default 64MiB
//		key_headers     <field...>   # more request headers that make responses differ
//		identity_headers <field...>  # more headers that identify the requester
//		public                       # leave identity out of the key (public endpoints only)
//		hit_for_miss    <duration>   # how long an unshareable key skips collapsing; default 5s
//		max_flights     <n>          # keys in flight at once; default 100000
//		zone            <name>       # share state with the handlers of this zone; default: its own
//		hot_key_rate    <n>/<duration> # warn when one key is asked for more often; default off
//		breaker {                    # per-upstream circuit breaker; `breaker off` turns it off
//			failures <n>             # consecutive failures that trip it; default 5
//			ratio    <0..1> [min <n>] [window <duration>]  # or a failure ratio; default min 20, window 30s
//			open     <duration>      # time open before half-open probes; default 10s
//			probes   <n>             # requests that test a half-open upstream; default 1
//			status   <code...>       # statuses that count as failures; default 502 503 504
//			timeout  <duration>      # GET/HEAD without response headers this long: cut, 504, a failure; default 30s; 0 = off
//		}
//		sse {                        # fan out event streams: one upstream stream per key
//			replay          <n>          # events kept for Last-Event-ID; default 256
//			buffer          <n>          # events queued per subscriber before it is dropped; default 64
//			linger          <duration>   # upstream kept this long after the last subscriber; default 2s
//			heartbeat       <duration>   # ":" comment after this much silence; default 15s; 0 = off
//			max_subscribers <n>          # per stream; more go upstream on their own; default 10000
//		}
//		shared redis://[user:password@]host:port[/db] {  # a fleet's shared tier (rediss:// for TLS)
//			prefix  <string>         # starts every Redis key; default coalesce:
//			timeout <duration>       # longest one Redis operation; then act alone; default 50ms
//		}
//	}
//
// A bare `coalesce` uses the defaults.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.Errf("coalesce takes no arguments besides a matcher (got %q); put options in a block: coalesce { ttl 50ms }", d.Val())
	}
	seen := map[string]string{} // option -> file:line it was first given at
	for d.NextBlock(0) {
		opt := d.Val()
		if err := once(d, seen); err != nil {
			return err
		}
		var err error
		switch opt {
		case "ttl":
			h.TTL, err = parseDurationOrOff(d)
		case "stale":
			h.Stale, err = parseDuration(d)
		case "stale_if_error":
			h.StaleIfError, err = parseDuration(d)
		case "max_wait":
			h.MaxWait, err = parseDurationOrOff(d)
		case "hit_for_miss":
			h.HitForMiss, err = parseDurationOrOff(d)
		case "max_body":
			h.MaxBody, err = parseSize(d)
		case "max_memory":
			h.MaxMemory, err = parseSize(d)
		case "max_flight_memory":
			h.MaxFlightMemory, err = parseSize(d)
		case "max_entries":
			h.MaxEntries, err = parseCount(d)
		case "max_flights":
			h.MaxFlights, err = parseCount(d)
		case "key_headers":
			fields := d.RemainingArgs()
			if len(fields) == 0 {
				return d.Errf("key_headers needs at least one header field name, e.g. key_headers X-Tenant")
			}
			h.KeyHeaders = append(h.KeyHeaders, fields...)
		case "identity_headers":
			fields := d.RemainingArgs()
			if len(fields) == 0 {
				return d.Errf("identity_headers needs at least one header field name, e.g. identity_headers X-Api-Key")
			}
			h.IdentityHeaders = append(h.IdentityHeaders, fields...)
		case "public":
			if d.NextArg() {
				return d.Errf("public takes no value (got %q); write just `public`", d.Val())
			}
			h.Public = true
		case "hot_key_rate":
			h.HotKeyRate, err = unmarshalHotKeyRate(d)
		case "zone":
			if !d.NextArg() {
				return d.Err("zone needs a name, e.g. zone api")
			}
			h.Zone = d.Val()
			if d.NextArg() {
				return d.Errf("zone takes one name, got another argument %q; remove it", d.Val())
			}
		default:
			err = h.unmarshalExtra(d, opt)
		}
		if err != nil {
			return err
		}
		// Check the settings so far, so that a value that parses but
		// cannot work (ttl 2s) is reported at its own line.
		if err := h.config().Validate(); err != nil {
			return d.Errf("%v", err)
		}
	}
	return nil
}

// unmarshalExtra parses the options that are not about collapsing itself.
func (h *Handler) unmarshalExtra(d *caddyfile.Dispenser, opt string) error {
	switch opt {
	case "breaker":
		return h.unmarshalBreaker(d)
	case "sse":
		return h.unmarshalSSE(d)
	case "shared":
		return h.unmarshalShared(d)
	}
	return d.Errf("unrecognized coalesce option %q; the options are ttl, stale, stale_if_error, max_wait, max_body, max_entries, max_memory, max_flight_memory, key_headers, identity_headers, public, hit_for_miss, max_flights, zone, breaker, sse and shared (see the README)", opt)
}

// once fails when the option d is at was already given in this block (at
// the file:line seen holds): a second value would silently replace the first.
// Options that take a list of fields may be repeated; their lists add up.
func once(d *caddyfile.Dispenser, seen map[string]string) error {
	opt := d.Val()
	switch opt {
	case "key_headers", "identity_headers":
		return nil
	}
	if first, ok := seen[opt]; ok {
		return d.Errf("%s is given twice (first at %s); keep one of them", opt, first)
	}
	seen[opt] = d.File() + ":" + strconv.Itoa(d.Line())
	return nil
}

// durationExamples are sensible values of each duration option, for errors.
var durationExamples = map[string]string{
	"ttl": "50ms", "stale": "5s", "stale_if_error": "1m", "max_wait": "10s",
	"hit_for_miss": "5s", "open": "10s", "timeout": "30s", "linger": "2s", "heartbeat": "15s",
}

// parseDuration reads exactly one duration argument, never negative.
func parseDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	return parseDurationFrom(d, 0)
}

// parsePositiveDuration is parseDuration for options that 0 cannot be.
func parsePositiveDuration(d *caddyfile.Dispenser) (caddy.Duration, error) {
	return parseDurationFrom(d, 1)
}

// parseDurationFrom reads exactly one duration argument of at least least.
func parseDurationFrom(d *caddyfile.Dispenser, least time.Duration) (caddy.Duration, error) {
	v, ok := durationExamples[d.Val()]
	if !ok {
		v = "50ms"
	}
	return parseDurationLike(d, least, v)
}

// parseDurationLike is parseDurationFrom with the example value its errors
// give, for an option whose name means another duration elsewhere (the
// shared tier's timeout is not the breaker's).
func parseDurationLike(d *caddyfile.Dispenser, least time.Duration, exampleValue string) (caddy.Duration, error) {
	opt := d.Val()
	example := opt + " " + exampleValue
	if !d.NextArg() {
		return 0, d.Errf("%s needs a duration, e.g. %s", opt, example)
	}
	dur, err := caddy.ParseDuration(d.Val())
	if err != nil {
		return 0, d.Errf("%s: %q is not a duration (write e.g. 50ms, 2s): %v", opt, d.Val(), err)
	}
	if dur < least {
		if least > 0 {
			return 0, d.Errf("%s must be a positive duration (got %s), e.g. %s", opt, d.Val(), example)
		}
		return 0, d.Errf("%s must not be negative (got %s); write 0 or a positive duration, e.g. %s", opt, d.Val(), example)
	}
	if d.NextArg() {
		return 0, d.Errf("%s takes one duration, got another argument %q; remove it", opt, d.Val())
	}
	return caddy.Duration(dur), nil
}

// parseDurationOrOff is parseDuration for the options whose 0 means "none"
// in the Caddyfile (ttl 0: collapse only) but "the default" in JSON: 0 is
// written as coalesce.Off, a negative duration.
func parseDurationOrOff(d *caddyfile.Dispenser) (caddy.Duration, error) {
	dur, err := parseDuration(d)
	if err == nil && dur == 0 {
		dur = caddy.Duration(coalesce.Off)
	}
	return dur, err
}

// parseSize reads one size such as 1MiB or 512KB.
func parseSize(d *caddyfile.Dispenser) (int64, error) {
	opt := d.Val()
	if !d.NextArg() {
		return 0, d.Errf("%s needs a size, e.g. %s 1MiB", opt, opt)
	}
	n, err := humanize.ParseBytes(d.Val())
	if err != nil || n == 0 || n > 1<<40 {
		return 0, d.Errf("%s: %q is not a size from 1B to 1TiB (write e.g. 512KiB, 1MiB, 64MB)", opt, d.Val())
	}
	if d.NextArg() {
		return 0, d.Errf("%s takes one size, got another argument %q; remove it", opt, d.Val())
	}
	return int64(n), nil
}

// parseCount reads one positive integer.
func parseCount(d *caddyfile.Dispenser) (int, error) {
	opt := d.Val()
	if !d.NextArg() {
		return 0, d.Errf("%s needs a number, e.g. %s 100", opt, opt)
	}
	n, err := strconv.Atoi(d.Val())
	if err != nil || n <= 0 {
		return 0, d.Errf("%s must be a positive whole number (got %q)", opt, d.Val())
	}
	if d.NextArg() {
		return 0, d.Errf("%s takes one number, got another argument %q; remove it", opt, d.Val())
	}
	return n, nil
}

// Interface guards
var _ caddyfile.Unmarshaler = (*Handler)(nil)
