package caddymodule

import (
	"sort"
	"sync"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
	"github.com/edge-coalesce/caddy-coalesce/coalesce/fanout"
)

// zones lists the engines that loaded configs hold, with the zone each
// serves, for the metrics collector and the admin API (which is rebuilt on
// every config load and is never a handler itself). Provision lists an
// engine, Cleanup unlists it. A reload provisions the new config before it
// cleans up the old one, so an engine whose pool key both configs share is
// held twice for a moment and stays listed; an engine only the old config
// held leaves the list when that config is cleaned up, even though requests
// of the old config may still finish against it.
var zones = struct {
	mu   sync.Mutex
	live map[string]*zoneEngine // by pool key
	// retired keeps the evictions of engines that left the list, by zone,
	// so that caddy_coalesce_cache_evictions_total never goes down.
	retired map[string]uint64
}{live: map[string]*zoneEngine{}, retired: map[string]uint64{}}

// zoneEngine is one listed engine.
type zoneEngine struct {
	zone       string
	engine     *coalesce.Engine
	maxEntries int
	maxBytes   int64
	holders    int
}

// defaultZone is the label of every handler configured without a zone
// (Caddyfile or JSON): their states are their own, but they report
// together, so that the labels stay bounded by the zone names the operator
// wrote however often the config changes.
const defaultZone = "default"

// zoneName is the zone a handler reports under: its zone, or defaultZone.
func zoneName(zone string) string {
	if zone == "" {
		return defaultZone
	}
	return zone
}

// listEngine records that one more handler holds the engine under poolKey.
func listEngine(poolKey, zone string, e *coalesce.Engine, cfg coalesce.Config) {
	zones.mu.Lock()
	defer zones.mu.Unlock()
	if z, ok := zones.live[poolKey]; ok {
		z.holders++
		return
	}
	zones.live[poolKey] = &zoneEngine{zone: zone, engine: e, maxEntries: cfg.MaxEntries, maxBytes: cfg.MaxMemory, holders: 1}
}

// unlistEngine drops one holder of the engine under poolKey; the last one
// out takes it off the list.
func unlistEngine(poolKey string) {
	zones.mu.Lock()
	defer zones.mu.Unlock()
	z, ok := zones.live[poolKey]
	if !ok {
		return
	}
	if z.holders--; z.holders > 0 {
		return
	}
	delete(zones.live, poolKey)
	zones.retired[z.zone] += z.engine.Stats().Cache.Evictions
}

// zoneSnapshot is the state of one zone now, summed over its engines.
type zoneSnapshot struct {
	Zone    string
	Engines []*coalesce.Engine
	Stats   coalesce.Stats
	// Budgets of the micro-caches, summed.
	MaxEntries int64
	MaxBytes   int64
	// RetiredEvictions are the evictions of engines no longer listed.
	RetiredEvictions uint64
}

// snapshotZones returns every zone with listed engines, or whose retired
// engines evicted entries, sorted by name.
func snapshotZones() []zoneSnapshot {
	zones.mu.Lock()
	byZone := map[string]*zoneSnapshot{}
	at := func(zone string) *zoneSnapshot {
		s, ok := byZone[zone]
		if !ok {
			s = &zoneSnapshot{Zone: zone}
			byZone[zone] = s
		}
		return s
	}
	for _, z := range zones.live {
		s := at(z.zone)
		s.Engines = append(s.Engines, z.engine)
		s.Stats = addStats(s.Stats, z.engine.Stats())
		s.MaxEntries += int64(z.maxEntries)
		s.MaxBytes += z.maxBytes
	}
	for zone, n := range zones.retired {
		at(zone).RetiredEvictions = n
	}
	zones.mu.Unlock()

	out := make([]zoneSnapshot, 0, len(byZone))
	for _, s := range byZone {
		out = append(out, *s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Zone < out[j].Zone })
	return out
}

// addStats sums two engines' statistics: counters and gauges add up, the
// average lifetime is weighted by published flights, the maximum is the
// larger one.
func addStats(a, b coalesce.Stats) coalesce.Stats {
	ra, rb := a.Registry, b.Registry
	sum := ra
	sum.ActiveKeys += rb.ActiveKeys
	sum.Waiters += rb.Waiters
	sum.Flights += rb.Flights
	sum.Collapsed += rb.Collapsed
	sum.Rejected += rb.Rejected
	sum.TimedOut += rb.TimedOut
	sum.Abandoned += rb.Abandoned
	sum.Published += rb.Published
	if sum.Published > 0 {
		// In floating point: lifetime × count overflows int64 for a long-lived process.
		w := float64(ra.AverageLifetime)*float64(ra.Published) + float64(rb.AverageLifetime)*float64(rb.Published)
		sum.AverageLifetime = time.Duration(w / float64(sum.Published))
	}
	sum.MaxLifetime = max(ra.MaxLifetime, rb.MaxLifetime)
	return coalesce.Stats{
		Registry: sum,
		Cache: coalesce.CacheStats{
			Entries:    a.Cache.Entries + b.Cache.Entries,
			Bytes:      a.Cache.Bytes + b.Cache.Bytes,
			Evictions:  a.Cache.Evictions + b.Cache.Evictions,
			Unadmitted: a.Cache.Unadmitted + b.Cache.Unadmitted,
		},
		Uncollapsible: a.Uncollapsible + b.Uncollapsible,
		HotKeysBytes:  a.HotKeysBytes + b.HotKeysBytes,
		Streams: fanout.Stats{
			Streams:     a.Streams.Streams + b.Streams.Streams,
			Subscribers: a.Streams.Subscribers + b.Streams.Subscribers,
		},
		FlightBytes: a.FlightBytes + b.FlightBytes,
		Shared:      addShared(a.Shared, b.Shared),
	}
}

// addShared sums two engines' shared tiers: counts add up, the state is
// the worse one, listening only when both listen.
func addShared(a, b *coalesce.SharedStats) *coalesce.SharedStats {
	if a == nil || b == nil {
		if a == nil {
			return b
		}
		return a
	}
	sum := *a
	if tierStateValue(b.State) > tierStateValue(a.State) {
		sum.State = b.State
	}
	sum.Listening = a.Listening && b.Listening
	sum.Errors += b.Errors
	sum.SharedHits += b.SharedHits
	sum.LeadershipsWon += b.LeadershipsWon
	sum.LeadershipsLost += b.LeadershipsLost
	sum.Waits += b.Waits
	sum.WaitTimeouts += b.WaitTimeouts
	sum.BreakerTrips += b.BreakerTrips
	return &sum
}
