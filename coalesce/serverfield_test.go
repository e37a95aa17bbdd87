package coalesce

import (
	"fmt"
	"net/http"
	"sync/atomic"
	"testing"
	"time"
)

// The server in front of the engine gives every response a Server field
// (Caddy's "Server: Caddy"). A handler that deletes it (reverse_proxy does)
// deletes it for every client of its response; one that leaves it alone
// leaves each client its own. That holds for the copy a background refresh
// stores, which no client's header lent the field to.
func TestServerFieldIsWhatTheHandlerMadeOfIt(t *testing.T) {
	for _, drops := range []bool{true, false} {
		t.Run(fmt.Sprintf("handler drops it: %v", drops), func(t *testing.T) {
			var n atomic.Int64
			upstream := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if drops {
					delete(w.Header(), "Server")
				}
				fmt.Fprintf(w, "v%d", n.Add(1))
			})
			e := newEngine(t, func(c *Config) {
				c.TTL = 50 * time.Millisecond
				c.Stale = 10 * time.Second
			})
			h := e.Handler(upstream)
			srv := newServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Server", "front")
				h.ServeHTTP(w, r)
			}))
			want := []string{"front"}
			if drops {
				want = nil
			}
			check := func(what string, r reply) {
				t.Helper()
				if got := r.header.Values("Server"); fmt.Sprint(got) != fmt.Sprint(want) {
					t.Errorf("%s (%q, Cache-Status %q): Server %q, want %q", what, r.body, r.cacheStatus(), got, want)
				}
			}
			check("the miss", get(t, srv, "/x"))
			check("the hit", get(t, srv, "/x"))
			// Once the copy is stale, each request starts a refresh until
			// one has stored v2.
			var refreshed reply
			waitFor(t, "the refreshed copy", func() bool {
				refreshed = get(t, srv, "/x")
				return refreshed.body == "v2"
			})
			check("the refreshed copy", refreshed)
		})
	}
}
