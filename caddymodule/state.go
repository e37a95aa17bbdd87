package caddymodule

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// engines holds the registry and micro-cache of every handler, under the
// pool key poolKey gives it, so that a config reload that keeps a handler
// keeps its state and requests of the old config finish against the same
// registry.
var engines = caddy.NewUsagePool()

// bypassAll is the process-wide kill switch: while it is on, every coalesce
// handler passes requests straight through.
var bypassAll atomic.Bool

type pooledEngine struct{ *coalesce.Engine }

// Destruct runs when the last config holding the engine is gone.
func (p pooledEngine) Destruct() error {
	p.Close()
	return nil
}

// poolKey names the state a handler holds; settings is the handler's JSON.
//
// A handler with a zone holds the state of its zone and settings: every
// handler with that zone and those settings, in this config and the next,
// holds the same one.
//
// A handler without a zone holds state of its own, which the next config
// finds again only if it has the same handler at the same place: in the
// same top-level route (matchers, and every handler nested in it, with
// their settings and upstreams) of a server with the same listen
// addresses, at the same rank among the unnamed handlers of that route.
// Any change to that route gives its handlers new state, so a reload never
// hands one route's entries to another, whichever handlers it removes,
// moves or repoints. Where the route cannot be told (a named route, a
// handler inside a module other than Caddy's routes), the state lasts one
// config.
func poolKey(ctx caddy.Context, zone string, settings []byte) (key string, rank *routeRank) {
	sum := sha256.Sum256(settings)
	settingsHash := hex.EncodeToString(sum[:8])
	if zone != "" {
		return "zone:" + zone + "/" + settingsHash, nil
	}
	srv, route, ok := provisioningRoute(ctx)
	if !ok {
		return "config:" + strconv.FormatUint(unplaced.Add(1), 10) + "/" + settingsHash, nil
	}
	rank = rankIn(srv, route)
	return "route:" + route + "#" + strconv.Itoa(rank.n) + "/" + settingsHash, rank
}

// unplaced numbers the handlers whose route could not be told, so that each
// gets state of its own.
var unplaced atomic.Uint64

// provisioningRoute fingerprints the top-level route of the server whose
// handlers Caddy is provisioning now, the one that holds the handler being
// provisioned. Caddy provisions a server's routes in order and clears each
// route's raw handler JSON once it has loaded them (caddy.Context.LoadModule
// says so), so that route is the first whose raw JSON is still there; its
// matchers were loaded before any handler. The raw JSON of the top-level
// route holds everything nested in it (subroutes, handle blocks, the
// handlers' settings and upstreams).
func provisioningRoute(ctx caddy.Context) (srv *caddyhttp.Server, fingerprint string, ok bool) {
	srv, _ = ctx.Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if srv == nil {
		return nil, "", false
	}
	lists := []struct {
		name   string
		routes caddyhttp.RouteList
	}{{"routes", srv.Routes}}
	if srv.Errors != nil {
		lists = append(lists, struct {
			name   string
			routes caddyhttp.RouteList
		}{"errors", srv.Errors.Routes})
	}
	for _, list := range lists {
		for i := range list.routes {
			r := &list.routes[i]
			if len(r.HandlersRaw) == 0 {
				continue
			}
			h := sha256.New()
			fmt.Fprintf(h, "listen %q\n%s\ngroup %q terminal %t\n", srv.Listen, list.name, r.Group, r.Terminal)
			for _, set := range r.MatcherSets {
				fmt.Fprintln(h, "match")
				for _, m := range set {
					b, err := json.Marshal(m)
					if err != nil {
						return nil, "", false
					}
					fmt.Fprintf(h, "%T %s\n", m, b)
				}
			}
			for _, raw := range r.HandlersRaw {
				fmt.Fprintf(h, "handle %s\n", raw)
			}
			// A sanity check on the order of provisioning: the route
			// must hold a coalesce handler.
			holds := false
			for _, raw := range r.HandlersRaw {
				holds = holds || strings.Contains(string(raw), `"coalesce"`)
			}
			if !holds {
				return nil, "", false
			}
			return srv, hex.EncodeToString(h.Sum(nil)[:12]), true
		}
	}
	// Every route and error route is loaded: a named route, provisioned
	// in no fixed order.
	return nil, "", false
}

// routeRank is the rank of an unnamed handler among the unnamed handlers of
// its top-level route, counted while one config is provisioned (in the
// order Caddy provisions them, which is the order of the config).
type routeRank struct {
	srv *caddyhttp.Server
	n   int
}

// ranks counts, per server of the config being provisioned, the unnamed
// handlers provisioned so far in each top-level route. A server's counts
// go when the last of its handlers is cleaned up.
var ranks = struct {
	mu      sync.Mutex
	servers map[*caddyhttp.Server]*serverRanks
}{servers: map[*caddyhttp.Server]*serverRanks{}}

type serverRanks struct {
	byRoute map[string]int
	holders int
}

func rankIn(srv *caddyhttp.Server, route string) *routeRank {
	ranks.mu.Lock()
	defer ranks.mu.Unlock()
	s, ok := ranks.servers[srv]
	if !ok {
		s = &serverRanks{byRoute: map[string]int{}}
		ranks.servers[srv] = s
	}
	s.holders++
	n := s.byRoute[route]
	s.byRoute[route] = n + 1
	return &routeRank{srv: srv, n: n}
}

// release lets go of the counts of r's server.
func (r *routeRank) release() {
	if r == nil {
		return
	}
	ranks.mu.Lock()
	defer ranks.mu.Unlock()
	s, ok := ranks.servers[r.srv]
	if !ok {
		return
	}
	if s.holders--; s.holders == 0 {
		delete(ranks.servers, r.srv)
	}
}

// Interface guards
var _ caddy.Destructor = pooledEngine{}
