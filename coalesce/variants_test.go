package coalesce

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// langOrigin answers with Vary: Accept-Language, each language's requests
// held by a gate of their own until the test opens it.
type langOrigin struct {
	mu    sync.Mutex
	gates map[string]gate
	calls map[string]*atomic.Int64
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
