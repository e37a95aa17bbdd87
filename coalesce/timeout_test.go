package coalesce

import (
	"net/http"
	"strings"
	"testing"
	"time"
)

// A response without a length that is not done 100ms after its first flush
// becomes a stream, and the breaker hears its outcome then, from the
// recorder's timer, while the handler still runs under the breaker's
// timeout. (Run with -race: the timeout's bookkeeping must not race with
// that report.)
func TestATrickleUnderTheBreakersTimeoutBecomesAStream(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.Breaker.Timeout = 5 * time.Second })
	o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte("[1,2]"))
		http.NewResponseController(w).Flush()
		time.Sleep(300 * time.Millisecond) // well past the recorder's 100ms
	})
	srv := newServer(t, e.Handler(o))
	r := get(t, srv, "/trickle")
	if r.status != http.StatusOK || r.body != "[1,2]" || !strings.Contains(r.cacheStatus(), "detail=stream") {
		t.Errorf("trickle: %d %q (%q), want 200 [1,2] streamed", r.status, r.body, r.cacheStatus())
	}
}
