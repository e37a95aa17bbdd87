package tests

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync"
	"testing"
)

// interim is an informational response a client saw.
type interim struct {
	code int
	link string
}

// getInterim is get that also records the 1xx responses the client saw.
func getInterim(client *http.Client, url string) (fetched, []interim) {
	var mu sync.Mutex
	var seen []interim
	trace := &httptrace.ClientTrace{Got1xxResponse: func(code int, h textproto.MIMEHeader) error {
		mu.Lock()
		seen = append(seen, interim{code, h.Get("Link")})
		mu.Unlock()
		return nil
	}}
	f := getCtx(httptrace.WithClientTrace(context.Background(), trace), client, "GET", url)
	mu.Lock()
	defer mu.Unlock()
	return f, seen
}

// RFC 9110 §15.2: a proxy forwards 1xx responses. The leader's client gets
// the upstream's 103 Early Hints (with its Link) before the final answer,
// as through a plain reverse_proxy; its followers and later hits get the
// final response only, and the hints stay out of the final header.
func TestEarlyHintsReachTheLeadersClientOnly(t *testing.T) {
	const link = "</app.css>; rel=preload; as=style"
	release := make(chan struct{})
	var once sync.Once
	open := func() { once.Do(func() { close(release) }) }
	t.Cleanup(open)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", link)
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		select {
		case <-release:
		case <-r.Context().Done():
			return
		}
		w.Header().Set("Content-Type", "text/plain")
		_, _ = fmt.Fprint(w, "final")
	})
	startCaddy(t, site("ttl 1s\n\t\tzone interim"), up)
	client := newClient(t)
	url := baseURL + freshPath(t)

	type result struct {
		f       fetched
		interim []interim
	}
	leader := make(chan result, 1)
	go func() { f, i := getInterim(client, url); leader <- result{f, i} }()
	eventually(t, "the leader at the upstream", func() bool { return up.inflight.Load() == 1 })
	follower := make(chan result, 1)
	go func() { f, i := getInterim(client, url); follower <- result{f, i} }()
	eventually(t, "the follower waiting", func() bool {
		var stats adminStats
		adminJSON(t, client, "GET", "/coalesce/stats", "", &stats)
		return stats.Zones["interim"].Registry.Waiters == 1
	})
	open()

	l, f := <-leader, <-follower
	if l.f.status != 200 || l.f.body != "final" {
		t.Fatalf("leader: %d %q %v", l.f.status, l.f.body, l.f.err)
	}
	if len(l.interim) != 1 || l.interim[0].code != http.StatusEarlyHints || l.interim[0].link != link {
		t.Errorf("leader saw interim responses %+v, want one 103 with Link %s", l.interim, link)
	}
	if got := l.f.header.Get("Link"); got != "" {
		t.Errorf("the leader's final response carries the hints' Link %q", got)
	}
	if f.f.status != 200 || f.f.body != "final" || len(f.interim) != 0 {
		t.Errorf("follower: %d %q (%s), interim %+v; want the final response only", f.f.status, f.f.body, f.f.cacheStatus(), f.interim)
	}
	hit, hitInterim := getInterim(client, url)
	if hit.status != 200 || hit.body != "final" || len(hitInterim) != 0 {
		t.Errorf("hit: %d %q (%s), interim %+v; want the final response only", hit.status, hit.body, hit.cacheStatus(), hitInterim)
	}
	if n := up.Calls(); n != 1 {
		t.Errorf("upstream calls: %d, want 1", n)
	}
}
