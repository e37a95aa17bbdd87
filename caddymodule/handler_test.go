package caddymodule

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// The Caddyfile writes what the user wrote in the JSON form: a 0 that means
// "none" becomes a negative duration, an option left out stays out.
func TestCaddyfileWritesNoneAsANegativeDuration(t *testing.T) {
	checkAdapts(t, map[string]string{
		"coalesce":                                `{}`,
		"coalesce {\n ttl 0\n}":                   `{"ttl":-1}`,
		"coalesce {\n ttl 200ms\n}":               `{"ttl":200000000}`,
		"coalesce {\n max_wait 0\n}":              `{"max_wait":-1}`,
		"coalesce {\n hit_for_miss 0\n}":          `{"hit_for_miss":-1}`,
		"coalesce {\n stale 0\n}":                 `{}`,
		"coalesce {\n ttl 0\n stale 5s\n}":        `{"ttl":-1,"stale":5000000000}`,
		"coalesce {\n max_entries 5\n zone a\n}":  `{"max_entries":5,"zone":"a"}`,
		"coalesce {\n max_flight_memory 32MiB\n}": `{"max_flight_memory":33554432}`,
	})
}

func TestJSONZeroMeansTheDefaultAndNegativeMeansNone(t *testing.T) {
	for raw, want := range map[string]struct{ ttl, maxWait, hitForMiss time.Duration }{
		`{}`: {coalesce.DefaultTTL, coalesce.DefaultMaxWait, coalesce.DefaultHitForMiss},
		`{"ttl":0,"max_wait":"0s","hit_for_miss":0}`:       {coalesce.DefaultTTL, coalesce.DefaultMaxWait, coalesce.DefaultHitForMiss},
		`{"ttl":-1,"max_wait":"-1s","hit_for_miss":-1}`:    {-1, -time.Second, -1},
		`{"ttl":"1s","max_wait":"2s","hit_for_miss":"3s"}`: {time.Second, 2 * time.Second, 3 * time.Second},
	} {
		var h Handler
		if err := json.Unmarshal([]byte(raw), &h); err != nil {
			t.Fatal(err)
		}
		if err := h.Validate(); err != nil {
			t.Errorf("%s: %v", raw, err)
		}
		c := h.config().WithDefaults()
		if c.TTL != want.ttl || c.MaxWait != want.maxWait || c.HitForMiss != want.hitForMiss {
			t.Errorf("%s: ttl %s, max_wait %s, hit_for_miss %s; want %s, %s, %s", raw, c.TTL, c.MaxWait, c.HitForMiss, want.ttl, want.maxWait, want.hitForMiss)
		}
	}
	var h Handler
	if c := h.config().WithDefaults(); c.MaxBody != coalesce.DefaultMaxBody || c.MaxEntries != coalesce.DefaultMaxEntries || c.MaxMemory != coalesce.DefaultMaxMemory || c.MaxFlights != coalesce.DefaultMaxFlights || c.MaxFlightMemory != coalesce.DefaultMaxFlightMemory {
		t.Errorf("a bare handler: %+v, want the defaults", c)
	}
}

func TestHandlersShareStateOnlyUnderOneZone(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	provision := func(zone string) *Handler {
		h := &Handler{TTL: caddy.Duration(time.Second), Zone: zone}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = h.Cleanup() })
		return h
	}
	// Outside a server's routes (no route to find them by), equal handlers
	// without a zone still get a state each.
	a, b := provision(""), provision("")
	if a.poolKey == b.poolKey {
		t.Errorf("two handlers without a zone share the pool key %q", a.poolKey)
	}
	c, d := provision("one-api"), provision("one-api")
	if c.poolKey != d.poolKey {
		t.Errorf("two handlers of zone one-api hold %q and %q, want one state", c.poolKey, d.poolKey)
	}
}

// The placeholders report the request's decision; observed twice (a
// follower that then went upstream on its own), its last one.
func TestPlaceholdersReportTheLastDecision(t *testing.T) {
	repl := caddy.NewReplacer()
	if _, ok := repl.Get("http.coalesce.status"); ok {
		t.Fatal("a fresh replacer knows http.coalesce.status")
	}
	var key coalesce.Key
	key[0] = 0xab
	setPlaceholders(repl, coalesce.Event{Outcome: coalesce.OutcomeCollapsed, Key: key, Waiters: 0, Detail: "first"})
	setPlaceholders(repl, coalesce.Event{Outcome: coalesce.OutcomeUncollapsible, Key: key, Waiters: 3, Detail: "vary-mismatch"})
	want := map[string]string{
		"http.coalesce.status":   "uncollapsible",
		"http.coalesce.key_hash": key.String(),
		"http.coalesce.waiters":  "3",
		"http.coalesce.detail":   "vary-mismatch",
	}
	for name, w := range want {
		if got, ok := repl.GetString(name); !ok || got != w {
			t.Errorf("%s = %q (known %t), want %q", name, got, ok, w)
		}
	}
	bypassed := caddy.NewReplacer()
	setPlaceholders(bypassed, coalesce.Event{Outcome: coalesce.OutcomeBypass})
	if got, ok := bypassed.GetString("http.coalesce.key_hash"); !ok || got != "" {
		t.Errorf("key_hash of a bypassed request: %q (known %t), want empty and known", got, ok)
	}
}

// checkAdapts checks that each Caddyfile input adapts to the handler JSON
// given for it.
func checkAdapts(t *testing.T, cases map[string]string) {
	t.Helper()
	for input, want := range cases {
		h, err := parseCoalesce(t, input)
		if err != nil {
			t.Fatalf("%q: %v", input, err)
		}
		got, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != want {
			t.Errorf("%q adapts to %s, want %s", input, got, want)
		}
	}
}
