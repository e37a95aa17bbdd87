package coalesce

import (
	"net/http"
	"testing"
)

// A config reload closes the old config's engine while its requests still
// run. A request that joined a background refresh (it could not use the
// stale copy) must then be answered as if nothing had happened: by its own
// upstream request, not with an error for a refresh it never asked for.
func TestCloseSendsTheFollowersOfACancelledRefreshUpstreamOnTheirOwn(t *testing.T) {
	e, srv, _ := refreshOnAHungUpstream(t, nil)
	follower := async(func() reply { return get(t, srv, "/x", "Cache-Control", "no-cache") })
	waitWaiters(t, e, 1)
	e.Close()
	r := receive(t, follower, "the follower of the cancelled refresh")
	if r.status != http.StatusOK || r.body != "v3" {
		t.Errorf("follower of a refresh cancelled by Close: %d %q (%q), want 200 v3 from its own upstream request", r.status, r.body, r.cacheStatus())
	}
}
