package tests

import (
	"fmt"
	"net/http"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// The HTTP caching rules as a client sees them through Caddy: content
// codings, reloads, credentials under `public`, freshness, and writes.

// A client that names one coding this module does not know never receives
// a response encoded with another it did not name.
func TestUnknownContentCodingsAreNeverSharedAcrossCodings(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Vary", "Accept-Encoding")
		ae := strings.ToLower(r.Header.Get("Accept-Encoding"))
		if strings.Contains(ae, "compress") {
			w.Header().Set("Content-Encoding", "compress")
			_, _ = fmt.Fprint(w, "compress-encoded bytes")
			return
		}
		_, _ = fmt.Fprint(w, "plain bytes for "+ae)
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	if f := get(client, "GET", url, "Accept-Encoding: compress"); f.status != 200 || f.header.Get("Content-Encoding") != "compress" || !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("first request: %d, Content-Encoding %q, Cache-Status %q; want a stored compress answer", f.status, f.header.Get("Content-Encoding"), f.cacheStatus())
	}
	for _, ae := range []string{"exi", "*", "gzip, exi"} {
		f := get(client, "GET", url, "Accept-Encoding: "+ae)
		if f.err != nil || f.status != 200 {
			t.Errorf("Accept-Encoding %q: %d, err %v", ae, f.status, f.err)
			continue
		}
		if ce := f.header.Get("Content-Encoding"); ce != "" || f.body != "plain bytes for "+ae {
			t.Errorf("Accept-Encoding %q received Content-Encoding %q, body %q (Cache-Status %q): a coding it did not name", ae, ce, f.body, f.cacheStatus())
		}
	}
	if n := up.Calls(); n != 4 {
		t.Errorf("upstream calls: %d, want 4 (one per set of codings)", n)
	}
	// The same unknown coding, named differently, still shares.
	if f := get(client, "GET", url, "Accept-Encoding: X-Compress;q=0.5"); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("x-compress after compress: Cache-Status %q, want a hit", f.cacheStatus())
	}
}

// A browser's reload sends Cache-Control: max-age=0: it is never answered
// from the micro-cache, but it may join a request in flight (whose answer
// is new).
func TestReloadWithMaxAgeZeroIsNeverAnsweredFromTheMicroCache(t *testing.T) {
	release := make(chan struct{})
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("hold") != "" {
			select {
			case <-release:
			case <-r.Context().Done():
				return
			}
		}
		_, _ = fmt.Fprint(w, "answer")
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")

	if f := get(client, "GET", url); !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("first request: Cache-Status %q, want stored", f.cacheStatus())
	}
	for _, cc := range []string{"max-age=0", "Max-Age=0, stale-if-error=60"} {
		f := get(client, "GET", url, "Cache-Control: "+cc)
		if f.status != 200 || strings.Contains(f.cacheStatus(), "hit") {
			t.Errorf("Cache-Control %q: %d, Cache-Status %q: answered from the micro-cache", cc, f.status, f.cacheStatus())
		}
	}
	if n := up.PathCalls(pathFor(t, "")); n != 3 {
		t.Errorf("upstream calls: %d, want 3 (each reload goes upstream)", n)
	}
	if f := get(client, "GET", url, "Cache-Control: max-age=5"); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("Cache-Control: max-age=5 on a copy under a second old: Cache-Status %q, want a hit", f.cacheStatus())
	}

	// A reload that arrives while a request for its key is in flight joins it.
	held := url + "?hold=1"
	before := up.PathCalls(pathFor(t, ""))
	leader := make(chan fetched, 1)
	go func() { leader <- get(client, "GET", held) }()
	if !waitFor(5*time.Second, func() bool { return up.PathCalls(pathFor(t, "")) == before+1 }) {
		t.Fatal("the leader's request never reached the upstream")
	}
	reload := make(chan fetched, 1)
	go func() { reload <- get(client, "GET", held, "Cache-Control: max-age=0") }()
	if !waitFor(5*time.Second, func() bool { return followersWaiting(t, client, pathFor(t, "")) == 1 }) {
		t.Fatal("the reload did not join the flight in progress")
	}
	close(release)
	if f := <-leader; f.status != 200 || f.body != "answer" {
		t.Errorf("leader: %d %q", f.status, f.body)
	}
	if f := <-reload; f.status != 200 || f.body != "answer" || !strings.Contains(f.cacheStatus(), "collapsed") {
		t.Errorf("reload: %d %q, Cache-Status %q; want the flight's answer, collapsed", f.status, f.body, f.cacheStatus())
	}
	if n := up.PathCalls(pathFor(t, "")); n != before+1 {
		t.Errorf("upstream calls for the flight: %d, want 1", n-before)
	}
}

// held is an upstream handler's gate: requests with ?hold=1 wait until
// open is called (or their request ends).
type held struct {
	once sync.Once
	ch   chan struct{}
}

func newHeld() *held { return &held{ch: make(chan struct{})} }

func (h *held) open() { h.once.Do(func() { close(h.ch) }) }

// wait blocks r while it asks to be held; false when r went away.
func (h *held) wait(r *http.Request) bool {
	if r.URL.Query().Get("hold") == "" {
		return true
	}
	select {
	case <-h.ch:
		return true
	case <-r.Context().Done():
		return false
	}
}

// holdHerd sends the leader (the first of clients) to url, waits until it
// reached the upstream, sends the others and waits until they all wait for
// the leader's flight, then lets the upstream answer. It returns what each
// client got.
func holdHerd(t *testing.T, client *http.Client, up *upstream, gate *held, url string, clients [][]string) []fetched {
	t.Helper()
	path := strings.TrimPrefix(strings.SplitN(url, "?", 2)[0], baseURL)
	before := up.PathCalls(path)
	out := make([]fetched, len(clients))
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); out[0] = get(client, "GET", url, clients[0]...) }()
	if !waitFor(5*time.Second, func() bool { return up.PathCalls(path) == before+1 }) {
		gate.open()
		t.Fatal("the leader's request never reached the upstream")
	}
	for i := 1; i < len(clients); i++ {
		wg.Add(1)
		go func() { defer wg.Done(); out[i] = get(client, "GET", url, clients[i]...) }()
	}
	if !waitFor(5*time.Second, func() bool { return followersWaiting(t, client, path) == len(clients)-1 }) {
		gate.open()
		t.Fatalf("the followers did not join the flight (waiting: %d)", followersWaiting(t, client, path))
	}
	gate.open()
	wg.Wait()
	return out
}

// Under `public`, Authorization is not part of the key; RFC 9111 §3.5 lets
// a shared cache reuse the response to a request that carries it only
// when the response says public, s-maxage or must-revalidate.
func TestPublicSharesAnAuthorizedResponseOnlyWhenItSaysSo(t *testing.T) {
	gate := newHeld()
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if !gate.wait(r) {
			return
		}
		if strings.HasSuffix(r.URL.Path, "/says-public") {
			w.Header().Set("Cache-Control", "public, max-age=60")
		}
		_, _ = fmt.Fprint(w, "for "+r.Header.Get("Authorization"))
	})
	startCaddy(t, site("public\n\t\tttl 1s"), up)
	client := newClient(t)
	plain := pathFor(t, "/plain")

	// A response to alice that does not say it may be shared is alice's
	// alone: everybody who waited for it goes upstream on their own.
	clients := [][]string{{"Authorization: Bearer alice"}, {"Authorization: Bearer bob"}, {"Authorization: Bearer alice"}, {}, {"Cookie: sid=carol"}}
	got := holdHerd(t, client, up, gate, baseURL+plain+"?hold=1", clients)
	for i, f := range got {
		auth := ""
		if len(clients[i]) > 0 && strings.HasPrefix(clients[i][0], "Authorization: ") {
			auth = strings.TrimPrefix(clients[i][0], "Authorization: ")
		}
		if f.status != 200 || f.body != "for "+auth {
			t.Errorf("client %d (%v): %d %q (Cache-Status %q), want its own answer %q", i, clients[i], f.status, f.body, f.cacheStatus(), "for "+auth)
		}
		if i > 0 && strings.Contains(f.cacheStatus(), "collapsed") {
			t.Errorf("client %d received the leader's response: Cache-Status %q", i, f.cacheStatus())
		}
	}
	if n := up.PathCalls(plain); n != len(clients) {
		t.Errorf("upstream calls: %d, want %d (one each)", n, len(clients))
	}
	// The next requests with Authorization go upstream alone at once.
	if f := get(client, "GET", baseURL+plain+"?hold=1", "Authorization: Bearer dave"); f.body != "for Bearer dave" || !strings.Contains(f.cacheStatus(), "authorization") {
		t.Errorf("dave: %q, Cache-Status %q; want his own answer, sent alone for authorization", f.body, f.cacheStatus())
	}
	// Nothing of alice's or dave's was stored: an anonymous request gets
	// its own.
	if f := get(client, "GET", baseURL+plain+"?hold=1"); f.body != "for " || strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("anonymous request after alice's: %q (Cache-Status %q)", f.body, f.cacheStatus())
	}
	// A copy stored for a request without Authorization answers one with it.
	anon := pathFor(t, "/anonymous")
	if f := get(client, "GET", baseURL+anon); !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("anonymous answer: Cache-Status %q, want stored", f.cacheStatus())
	}
	if f := get(client, "GET", baseURL+anon, "Authorization: Bearer erin"); f.body != "for " || !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("erin after the anonymous answer: %q, Cache-Status %q; want the stored public copy", f.body, f.cacheStatus())
	}

	// A response that says public is shared with and stored for everybody.
	gate = newHeld()
	says := pathFor(t, "/says-public")
	got = holdHerd(t, client, up, gate, baseURL+says+"?hold=1", [][]string{{"Authorization: Bearer alice"}, {"Authorization: Bearer bob"}, {}})
	for i, f := range got {
		if f.status != 200 || f.body != "for Bearer alice" {
			t.Errorf("client %d: %d %q, want the shared public answer", i, f.status, f.body)
		}
	}
	if n := up.PathCalls(says); n != 1 {
		t.Errorf("upstream calls for a public answer: %d, want 1", n)
	}
	if f := get(client, "GET", baseURL+says+"?hold=1"); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("after a stored public answer: Cache-Status %q, want a hit", f.cacheStatus())
	}
}

// Freshness per RFC 9111 §4.2: responses that arrive stale are not stored,
// whatever the configured ttl.
func TestResponsesThatArriveStaleAreNeverStored(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		now := time.Now().UTC()
		switch path.Base(r.URL.Path) {
		case "expires-zero":
			h.Set("Expires", "0")
		case "expires-invalid":
			h.Set("Expires", "next tuesday")
		case "expires-at-date":
			h.Set("Date", now.Format(http.TimeFormat))
			h.Set("Expires", now.Format(http.TimeFormat))
		case "expires-past":
			h.Set("Date", now.Format(http.TimeFormat))
			h.Set("Expires", now.Add(-time.Hour).Format(http.TimeFormat))
		case "aged":
			h.Set("Cache-Control", "max-age=60")
			h.Set("Age", "120")
		case "revalidate":
			h.Set("Cache-Control", "s-maxage=60, must-revalidate")
			h.Set("Age", "3600")
		case "expires-future":
			h.Set("Date", now.Format(http.TimeFormat))
			h.Set("Expires", now.Add(time.Minute).Format(http.TimeFormat))
		}
		_, _ = fmt.Fprint(w, "answer")
	})
	startCaddy(t, site("ttl 1s\n\t\tstale 1s"), up)
	client := newClient(t)
	for _, name := range []string{"expires-zero", "expires-invalid", "expires-at-date", "expires-past", "aged", "revalidate"} {
		p := pathFor(t, "/"+name)
		for i := range 3 {
			f := get(client, "GET", baseURL+p)
			if f.status != 200 || strings.Contains(f.cacheStatus(), "stored") || strings.Contains(f.cacheStatus(), "hit") {
				t.Errorf("%s, request %d: %d, Cache-Status %q; a response that arrived stale was stored or served from the cache", name, i, f.status, f.cacheStatus())
			}
		}
		if n := up.PathCalls(p); n != 3 {
			t.Errorf("%s: upstream calls %d, want 3", name, n)
		}
	}
	p := pathFor(t, "/expires-future")
	get(client, "GET", baseURL+p)
	if f := get(client, "GET", baseURL+p); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("Expires a minute after Date: Cache-Status %q, want a hit", f.cacheStatus())
	}
}

// The ttl is cut to the freshness the origin left: a response with
// max-age=1 that took 600 ms to arrive is fresh for 400 ms at most.
func TestTTLIsCutToTheFreshnessLeft(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(600 * time.Millisecond)
		w.Header().Set("Cache-Control", "max-age=1")
		_, _ = fmt.Fprint(w, "answer")
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	f := get(client, "GET", url)
	answered := time.Now()
	if f.status != 200 {
		t.Fatalf("first request: %d %v", f.status, f.err)
	}
	time.Sleep(500*time.Millisecond - time.Since(answered))
	if f := get(client, "GET", url); strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("500 ms after a max-age=1 response that took 600 ms: Cache-Status %q, want no fresh hit", f.cacheStatus())
	}
}

// stale counts from the origin's expiry, not from the end of the ttl: a
// copy the origin still calls fresh is served at once while one refresh
// runs.
func TestStaleCountsFromTheOriginsExpiry(t *testing.T) {
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Cache-Control", "max-age=60")
		_, _ = fmt.Fprint(w, "answer")
	})
	startCaddy(t, site("ttl 100ms\n\t\tstale 500ms"), up)
	client := newClient(t)
	url := baseURL + pathFor(t, "")
	if f := get(client, "GET", url); !strings.Contains(f.cacheStatus(), "stored") {
		t.Fatalf("first request: Cache-Status %q, want stored", f.cacheStatus())
	}
	time.Sleep(1200 * time.Millisecond) // past ttl + stale
	if f := get(client, "GET", url); f.body != "answer" || !strings.Contains(f.cacheStatus(), "fwd=stale") {
		t.Errorf("1.2 s after a max-age=60 answer: %q, Cache-Status %q; want the copy, served while one refresh runs", f.body, f.cacheStatus())
	}
}

// itemsAPI is the React page's API: a list at /<prefix>/items whose
// version a write changes, answered per Cookie identity. A GET with
// ?hold=1 reads the version when it arrives and answers when the gate
// opens.
type itemsAPI struct {
	version atomic.Int64
	gate    *held
}

func (a *itemsAPI) serve(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		v := a.version.Load()
		if !a.gate.wait(r) {
			return
		}
		_, _ = fmt.Fprintf(w, "%s v%d for %s", r.URL.RequestURI(), v, r.Header.Get("Cookie"))
	default:
		if r.URL.Query().Get("fail") != "" {
			http.Error(w, "no such item", http.StatusNotFound)
			return
		}
		a.version.Add(1)
		w.WriteHeader(http.StatusNoContent)
	}
}

// After a successful write to an item, the list it belongs to is read from
// the upstream again, for every identity, every query and whatever the
// stale window (RFC 9111 §4.4).
func TestWriteInvalidatesEveryStoredCopyOfItsList(t *testing.T) {
	for name, options := range map[string]string{"ttl": "ttl 1s", "stale": "ttl 100ms\n\t\tstale 10s"} {
		t.Run(name, func(t *testing.T) {
			api := &itemsAPI{gate: newHeld()}
			up := newUpstream(t, api.serve)
			startCaddy(t, site(options), up)
			client := newClient(t)
			list := baseURL + pathFor(t, "/items")
			reads := []struct {
				url    string
				cookie string
			}{{list, "sid=alice"}, {list, "sid=bob"}, {list + "?page=2", "sid=alice"}}
			for _, rd := range reads {
				if f := get(client, "GET", rd.url, "Cookie: "+rd.cookie); !strings.Contains(f.cacheStatus(), "stored") {
					t.Fatalf("GET %s (%s): Cache-Status %q, want stored", rd.url, rd.cookie, f.cacheStatus())
				}
				if f := get(client, "GET", rd.url, "Cookie: "+rd.cookie); !strings.Contains(f.cacheStatus(), "hit") {
					t.Fatalf("GET %s (%s) again: Cache-Status %q, want a hit", rd.url, rd.cookie, f.cacheStatus())
				}
			}
			if name == "stale" {
				time.Sleep(200 * time.Millisecond) // every copy past its ttl, within stale
			}
			calls := up.Calls()

			if f := get(client, "DELETE", list+"/7", "Cookie: sid=alice"); f.status != http.StatusNoContent {
				t.Fatalf("DELETE: %d %v", f.status, f.err)
			}
			for _, rd := range reads {
				f := get(client, "GET", rd.url, "Cookie: "+rd.cookie)
				want := fmt.Sprintf("%s v1 for %s", strings.TrimPrefix(rd.url, baseURL), rd.cookie)
				if f.body != want || strings.Contains(f.cacheStatus(), "hit") {
					t.Errorf("GET %s (%s) after the DELETE: %q, Cache-Status %q; want %q from the upstream", rd.url, rd.cookie, f.body, f.cacheStatus(), want)
				}
			}
			// (Under stale, a hit may have started a refresh.)
			if n := up.Calls() - calls; name == "ttl" && n != 1+int64(len(reads)) {
				t.Errorf("upstream calls after the DELETE: %d, want %d", n, 1+len(reads))
			}

			// A write the upstream refused changes nothing.
			if f := get(client, "DELETE", list+"/8?fail=1"); f.status != http.StatusNotFound {
				t.Fatalf("failing DELETE: %d", f.status)
			}
			if f := get(client, "GET", list, "Cookie: sid=alice"); !strings.Contains(f.cacheStatus(), "hit") {
				t.Errorf("after a refused DELETE: Cache-Status %q, want a hit", f.cacheStatus())
			}
			// Every unsafe method; the item itself is invalidated too.
			for _, method := range []string{"POST", "PUT", "PATCH", "DELETE"} {
				get(client, "GET", list+"/7", "Cookie: sid=bob")
				get(client, "GET", list, "Cookie: sid=bob")
				v := api.version.Load()
				if f := get(client, method, list+"/7"); f.status != http.StatusNoContent {
					t.Fatalf("%s: %d", method, f.status)
				}
				for _, u := range []string{list + "/7", list} {
					if f := get(client, "GET", u, "Cookie: sid=bob"); !strings.Contains(f.body, fmt.Sprintf(" v%d ", v+1)) {
						t.Errorf("GET %s after %s: %q (Cache-Status %q), want version %d", u, method, f.body, f.cacheStatus(), v+1)
					}
				}
			}
		})
	}
}

// A GET that went upstream before a write finished may carry the old list:
// its answer reaches its clients but is not stored.
func TestReadThatBeganBeforeAWriteIsNotStored(t *testing.T) {
	api := &itemsAPI{gate: newHeld()}
	up := newUpstream(t, api.serve)
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	list := baseURL + pathFor(t, "/items")

	read := make(chan fetched, 1)
	go func() { read <- get(client, "GET", list+"?hold=1") }()
	if !waitFor(5*time.Second, func() bool { return up.PathCalls(pathFor(t, "/items")) == 1 }) {
		api.gate.open()
		t.Fatal("the read never reached the upstream")
	}
	if f := get(client, "DELETE", list+"/7"); f.status != http.StatusNoContent {
		t.Fatalf("DELETE: %d", f.status)
	}
	api.gate.open()
	if f := <-read; !strings.Contains(f.body, " v0 ") || strings.Contains(f.cacheStatus(), "stored") {
		t.Errorf("the read that began before the write: %q, Cache-Status %q; want v0, not stored", f.body, f.cacheStatus())
	}
	if f := get(client, "GET", list+"?hold=1"); !strings.Contains(f.body, " v1 ") {
		t.Errorf("the next read: %q (Cache-Status %q), want v1", f.body, f.cacheStatus())
	}
}

// A full micro-cache stores a response only for a key asked for before (or
// by a herd), so one-off keys never push out what is asked for again; a
// hot key still collapses and is stored at once.
func TestFullCacheStoresOnlyKeysAskedForBefore(t *testing.T) {
	gate := newHeld()
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		if !gate.wait(r) {
			return
		}
		_, _ = fmt.Fprint(w, "answer "+r.URL.Path)
	})
	startCaddy(t, site("ttl 1s\n\t\tmax_entries 16"), up)
	client := newClient(t)
	for i := range 200 {
		if f := get(client, "GET", baseURL+pathFor(t, fmt.Sprintf("/fill/%d", i))); f.status != 200 {
			t.Fatalf("fill %d: %d %v", i, f.status, f.err)
		}
	}
	once := baseURL + pathFor(t, "/new")
	if f := get(client, "GET", once); strings.Contains(f.cacheStatus(), "stored") {
		t.Errorf("a new key's first miss in a full cache: Cache-Status %q, want not stored", f.cacheStatus())
	}
	if f := get(client, "GET", once); !strings.Contains(f.cacheStatus(), "stored") {
		t.Errorf("its second miss: Cache-Status %q, want stored", f.cacheStatus())
	}
	if f := get(client, "GET", once); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("its third request: Cache-Status %q, want a hit", f.cacheStatus())
	}

	hot := pathFor(t, "/hot")
	got := holdHerd(t, client, up, gate, baseURL+hot+"?hold=1", make([][]string, 20))
	expectAll(t, got, http.StatusOK, "answer "+hot)
	if n := up.PathCalls(hot); n != 1 {
		t.Errorf("upstream calls for a hot key's herd: %d, want 1", n)
	}
	if !strings.Contains(got[0].cacheStatus(), "stored") {
		t.Errorf("the herd's leader: Cache-Status %q, want stored", got[0].cacheStatus())
	}
	if f := get(client, "GET", baseURL+hot+"?hold=1"); !strings.Contains(f.cacheStatus(), "hit") {
		t.Errorf("after the herd: Cache-Status %q, want a hit", f.cacheStatus())
	}
}
