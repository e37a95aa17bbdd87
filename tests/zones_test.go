package tests

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// twoRoutesJSON is a JSON config with two routes on one server, the way a
// JSON user splits internal from public traffic: requests with
// `X-Internal: yes` go to internal, all others to public, each through a
// coalesce handler with the given JSON (the same for both unless they
// differ in zone).
func twoRoutesJSON(internal, public *upstream, internalHandler, publicHandler string) string {
	return fmt.Sprintf(`{
	"admin": {"listen": "localhost:%d"},
	"apps": {
		"http": {
			"http_port": %d,
			"https_port": %d,
			"grace_period": 1,
			"servers": {
				"srv0": {
					"listen": [":%d"],
					"automatic_https": {"disable": true},
					"routes": [
						{
							"match": [{"header": {"X-Internal": ["yes"]}}],
							"handle": [
								%s,
								{"handler": "reverse_proxy", "upstreams": [{"dial": %q}]}
							]
						},
						{
							"handle": [
								%s,
								{"handler": "reverse_proxy", "upstreams": [{"dial": %q}]}
							]
						}
					]
				}
			}
		},
		"pki": {"certificate_authorities": {"local": {"install_trust": false}}}
	}
}`, adminPort, httpPort, httpsPort, httpPort, internalHandler, internal.addr, publicHandler, public.addr)
}

// namedUpstream answers every request with its name (stored for 10 s by
// the upstream's own Cache-Control, so that only the handler's ttl bounds
// it).
func namedUpstream(t *testing.T, name string) *upstream {
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=10")
		_, _ = io.WriteString(w, name)
	})
}

// loadConfig loads config (JSON, or a Caddyfile site after the harness's
// global options) into the in-process Caddy through the admin API. force
// reloads even when the config is unchanged, as `caddy reload --force`
// does; without it Caddy ignores a config equal to the running one.
func loadConfig(t *testing.T, config, contentType string, force bool) {
	t.Helper()
	if contentType == "text/caddyfile" {
		config = globalOptions + config
	}
	req, _ := http.NewRequest("POST", fmt.Sprintf("http://127.0.0.1:%d/load", adminPort), strings.NewReader(config))
	req.Header.Set("Content-Type", contentType)
	if force {
		req.Header.Set("Cache-Control", "must-revalidate")
	}
	resp, err := (&http.Client{Timeout: 30 * time.Second}).Do(req)
	if err != nil {
		t.Fatalf("load: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("load: %d %s", resp.StatusCode, body)
	}
}

// initServer loads config (JSON, or a Caddyfile site after the harness's
// global options) as the test's first config, starting the in-process
// Caddy if this test binary has not yet.
func initServer(t *testing.T, config, format string) {
	t.Helper()
	if format == "caddyfile" {
		config = globalOptions + config
	}
	loadFirst(t, config, format)
}

// expectBody fails t unless f is a 200 with body want.
func expectBody(t *testing.T, what string, f fetched, want string) {
	t.Helper()
	if f.err != nil || f.status != http.StatusOK || f.body != want {
		t.Errorf("%s: got %d %q (err %v, Cache-Status %q), want 200 %q", what, f.status, f.body, f.err, f.cacheStatus(), want)
	}
}

func TestHandlersInDifferentRoutesNeverShareState(t *testing.T) {
	internal, public := namedUpstream(t, "internal"), namedUpstream(t, "public")
	const handler = `{"handler": "coalesce", "ttl": "1s"}`
	initServer(t, twoRoutesJSON(internal, public, handler, handler), "json")
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	expectBody(t, "the internal client", get(client, "GET", url, "X-Internal: yes"), "internal")
	expectBody(t, "a public client after the internal one", get(client, "GET", url), "public")
	if n := public.Calls(); n != 1 {
		t.Errorf("the public upstream got %d requests, want 1", n)
	}
	// Each handler keeps its own entry: both are hits now.
	for _, c := range []struct{ who, header, want string }{{"internal", "X-Internal: yes", "internal"}, {"public", "", "public"}} {
		var headers []string
		if c.header != "" {
			headers = append(headers, c.header)
		}
		f := get(client, "GET", url, headers...)
		expectBody(t, "the "+c.who+" client again", f, c.want)
		if !strings.Contains(f.cacheStatus(), "hit") {
			t.Errorf("the %s client again: Cache-Status %q, want a hit from its own route's entry", c.who, f.cacheStatus())
		}
	}
	if internal.Calls() != 1 || public.Calls() != 1 {
		t.Errorf("upstream requests: internal %d, public %d; want 1 each", internal.Calls(), public.Calls())
	}

	// Both report under the label of handlers without a zone, as two states.
	var stats struct {
		Zones map[string]struct {
			Engines int `json:"engines"`
			Cache   struct {
				Entries int64 `json:"entries"`
			} `json:"cache"`
		} `json:"zones"`
	}
	adminJSON(t, client, "GET", "/coalesce/stats", "", &stats)
	if z := stats.Zones["default"]; z.Engines != 2 || z.Cache.Entries != 2 || len(stats.Zones) != 1 {
		t.Errorf("GET /coalesce/stats zones: %+v; want only \"default\", with 2 engines holding 2 entries", stats.Zones)
	}
}

func TestHandlersWithTheSameZoneShareState(t *testing.T) {
	internal, public := namedUpstream(t, "internal"), namedUpstream(t, "public")
	const handler = `{"handler": "coalesce", "ttl": "1s", "zone": "one-api"}`
	initServer(t, twoRoutesJSON(internal, public, handler, handler), "json")
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	expectBody(t, "the internal client", get(client, "GET", url, "X-Internal: yes"), "internal")
	f := get(client, "GET", url)
	expectBody(t, "a public client after the internal one (one zone: the operator said both routes serve one API)", f, "internal")
	if !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("a public client after the internal one: Cache-Status %q, want a hit", f.cacheStatus())
	}
	if n := public.Calls(); n != 0 {
		t.Errorf("the public upstream got %d requests, want 0", n)
	}
}

// twoRoutesCaddyfile is twoRoutesJSON as a Caddyfile site, with an unnamed
// `coalesce { ttl 1s }` in each route; without the internal route when
// internal is nil.
func twoRoutesCaddyfile(internal, public *upstream) string {
	internalRoute := ""
	if internal != nil {
		internalRoute = fmt.Sprintf(`@internal header X-Internal yes
	route @internal {
		coalesce {
			ttl 1s
		}
		reverse_proxy %s
	}
	`, internal.addr)
	}
	return fmt.Sprintf(`:%d {
	%sroute {
		coalesce {
			ttl 1s
		}
		reverse_proxy %s
	}
}
`, httpPort, internalRoute, public.addr)
}

func TestReloadOfTheSameConfigKeepsTheCachedEntry(t *testing.T) {
	for _, format := range []string{"json", "caddyfile"} {
		t.Run(format, func(t *testing.T) {
			internal, public := namedUpstream(t, "internal"), namedUpstream(t, "public")
			config, contentType := twoRoutesCaddyfile(internal, public), "text/caddyfile"
			if format == "json" {
				const handler = `{"handler": "coalesce", "ttl": "1s"}`
				config, contentType = twoRoutesJSON(internal, public, handler, handler), "application/json"
			}
			initServer(t, config, format)
			client := newClient(t)
			url := baseURL + pathFor(t, "")
			expectBody(t, "before the reload", get(client, "GET", url), "public")

			loadConfig(t, config, contentType, true)
			f := get(client, "GET", url)
			expectBody(t, "after a reload of the same config", f, "public")
			if !strings.Contains(f.cacheStatus(), "hit") || public.Calls() != 1 {
				t.Errorf("after a reload of the same config: Cache-Status %q, %d upstream requests; want a hit from the entry stored before, 1 request", f.cacheStatus(), public.Calls())
			}
		})
	}
}

func TestReloadNeverHandsOneRoutesEntriesToAnother(t *testing.T) {
	for _, c := range []struct {
		name  string
		after func(internal, public *upstream) string
		// headers of the request after the reload, and the body it must get
		headers []string
		want    string
	}{
		{
			// The second handler becomes the first coalesce of the file.
			name:  "the first of two equal handlers removed",
			after: func(internal, public *upstream) string { return twoRoutesCaddyfile(nil, public) },
			want:  "public",
		},
		{
			// Same handlers in the same places, the routes' upstreams swapped.
			name:    "the routes' upstreams swapped",
			after:   func(internal, public *upstream) string { return twoRoutesCaddyfile(public, internal) },
			headers: []string{"X-Internal: yes"},
			want:    "public",
		},
	} {
		t.Run(c.name, func(t *testing.T) {
			internal, public := namedUpstream(t, "internal"), namedUpstream(t, "public")
			initServer(t, twoRoutesCaddyfile(internal, public), "caddyfile")
			client := newClient(t)
			url := baseURL + pathFor(t, "")
			expectBody(t, "the internal client before the reload", get(client, "GET", url, "X-Internal: yes"), "internal")

			loadConfig(t, c.after(internal, public), "text/caddyfile", true)
			f := get(client, "GET", url, c.headers...)
			expectBody(t, "after the reload", f, c.want)
		})
	}
}
