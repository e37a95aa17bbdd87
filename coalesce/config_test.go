package coalesce

import (
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestZeroConfigMeansTheDocumentedDefaults(t *testing.T) {
	got := Config{}.WithDefaults()
	want := Config{
		TTL:             50 * time.Millisecond,
		MaxWait:         10 * time.Second,
		MaxBody:         1 << 20,
		MaxEntries:      10_000,
		MaxMemory:       64 << 20,
		MaxFlightMemory: 64 << 20,
		HitForMiss:      5 * time.Second,
		MaxFlights:      100_000,
		Breaker: BreakerConfig{
			Failures:    5,
			MinRequests: 20,
			Window:      30 * time.Second,
			Open:        10 * time.Second,
			Probes:      1,
			Statuses:    []int{502, 503, 504},
			Timeout:     30 * time.Second,
		},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Config{}.WithDefaults() = %+v, want %+v", got, want)
	}
	if !reflect.DeepEqual(DefaultConfig(), got) {
		t.Errorf("DefaultConfig() = %+v, want what Config{} resolves to, %+v", DefaultConfig(), got)
	}
	if err := (Config{}).Validate(); err != nil {
		t.Errorf("Config{}.Validate: %v", err)
	}
	if again := got.WithDefaults(); !reflect.DeepEqual(again, got) {
		t.Errorf("WithDefaults twice = %+v, want %+v", again, got)
	}
}

func TestOffStaysOffAndOtherValuesStay(t *testing.T) {
	c := Config{TTL: Off, MaxWait: -time.Second, HitForMiss: Off, Stale: time.Second, MaxEntries: 7}.WithDefaults()
	if c.TTL >= 0 || c.MaxWait >= 0 || c.HitForMiss >= 0 {
		t.Errorf("Off became a default: ttl %s, max_wait %s, hit_for_miss %s", c.TTL, c.MaxWait, c.HitForMiss)
	}
	if c.Stale != time.Second || c.MaxEntries != 7 {
		t.Errorf("set values changed: stale %s, max_entries %d", c.Stale, c.MaxEntries)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Off is valid for ttl, max_wait and hit_for_miss: %v", err)
	}
	for name, bad := range map[string]Config{
		"stale":          {Stale: -time.Second},
		"stale_if_error": {StaleIfError: Off},
	} {
		if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), name+" must not be negative") {
			t.Errorf("negative %s: got %v, want it refused (0 is off)", name, err)
		}
	}
}

func TestZeroBreakerConfigTripsOnFailuresUnlessARatioIsSet(t *testing.T) {
	if c := (BreakerConfig{Ratio: 0.5}).WithDefaults(); c.Failures != 0 || c.MinRequests != 20 || c.Window != 30*time.Second {
		t.Errorf("a ratio alone: %+v, want no consecutive-failure trip, min 20, window 30s", c)
	}
	if c := (BreakerConfig{Ratio: 0.5, Failures: 3}).WithDefaults(); c.Failures != 3 {
		t.Errorf("a ratio and failures: %+v, want both kept", c)
	}
	if !reflect.DeepEqual(DefaultBreakerConfig(), BreakerConfig{}.WithDefaults()) {
		t.Errorf("DefaultBreakerConfig() = %+v, want BreakerConfig{} resolved", DefaultBreakerConfig())
	}
}

func TestEngineFromAZeroConfigStoresWithTheDefaultTTL(t *testing.T) {
	e, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	if e.cfg.TTL != DefaultTTL || e.cfg.MaxWait != DefaultMaxWait {
		t.Errorf("engine of Config{}: ttl %s, max_wait %s; want %s, %s", e.cfg.TTL, e.cfg.MaxWait, DefaultTTL, DefaultMaxWait)
	}
	srv := newServer(t, e.Handler(numbered()))
	// Stored means fresh for a while: with ttl off (and no stale) nothing is.
	if r := get(t, srv, "/x"); r.body != "v1" || !strings.HasSuffix(r.cacheStatus(), "; stored") {
		t.Errorf("first GET: %q, Cache-Status %q; want v1 stored", r.body, r.cacheStatus())
	}
}
