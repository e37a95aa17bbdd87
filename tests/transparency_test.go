package tests

import (
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// Through the module a client gets the header fields it would get without
// it, plus Cache-Status (and Age on a stored copy). Caddy gives every
// response "Server: Caddy"; reverse_proxy deletes it and sends Via instead,
// while a handler that answers itself keeps it.
func TestResponseHeaderIsWhatTheHandlerAloneSends(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("X-Upstream", "yes")
		fmt.Fprint(w, `{"path":"`+r.URL.Path+`"}`)
	})
	startCaddy(t, fmt.Sprintf(`:%d {
	handle /plain/* {
		reverse_proxy {up}
	}
	handle /own/* {
		coalesce {
			ttl 1s
		}
		respond "own" 200
	}
	handle {
		coalesce {
			ttl 1s
		}
		reverse_proxy {up}
	}
}
`, httpPort), up, up)
	client := newClient(t)

	plain := get(client, "GET", baseURL+"/plain"+pathFor(t, "/a"))
	if plain.err != nil || plain.status != http.StatusOK {
		t.Fatalf("plain reverse_proxy: %d %v", plain.status, plain.err)
	}
	if _, ok := plain.header["Server"]; ok {
		t.Fatalf("plain reverse_proxy sends Server %q: the premise of this test no longer holds", plain.header.Get("Server"))
	}
	want := fieldNames(plain.header)

	proxied := pathFor(t, "/b")
	for _, step := range []string{"miss", "hit"} {
		f := get(client, "GET", baseURL+proxied)
		if f.err != nil || f.status != http.StatusOK {
			t.Fatalf("%s through coalesce: %d %v", step, f.status, f.err)
		}
		if step == "hit" && !strings.Contains(f.cacheStatus(), "hit") {
			t.Fatalf("second request: Cache-Status %q, want a hit", f.cacheStatus())
		}
		got := slices.DeleteFunc(fieldNames(f.header), func(k string) bool { return k == "Cache-Status" || k == "Age" })
		if !slices.Equal(got, want) {
			t.Errorf("%s through coalesce: header fields %v, want those of plain reverse_proxy %v (and Cache-Status)", step, got, want)
		}
		if v := f.header.Get("Via"); v != "1.1 Caddy" {
			t.Errorf("%s through coalesce: Via %q, want %q as reverse_proxy sends", step, v, "1.1 Caddy")
		}
	}

	own := pathFor(t, "/c")
	for _, step := range []string{"miss", "hit"} {
		f := get(client, "GET", baseURL+"/own"+own)
		if f.err != nil || f.status != http.StatusOK || f.body != "own" {
			t.Fatalf("%s of a respond behind coalesce: %d %q %v", step, f.status, f.body, f.err)
		}
		if s := f.header.Values("Server"); len(s) != 1 || s[0] != "Caddy" {
			t.Errorf("%s of a respond behind coalesce: Server %q, want %q as respond alone sends", step, s, "Caddy")
		}
	}
}

// fieldNames lists h's field names, sorted.
func fieldNames(h http.Header) []string { return slices.Sorted(maps.Keys(h)) }

// An event stream's subscribers, the one that started it and one that
// joined, get the header reverse_proxy alone would send them.
func TestEventStreamHeaderIsWhatReverseProxyAloneSends(t *testing.T) {
	src := newEventSource()
	up := newUpstream(t, src.serve)
	startCaddy(t, sseSite("linger 100ms"), up)
	client, admin := sseClient(t), newClient(t)
	path := pathFor(t, "")

	first := subscribe(t, client, path)
	waitUntil(t, 10*time.Second, "the first subscriber", func() bool { return subscribersOf(t, admin, path) == 1 })
	second := subscribe(t, client, path)
	for name, s := range map[string]*subscriber{"started": first, "joined": second} {
		if v, ok := s.resp.Header["Server"]; ok {
			t.Errorf("the subscriber that %s the stream: Server %q, want none, as reverse_proxy sends", name, v)
		}
		if v := s.resp.Header.Get("Via"); v != "1.1 Caddy" {
			t.Errorf("the subscriber that %s the stream: Via %q, want %q", name, v, "1.1 Caddy")
		}
	}
	if got := up.Calls(); got != 1 {
		t.Errorf("upstream connections: %d, want 1", got)
	}
}

// A field a handler before the module set (a `header` directive's) keeps
// its value, and the upstream's value of the same field follows it, as
// reverse_proxy alone adds the upstream's header to the client's: for the
// request that went upstream, for a collapsed follower and for a hit, with
// a few fields set before the module and with many. A deferred operation
// replaces the upstream's value.
func TestFieldsSetBeforeTheModuleAreKeptAsReverseProxyKeepsThem(t *testing.T) {
	gate := newHerdGate(t, 3)
	answer := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Upstream", "yes")
		fmt.Fprint(w, `{"path":"`+r.URL.Path+`"}`)
	}
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if strings.Contains(r.URL.Path, "/herd") {
			gate.wrap(answer)(w, r)
			return
		}
		answer(w, r)
	})
	startCaddy(t, fmt.Sprintf(`:%d {
	header X-Upstream edge
	handle /plain/* {
		reverse_proxy {up}
	}
	handle /deferred/* {
		header >X-Upstream edge
		coalesce {
			ttl 1s
		}
		reverse_proxy {up}
	}
	handle /many/* {
		header X-A 1
		header X-B 2
		header X-C 3
		header X-D 4
		coalesce {
			ttl 1s
		}
		reverse_proxy {up}
	}
	handle {
		coalesce {
			ttl 1s
		}
		reverse_proxy {up}
	}
}
`, httpPort), up, up, up, up)
	client := newClient(t)
	want := []string{"edge", "yes"}

	plain := get(client, "GET", baseURL+"/plain"+pathFor(t, "/a"))
	if got := plain.header.Values("X-Upstream"); plain.err != nil || !slices.Equal(got, want) {
		t.Fatalf("plain reverse_proxy: X-Upstream %q (%v), want %q: the premise of this test no longer holds", got, plain.err, want)
	}
	check := func(what string, f fetched, cacheStatus string) {
		t.Helper()
		if f.err != nil || f.status != http.StatusOK {
			t.Fatalf("%s: %d %v", what, f.status, f.err)
		}
		if !strings.Contains(f.cacheStatus(), cacheStatus) {
			t.Errorf("%s: Cache-Status %q, want %q in it", what, f.cacheStatus(), cacheStatus)
		}
		if got := f.header.Values("X-Upstream"); !slices.Equal(got, want) {
			t.Errorf("%s: X-Upstream %q, want %q as reverse_proxy alone sends", what, got, want)
		}
	}
	for _, prefix := range []string{"", "/many"} {
		path := prefix + pathFor(t, "/b")
		check(prefix+" miss", get(client, "GET", baseURL+path), "fwd=uri-miss")
		check(prefix+" hit", get(client, "GET", baseURL+path), "hit")
		check(prefix+" hit again", get(client, "GET", baseURL+path), "hit")

		herd := herd(client, 3, "GET", baseURL+prefix+pathFor(t, "/herd"))
		collapsed := 0
		for i, f := range herd {
			check(fmt.Sprintf("%s herd client %d", prefix, i), f, "fwd=uri-miss")
			if strings.Contains(f.cacheStatus(), "collapsed") {
				collapsed++
			}
		}
		if collapsed != 2 {
			t.Errorf("%s herd: %d collapsed followers, want 2", prefix, collapsed)
		}
	}

	// A deferred header operation replaces the upstream's value, through
	// the module as without it.
	path := "/deferred" + pathFor(t, "/d")
	for _, step := range []string{"miss", "hit"} {
		f := get(client, "GET", baseURL+path)
		if got := f.header.Values("X-Upstream"); f.err != nil || !slices.Equal(got, []string{"edge"}) {
			t.Errorf("deferred header, %s: X-Upstream %q (%v), want [edge]", step, got, f.err)
		}
	}
}
