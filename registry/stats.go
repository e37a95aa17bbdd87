package registry

import "time"

// What a registry tells about itself: its counters, and the flights in
// progress.

// Stats are a registry's counters. Counters only grow; ActiveKeys and
// Waiters are the state now.
type Stats struct {
	ActiveKeys      int64         `json:"active_keys"`
	Waiters         int64         `json:"waiters"`
	Flights         uint64        `json:"flights"`   // flights started (leaders)
	Collapsed       uint64        `json:"collapsed"` // joins that became followers
	Rejected        uint64        `json:"rejected"`  // joins refused because a bound was reached
	TimedOut        uint64        `json:"timed_out"` // followers that gave up after maxWait
	Abandoned       uint64        `json:"abandoned"` // flights cancelled because every client left first
	Published       uint64        `json:"published"`
	AverageLifetime time.Duration `json:"average_lifetime_ns"`
	MaxLifetime     time.Duration `json:"max_lifetime_ns"`
}

// Joined is the number of Join calls that were not rejected.
func (s Stats) Joined() uint64 { return s.Flights + s.Collapsed }

// Stats returns a snapshot of the counters. Fields are read one by one, so a
// snapshot taken under load is not atomic as a whole.
func (r *Registry[V]) Stats() Stats {
	s := Stats{
		ActiveKeys:  r.flights.Load(),
		Waiters:     r.followers.Load(),
		Flights:     r.led.Load(),
		Collapsed:   r.collapsed.Load(),
		Rejected:    r.rejected.Load(),
		TimedOut:    r.timedOut.Load(),
		Abandoned:   r.abandoned.Load(),
		Published:   r.published.Load(),
		MaxLifetime: time.Duration(r.maxLifeNS.Load()),
	}
	if s.Published > 0 {
		s.AverageLifetime = time.Duration(r.lifetimeNS.Load() / s.Published)
	}
	return s
}

// FlightInfo describes one flight for inspection.
type FlightInfo struct {
	Key     string
	Note    any // as given to Join or Lead
	Started time.Time
	Waiters int
	// Clients is how many clients the flight still answers: the leader's,
	// until it goes away, and the waiting followers. When it reaches 0 the
	// flight is cancelled.
	Clients int
}

// Inflight calls fn for up to limit flights in progress (limit <= 0: all).
// fn runs under a shard lock and must not call back into the registry.
func (r *Registry[V]) Inflight(limit int, fn func(FlightInfo)) {
	n := 0
	for i := range r.shards {
		s := &r.shards[i]
		s.mu.Lock()
		for _, f := range s.flights {
			if limit > 0 && n >= limit {
				s.mu.Unlock()
				return
			}
			fn(FlightInfo{Key: f.key, Note: f.note, Started: f.started, Waiters: f.Waiters(), Clients: int(f.clients.Load())})
			n++
		}
		s.mu.Unlock()
	}
}
