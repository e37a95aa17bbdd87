package coalesce

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
	"github.com/edge-coalesce/caddy-coalesce/internal/redistest"
)

// langOrigin answers with Vary: Accept-Language, each language's requests
// held by a gate of their own until the test opens it.
type langOrigin struct {
	mu    sync.Mutex
	gates map[string]gate
	calls map[string]*atomic.Int64
	// ServeHTTPWith names a request's gate and answer (default: its
	// Accept-Language).
	ServeHTTPWith func(r *http.Request) string
}

func newLangOrigin(t *testing.T, langs ...string) *langOrigin {
	o := &langOrigin{gates: map[string]gate{}, calls: map[string]*atomic.Int64{}}
	for _, l := range langs {
		o.gates[l], o.calls[l] = newGate(t), new(atomic.Int64)
	}
	return o
}

func (o *langOrigin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	lang := r.Header.Get("Accept-Language")
	if o.ServeHTTPWith != nil {
		lang = o.ServeHTTPWith(r)
	}
	o.mu.Lock()
	g, n := o.gates[lang], o.calls[lang]
	o.mu.Unlock()
	n.Add(1)
	g.wait(r)
	w.Header().Set("Vary", "Accept-Language")
	fmt.Fprintf(w, "lang=%s", lang)
}

// regate holds lang's next requests again.
func (o *langOrigin) regate(t *testing.T, lang string) gate {
	o.mu.Lock()
	defer o.mu.Unlock()
	g := newGate(t)
	o.gates[lang] = g
	return g
}

func (o *langOrigin) called(lang string) int64 { return o.calls[lang].Load() }

// Followers whose request differs from the leader's in a field its response
// varies on do not get it; instead of each going upstream alone, they
// gather in one flight of their own variant. Then the key remembers the
// field, and the next burst gathers by variant from the start: nobody waits
// for a response of another variant.
func TestVaryMismatchedFollowersGatherInAFlightOfTheirVariant(t *testing.T) {
	o := newLangOrigin(t, "en", "fr")
	e := newEngine(t, func(c *Config) { c.TTL = Off })
	srv := newServer(t, e.Handler(o))
	send := func(lang string) <-chan reply {
		return async(func() reply { return get(t, srv, "/list", "Accept-Language", lang) })
	}
	const followers = 5

	// The first burst: one leader for en, the fr requests follow it.
	en := send("en")
	waitFor(t, "the en leader upstream", func() bool { return o.called("en") == 1 })
	var fr []<-chan reply
	for range followers {
		fr = append(fr, send("fr"))
	}
	waitWaiters(t, e, followers)
	o.gates["en"].open()
	waitFor(t, "the fr flight gathered", func() bool { return o.called("fr") == 1 && e.Stats().Registry.Waiters == followers-1 })
	o.gates["fr"].open()
	if r := receive(t, en, "the en leader"); r.body != "lang=en" {
		t.Errorf("en leader: %q", r.body)
	}
	collapsed := 0
	for i, ch := range fr {
		r := receive(t, ch, fmt.Sprintf("fr %d", i))
		if r.body != "lang=fr" || !strings.Contains(r.cacheStatus(), "fwd=vary-miss") {
			t.Errorf("fr %d: %q, Cache-Status %q", i, r.body, r.cacheStatus())
		}
		if strings.Contains(r.cacheStatus(), "collapsed") {
			collapsed++
		}
	}
	if got := o.called("fr"); got != 1 || collapsed != followers-1 {
		t.Errorf("first burst: %d fr upstream requests and %d collapsed, want 1 and %d", got, collapsed, followers-1)
	}

	// The next burst: en is held upstream, fr goes on its own flight at once.
	enGate, frGate := o.regate(t, "en"), o.regate(t, "fr")
	en = send("en")
	waitFor(t, "the second en leader upstream", func() bool { return o.called("en") == 2 })
	fr = fr[:0]
	for range followers {
		fr = append(fr, send("fr"))
	}
	waitFor(t, "the fr burst upstream while en is held", func() bool {
		return o.called("fr") == 2 && e.Stats().Registry.Waiters == followers-1
	})
	// Both flights are listed under the key, as variants.
	listed := e.Inflight(0)
	if len(listed) != 2 || listed[0].Key != listed[1].Key || !listed[0].Variant || !listed[1].Variant {
		t.Errorf("in flight: %+v, want the en and fr flights, each a variant under one key", listed)
	}
	frGate.open()
	for i, ch := range fr {
		if r := receive(t, ch, fmt.Sprintf("second burst, fr %d", i)); r.body != "lang=fr" {
			t.Errorf("second burst, fr %d: %q", i, r.body)
		}
	}
	enGate.open()
	if r := receive(t, en, "the second en leader"); r.body != "lang=en" {
		t.Errorf("second en leader: %q", r.body)
	}
	if got := o.called("fr"); got != 2 {
		t.Errorf("fr upstream requests after two bursts: %d, want 2", got)
	}
}

// A request with Authorization under public whose key answers such requests
// one by one ("alone") never leads a variant's flight: its answer may be its
// requester's alone. The anonymous requests of its variant go upstream in a
// flight of their own, not behind it.
func TestAnAloneRequestNeverLeadsAVariantFlight(t *testing.T) {
	o := newLangOrigin(t, "en", "fr", "fr alice")
	o.ServeHTTPWith = aliceOrAnonymous
	e := newEngine(t, func(c *Config) { c.Public, c.TTL = true, Off })
	srv := newServer(t, e.Handler(o))
	alice := func() <-chan reply {
		return async(func() reply { return get(t, srv, "/p", "Accept-Language", "fr", "Authorization", "Bearer alice") })
	}
	// Her first answer (not public) teaches the key that hers go alone.
	o.gates["fr alice"].open()
	if r := receive(t, alice(), "alice's first"); !strings.Contains(r.cacheStatus(), "authorization") {
		t.Fatalf("alice's first: Cache-Status %q", r.cacheStatus())
	}
	held := o.regate(t, "fr alice")

	en := async(func() reply { return get(t, srv, "/p", "Accept-Language", "en") })
	waitFor(t, "the en leader upstream", func() bool { return o.called("en") == 1 })
	a := alice()
	waitWaiters(t, e, 1)
	o.gates["en"].open()
	receive(t, en, "en")
	waitFor(t, "alice upstream on her own", func() bool { return o.called("fr alice") == 2 })

	var fr []<-chan reply
	for range 3 {
		fr = append(fr, async(func() reply { return get(t, srv, "/p", "Accept-Language", "fr") }))
	}
	waitFor(t, "the anonymous fr flight upstream while alice is held", func() bool {
		return o.called("fr") == 1 && e.Stats().Registry.Waiters == 2
	})
	o.gates["fr"].open()
	for i, ch := range fr {
		if r := receive(t, ch, fmt.Sprintf("fr %d", i)); r.body != "lang=fr" {
			t.Errorf("fr %d: %q", i, r.body)
		}
	}
	held.open()
	if r := receive(t, a, "alice"); r.body != "lang=fr alice" || !strings.Contains(r.cacheStatus(), "vary-mismatch") {
		t.Errorf("alice: %q, Cache-Status %q, want her own answer, sent alone", r.body, r.cacheStatus())
	}
}

// With a shared tier, a variant's flight asks the fleet under its own key:
// it does not wait on another variant's fleet lock.
func TestVariantFlightsDoNotQueueOnEachOthersFleetLock(t *testing.T) {
	redis := redistest.Start(t)
	o := newLangOrigin(t, "en", "fr")
	e := newEngine(t, func(c *Config) {
		c.TTL = Off
		c.MaxWait = 20 * time.Second
		c.Shared = &fleet.Options{URL: redis.URL(), Zone: "z", Prefix: "test:", Timeout: time.Second}
	})
	srv := newServer(t, e.Handler(o))
	waitFor(t, "the tier listening", func() bool { return e.Stats().Shared.Listening })
	send := func(lang string) <-chan reply {
		return async(func() reply { return get(t, srv, "/list", "Accept-Language", lang) })
	}
	teachVary(t, e, o, srv, "/list")

	enGate, frGate := o.regate(t, "en"), o.regate(t, "fr")
	en := send("en")
	waitFor(t, "the second en leader upstream", func() bool { return o.called("en") == 2 })
	fr := send("fr")
	waitFor(t, "fr upstream while en is held", func() bool { return o.called("fr") == 2 })
	frGate.open()
	enGate.open()
	receive(t, en, "en")
	if r := receive(t, fr, "fr"); r.body != "lang=fr" {
		t.Errorf("fr: %q", r.body)
	}
}

// Expired fields are dropped when read, so that once none is left the
// common case (no key known to vary) takes no lock again.
func TestExpiredVariantFieldsLeaveTheCommonCaseLockFree(t *testing.T) {
	v := newVariants(100)
	now := time.Now()
	v.learn(keyN(1), []string{"Accept-Language"}, now.Add(time.Millisecond))
	if v.fields(keyN(1), now) == nil {
		t.Fatal("fresh fields not returned")
	}
	if v.fields(keyN(1), now.Add(time.Second)) != nil {
		t.Fatal("expired fields returned")
	}
	if n := v.n.Load(); n != 0 {
		t.Errorf("%d entries counted after the only one expired", n)
	}
}

// max_wait bounds a follower's whole wait: one that missed its leader's
// Vary waits in its variant's flight only for what is left.
func TestAVariantFollowerWaitsNoLongerThanMaxWaitInAll(t *testing.T) {
	o := newLangOrigin(t, "en", "fr")
	e := newEngine(t, func(c *Config) { c.TTL, c.MaxWait = Off, time.Second })
	srv := newServer(t, e.Handler(o))
	send := func(lang string) <-chan reply {
		return async(func() reply { return get(t, srv, "/list", "Accept-Language", lang) })
	}
	en := send("en")
	waitFor(t, "en upstream", func() bool { return o.called("en") == 1 })
	fr1, fr2 := send("fr"), send("fr")
	waitWaiters(t, e, 2)
	time.Sleep(700 * time.Millisecond) // most of max_wait spent waiting for en
	o.gates["en"].open()
	receive(t, en, "en")
	var r reply
	select { // the fr follower, while its variant's leader is held
	case r = <-fr1:
	case r = <-fr2:
	case <-time.After(5 * time.Second):
		t.Fatal("no fr answer")
	}
	o.gates["fr"].open()
	if r.status != http.StatusGatewayTimeout || r.took > 1500*time.Millisecond {
		t.Errorf("the fr follower: %d after %v, want 504 at about max_wait (1s) in all", r.status, r.took)
	}
}

// Once a key's responses are known to vary, a request with Authorization
// under public never leads its variant's flight, in any burst: it goes
// upstream alone, and the anonymous requests of its variant gather without
// it.
func TestUnderPublicAnAuthorizedRequestLeadsNoVariantFlight(t *testing.T) {
	o := newLangOrigin(t, "en", "fr", "fr alice")
	o.ServeHTTPWith = aliceOrAnonymous
	e := newEngine(t, func(c *Config) { c.Public, c.TTL = true, Off })
	srv := newServer(t, e.Handler(o))
	teachVary(t, e, o, srv, "/p")
	frGate := o.regate(t, "fr")

	alice := async(func() reply {
		return get(t, srv, "/p", "Accept-Language", "fr", "Authorization", "Bearer alice")
	})
	waitFor(t, "alice upstream", func() bool { return o.called("fr alice") == 1 })
	var anon []<-chan reply
	for range 3 {
		anon = append(anon, async(func() reply { return get(t, srv, "/p", "Accept-Language", "fr") }))
	}
	waitFor(t, "the anonymous fr flight upstream while alice is held", func() bool {
		return o.called("fr") == 2 && e.Stats().Registry.Waiters == 2
	})
	frGate.open()
	for i, ch := range anon {
		if r := receive(t, ch, fmt.Sprintf("fr %d", i)); r.body != "lang=fr" {
			t.Errorf("fr %d: %q", i, r.body)
		}
	}
	o.gates["fr alice"].open()
	if r := receive(t, alice, "alice"); r.body != "lang=fr alice" || !strings.Contains(r.cacheStatus(), "authorization") {
		t.Errorf("alice: %q, Cache-Status %q, want her own answer, sent alone", r.body, r.cacheStatus())
	}
}

// aliceOrAnonymous names a request's gate and answer by its language, and
// "alice" for one with Authorization.
func aliceOrAnonymous(r *http.Request) string {
	if r.Header.Get("Authorization") != "" {
		return r.Header.Get("Accept-Language") + " alice"
	}
	return r.Header.Get("Accept-Language")
}

// teachVary teaches e that path's responses vary on Accept-Language: an en
// leader, then one fr follower that misses its Vary. The en and fr gates of
// o are left open.
func teachVary(t *testing.T, e *Engine, o *langOrigin, srv *httptest.Server, path string) {
	t.Helper()
	en := async(func() reply { return get(t, srv, path, "Accept-Language", "en") })
	waitFor(t, "en upstream", func() bool { return o.called("en") == 1 })
	fr := async(func() reply { return get(t, srv, path, "Accept-Language", "fr") })
	waitWaiters(t, e, 1)
	o.gates["en"].open()
	o.gates["fr"].open()
	receive(t, en, "en")
	receive(t, fr, "fr")
}
