package tests

import (
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// Who may receive whose response: identities, Set-Cookie, private,
// no-store, Vary.

func TestDifferentAuthorizationsNeverReceiveEachOthersResponse(t *testing.T) {
	client, url := expectIdentitiesKeptApart(t, "Authorization", "Bearer alice", "Bearer bob")
	if f := get(client, "GET", url); f.body != "for " {
		t.Errorf("anonymous GET got %q, want the anonymous answer", f.body)
	}
}

func TestDifferentCookiesNeverReceiveEachOthersResponse(t *testing.T) {
	expectIdentitiesKeptApart(t, "Cookie", "session=alice", "session=bob")
}

// expectIdentitiesKeptApart sends a herd of 40 clients, taking turns at the
// identities in header, to an upstream that answers "for <identity>" once
// all 40 wait. Each client must get its own identity's answer, from one
// upstream call per identity, and within the TTL each identity its own
// stored copy. It returns the client and URL for the caller's further
// checks.
func expectIdentitiesKeptApart(t *testing.T, header string, identities ...string) (*http.Client, string) {
	t.Helper()
	up := newUpstream(t, newHerdGate(t, 40).wrap(func(w http.ResponseWriter, r *http.Request) {
		_, _ = fmt.Fprint(w, "for "+r.Header.Get(header))
	}))
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 40)
	url := baseURL + pathFor(t, "")
	identity := func(i int) string { return identities[i%len(identities)] }

	got := together(40, func(i int) fetched { return get(client, "GET", url, header+": "+identity(i)) })

	for i, f := range got {
		if want := "for " + identity(i); f.status != 200 || f.body != want {
			t.Errorf("client %d (%s): got %d %q, want 200 %q", i, identity(i), f.status, f.body, want)
		}
	}
	if n := up.Calls(); n != int64(len(identities)) {
		t.Errorf("upstream calls: %d, want %d (one per identity)", n, len(identities))
	}

	// Within the TTL each identity gets its own stored copy: a hit, without
	// another upstream call.
	for _, id := range identities {
		if f := get(client, "GET", url, header+": "+id); f.status != 200 || f.body != "for "+id || !strings.Contains(f.cacheStatus(), "hit") {
			t.Errorf("GET for %s within the TTL: %d %q, Cache-Status %q; want its own stored copy, a hit", id, f.status, f.body, f.cacheStatus())
		}
	}
	if n := up.Calls(); n != int64(len(identities)) {
		t.Errorf("upstream calls after the hits: %d, want still %d", n, len(identities))
	}
	return client, url
}

func TestConcurrentSetCookieResponsesAreEachClientsOwn(t *testing.T) {
	var seq, alone atomic.Int64
	// The leader is answered once the herd of 10 waits; then each follower,
	// sent upstream on its own, is held until all 9 are there at once (or
	// 10s have passed).
	allAlone := make(chan struct{})
	up := newUpstream(t, newHerdGate(t, 10).wrap(func(w http.ResponseWriter, r *http.Request) {
		n := seq.Add(1)
		if n > 1 {
			if alone.Add(1) == 9 {
				close(allAlone)
			}
			select {
			case <-allAlone:
			case <-time.After(10 * time.Second):
			}
		}
		w.Header().Set("Set-Cookie", fmt.Sprintf("session=s%d; Path=/; HttpOnly", n))
		_, _ = fmt.Fprintf(w, "hello s%d", n)
	}))
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 10)

	start := time.Now()
	got := herd(client, 10, "GET", baseURL+pathFor(t, ""))
	took := time.Since(start)

	if n := up.Calls(); n != 10 {
		t.Errorf("upstream calls: %d, want 10 (every client its own)", n)
	}
	seen := map[string]bool{}
	for i, f := range got {
		cookie := f.header.Get("Set-Cookie")
		name, _, _ := strings.Cut(cookie, ";")
		if f.status != 200 || name == "" || f.body != "hello "+strings.TrimPrefix(name, "session=") {
			t.Errorf("client %d: %d %q with Set-Cookie %q: body and cookie are not one response", i, f.status, f.body, cookie)
		}
		if len(f.header.Values("Set-Cookie")) != 1 {
			t.Errorf("client %d got %d Set-Cookie fields", i, len(f.header.Values("Set-Cookie")))
		}
		if seen[name] {
			t.Errorf("client %d got cookie %q that another client got too", i, name)
		}
		seen[name] = true
	}
	// Followers go upstream all at once, not one after another.
	select {
	case <-allAlone:
	default:
		t.Errorf("%d of the 9 followers were at the upstream at once; followers of an unshareable response must not queue", alone.Load())
	}
	if took > 3*time.Second {
		t.Errorf("the herd took %s; followers of an unshareable response must not queue", took)
	}

	// The next burst does not wait for a response it cannot use, and still
	// gets a cookie each.
	again := herd(client, 5, "GET", baseURL+pathFor(t, ""))
	for i, f := range again {
		if name, _, _ := strings.Cut(f.header.Get("Set-Cookie"), ";"); seen[name] || name == "" {
			t.Errorf("later client %d got cookie %q, not a fresh one", i, name)
		}
	}
}

func TestConcurrentPrivateResponsesAreEachClientsOwn(t *testing.T) {
	var seq atomic.Int64
	up := newUpstream(t, newHerdGate(t, 10).wrap(func(w http.ResponseWriter, r *http.Request) {
		n := seq.Add(1)
		w.Header().Set("Cache-Control", "private, max-age=60")
		_, _ = fmt.Fprintf(w, "private answer %d", n)
	}))
	startCaddy(t, site("ttl 500ms"), up)
	client := newClient(t)
	warm(t, client, 10)

	got := herd(client, 10, "GET", baseURL+pathFor(t, ""))

	if n := up.Calls(); n != 10 {
		t.Errorf("upstream calls: %d, want 10", n)
	}
	seen := map[string]bool{}
	for i, f := range got {
		if f.status != 200 || !strings.HasPrefix(f.body, "private answer ") || seen[f.body] {
			t.Errorf("client %d: %d %q (duplicate: %v)", i, f.status, f.body, seen[f.body])
		}
		seen[f.body] = true
	}
	// Nor is it stored.
	if f := get(client, "GET", baseURL+pathFor(t, "")); seen[f.body] || strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("a GET after the herd got %q (Cache-Status %q): private response reused", f.body, f.cacheStatus())
	}
}

func TestNoStoreResponsesAreNeverStored(t *testing.T) {
	var up *upstream
	up = newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "no-store")
		_, _ = fmt.Fprintf(w, "answer %d", up.Calls())
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	first := get(client, "GET", url)
	second := get(client, "GET", url)

	if first.body != "answer 1" || second.body != "answer 2" {
		t.Errorf("bodies %q, %q: want answer 1, answer 2", first.body, second.body)
	}
	if n := up.Calls(); n != 2 {
		t.Errorf("upstream calls: %d, want 2", n)
	}
	for _, f := range []fetched{first, second} {
		if cs := f.cacheStatus(); strings.Contains(cs, "stored") || strings.Contains(cs, "hit") {
			t.Errorf("Cache-Status %q for a no-store response", cs)
		}
	}
}

func TestVaryAcceptLanguageIsHonouredForFollowersAndHits(t *testing.T) {
	up := newUpstream(t, newHerdGate(t, 30).wrap(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Vary", "Accept-Language")
		_, _ = fmt.Fprint(w, "lang="+r.Header.Get("Accept-Language"))
	}))
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 30)
	url := baseURL + pathFor(t, "")
	langs := []string{"en", "de", "fr"}

	got := together(30, func(i int) fetched { return get(client, "GET", url, "Accept-Language: "+langs[i%3]) })

	collapsed := 0
	for i, f := range got {
		if want := "lang=" + langs[i%3]; f.status != 200 || f.body != want {
			t.Errorf("client %d (%s): got %d %q, want 200 %q", i, langs[i%3], f.status, f.body, want)
		}
		if strings.Contains(f.cacheStatus(), "collapsed") {
			collapsed++
		}
	}
	// The leader's language is shared with the followers that speak it.
	if collapsed < 9 {
		t.Errorf("%d clients collapsed; want the 9 followers of the leader's language", collapsed)
	}
	t.Logf("mixed-language herd of 30: %d upstream calls, %d collapsed", up.Calls(), collapsed)

	// Hits: whatever is stored, every client still gets its own language.
	for round := range 2 {
		for _, l := range langs {
			if f := get(client, "GET", url, "Accept-Language: "+l); f.status != 200 || f.body != "lang="+l {
				t.Errorf("round %d, %s: got %d %q (Cache-Status %q)", round, l, f.status, f.body, f.cacheStatus())
			}
		}
	}
}
