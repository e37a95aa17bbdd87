package caddymodule

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

func init() {
	caddy.RegisterModule(BreakerSelection{})
}

// BreakerSelection is a load-balancing policy that keeps reverse_proxy away
// from upstreams whose circuit breaker is open: it hands the members whose
// breaker lets a request through to another policy (`inner`, default
// `random`) and takes a half-open member's probe slot when that one is
// chosen. A member that failed a request is not chosen again for that
// request's retries (`lb_retries`, `lb_try_duration`) while others are left.
//
// It works with a `coalesce` handler in front in the same route: coalesce
// reports every request's outcome to the breaker of the member this policy
// chose, and answers for the pool when every member is open (a stale copy
// within `stale_if_error`, else 503 with Retry-After). Without coalesce in
// front, it still avoids members that a breaker elsewhere has opened, but
// nothing reports outcomes for its requests.
//
// Members are keyed by their dial address as reverse_proxy reports it in
// `{http.reverse_proxy.upstream.hostport}`.
type BreakerSelection struct {
	// The policy that chooses among the members whose breaker lets the
	// request through. Default: random.
	InnerRaw json.RawMessage `json:"inner,omitempty" caddy:"namespace=http.reverse_proxy.selection_policies inline_key=policy"`

	inner reverseproxy.Selector
}

// CaddyModule returns the Caddy module information.
func (BreakerSelection) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.selection_policies.breaker",
		New: func() caddy.Module { return new(BreakerSelection) },
	}
}

// Provision loads the inner policy.
func (s *BreakerSelection) Provision(ctx caddy.Context) error {
	if s.InnerRaw == nil {
		s.InnerRaw = caddyconfig.JSONModuleObject(reverseproxy.RandomSelection{}, "policy", "random", nil)
	}
	mod, err := ctx.LoadModule(s, "InnerRaw")
	if err != nil {
		return fmt.Errorf("lb_policy breaker: loading the inner selection policy: %v", err)
	}
	sel, ok := mod.(reverseproxy.Selector)
	if !ok {
		return fmt.Errorf("lb_policy breaker: %T is not a selection policy", mod)
	}
	if _, nested := sel.(*BreakerSelection); nested {
		return fmt.Errorf("lb_policy breaker: the inner policy cannot be breaker again")
	}
	s.inner = sel
	return nil
}

// Select chooses an upstream whose breaker lets the request through.
func (s *BreakerSelection) Select(pool reverseproxy.UpstreamPool, r *http.Request, w http.ResponseWriter) *reverseproxy.Upstream {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	addrs := make([]string, len(pool))
	for i, u := range pool {
		addrs[i] = hostport(u, repl)
	}
	pick := coalesce.PickFrom(r.Context())
	if pick == nil {
		// No coalesce in front: nobody would report this request's
		// outcome, so take no probe slot, but keep away from members a
		// breaker elsewhere has opened.
		return s.inner.Select(subset(pool, addrs, func(a string) bool { return !breakers.Refusing(a) }), r, w)
	}
	pick.Begin(r)
	candidates := subset(pool, addrs, func(a string) bool { return pick.Ready(a) && !pick.Tried(a) })
	if len(candidates) == 0 {
		// Every ready member failed this request already: try them again,
		// as reverse_proxy would.
		candidates = subset(pool, addrs, pick.Ready)
	}
	for len(candidates) > 0 {
		u := s.inner.Select(candidates, r, w)
		if u == nil {
			// The inner policy found none available (health checks, max
			// requests): reverse_proxy answers as it always does.
			return nil
		}
		if pick.Take(hostport(u, repl)) {
			return u
		}
		// Its breaker opened meanwhile, or its probe slots are taken.
		candidates = without(candidates, u)
	}
	pick.NoneReady(addrs)
	return nil
}

// subset returns the members of pool (addrs aligned with it) whose address
// passes keep; pool itself when every member does.
func subset(pool reverseproxy.UpstreamPool, addrs []string, keep func(string) bool) reverseproxy.UpstreamPool {
	var out reverseproxy.UpstreamPool
	for i, u := range pool {
		switch ok := keep(addrs[i]); {
		case !ok && out == nil:
			out = append(make(reverseproxy.UpstreamPool, 0, len(pool)), pool[:i]...)
		case ok && out != nil:
			out = append(out, u)
		}
	}
	if out == nil {
		return pool
	}
	return out
}

// without returns a copy of pool without u.
func without(pool reverseproxy.UpstreamPool, u *reverseproxy.Upstream) reverseproxy.UpstreamPool {
	out := make(reverseproxy.UpstreamPool, 0, len(pool))
	for _, m := range pool {
		if m != u {
			out = append(out, m)
		}
	}
	return out
}

// hostport is the member's dial address as reverse_proxy puts it in
// {http.reverse_proxy.upstream.hostport}: placeholders replaced, host:port.
func hostport(u *reverseproxy.Upstream, repl *caddy.Replacer) string {
	dial := u.Dial
	if repl != nil {
		dial = repl.ReplaceAll(dial, "")
	}
	addr, err := caddy.ParseNetworkAddress(dial)
	if err != nil || addr.PortRangeSize() != 1 {
		return dial
	}
	return addr.JoinHostPort(0)
}

// UnmarshalCaddyfile sets up the policy from Caddyfile tokens. Syntax:
//
//	lb_policy breaker [<policy> [<args...>]]
//
// e.g. `lb_policy breaker round_robin`, `lb_policy breaker header X-Upstream`.
func (s *BreakerSelection) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // policy name
	if !d.NextArg() {
		return nil
	}
	name := d.Val()
	if name == "breaker" {
		return d.Err("lb_policy breaker: the inner policy cannot be breaker again; name another one, e.g. lb_policy breaker round_robin")
	}
	modID := "http.reverse_proxy.selection_policies." + name
	if _, err := caddy.GetModule(modID); err != nil {
		return d.Errf("lb_policy breaker: unknown selection policy %q; write one of %s, e.g. lb_policy breaker round_robin",
			name, strings.Join(selectionPolicies(), ", "))
	}
	unm, err := caddyfile.UnmarshalModule(d, modID)
	if err != nil {
		// The inner policy's own message says what is wrong and where (its
		// block may span lines), but not what to write: the form goes before
		// its location.
		msg, at := err.Error(), ""
		if i := strings.LastIndex(msg, ", at "); i > 0 {
			msg, at = msg[:i], msg[i:]
		}
		return fmt.Errorf("lb_policy breaker %s: %s; the form is e.g. %s%s", name, msg, innerExample(name), at)
	}
	sel, ok := unm.(reverseproxy.Selector)
	if !ok {
		return d.Errf("lb_policy breaker: module %s (%T) is not a selection policy", modID, unm)
	}
	s.InnerRaw = caddyconfig.JSONModuleObject(sel, "policy", name, nil)
	return nil
}

// innerExample is a correct `lb_policy breaker <name> ...` line, for errors.
func innerExample(name string) string {
	switch name {
	case "header":
		return "lb_policy breaker header X-User-Id"
	case "query":
		return "lb_policy breaker query user"
	case "cookie":
		return "lb_policy breaker cookie lb"
	case "random_choose":
		return "lb_policy breaker random_choose 2"
	case "weighted_round_robin":
		return "lb_policy breaker weighted_round_robin 3 1 (one weight per upstream)"
	}
	return "lb_policy breaker " + name
}

// selectionPolicies names the selection policies this Caddy has, but
// breaker itself.
func selectionPolicies() []string {
	var names []string
	for _, m := range caddy.GetModules("http.reverse_proxy.selection_policies") {
		if name := m.ID.Name(); name != "breaker" {
			names = append(names, name)
		}
	}
	return names
}

// Interface guards
var (
	_ caddy.Provisioner     = (*BreakerSelection)(nil)
	_ reverseproxy.Selector = (*BreakerSelection)(nil)
	_ caddyfile.Unmarshaler = (*BreakerSelection)(nil)
)
