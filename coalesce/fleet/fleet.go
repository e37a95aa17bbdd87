// Package fleet is the shared tier of a fleet of coalescing servers: on
// Redis (or Valkey) it holds one lock and one entry per key, so that one
// server's leader goes upstream for the whole fleet and the others are woken
// with its answer, and it tallies upstream failures fleet-wide so that one
// server's breaker trip opens every server's.
//
// Every operation is bounded by a timeout; an error, a timeout, or the
// tier's own breaker being open is reported to the caller, who then acts
// alone. Nothing here ever waits on Redis longer than that, except a
// follower waiting for its fleet leader, which is bounded by its caller.
//
// Values are opaque bytes: what may be stored, and how it is encoded, is
// the caller's business. Keys are given already hashed.
package fleet

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// Errors the operations return besides Redis's own.
var (
	// ErrDown: the tier's breaker is open; the caller acts alone.
	ErrDown = errors.New("fleet: shared tier down")
	// ErrNoEntry: the fleet leader finished without an entry to share (or
	// left its lock to expire); the caller goes upstream itself.
	ErrNoEntry = errors.New("fleet: the fleet leader left no entry")
	// ErrWaitTimeout: the fleet leader did not answer in time.
	ErrWaitTimeout = errors.New("fleet: timed out waiting for the fleet leader")
)

// Tier is a connection to the fleet's Redis. Its methods are safe for
// concurrent use.
type Tier struct {
	rdb      *redis.Client
	ps       *redis.PubSub
	cb       *gobreaker.CircuitBreaker[any]
	timeout  time.Duration
	ns       string // prefix + zone: starts the keys of entries and locks
	flights  string // the zone's channel: "<key>:e" (entry written) or "<key>:x" (none)
	breakers string // the prefix's channel: "<until ms> <upstream>"
	bns      string // starts the keys of the breakers' tallies
	opts     Options

	mu      sync.Mutex
	waiters map[string][]chan bool // per key: woken with true when an entry was written

	// listening: the subscription is confirmed on the current connection;
	// while it is not, nobody waits for a fleet leader.
	listening atomic.Bool
	done      chan struct{}
	loopDone  chan struct{}
	closeOnce sync.Once

	stats counters
}

type counters struct {
	errors, sharedHits, won, lost, waits, waitTimeouts, breakerTrips atomic.Uint64
}

// Stats count what the tier did since it was opened.
type Stats struct {
	State State `json:"state"`
	// Listening: subscribed to the fleet's wake-ups.
	Listening bool `json:"listening"`
	// Errors: Redis operations that failed or timed out.
	Errors uint64 `json:"redis_errors"`
	// SharedHits: fresh entries found in Redis and served.
	SharedHits uint64 `json:"shared_hits"`
	// LeadershipsWon and LeadershipsLost: lock attempts that made this
	// server the fleet leader of a key, or found another one.
	LeadershipsWon  uint64 `json:"leaderships_won"`
	LeadershipsLost uint64 `json:"leaderships_lost"`
	// Waits and WaitTimeouts: waits for another server's fleet leader, and
	// those that ran out of time.
	Waits        uint64 `json:"fleet_waits"`
	WaitTimeouts uint64 `json:"fleet_wait_timeouts"`
	// BreakerTrips: fleet-wide breaker openings this server published.
	BreakerTrips uint64 `json:"breaker_trips"`
}

// Open connects to Redis as opts say. It does not wait for Redis: a tier
// whose Redis is down works (every caller acts alone) and comes up when
// Redis does. Close it.
func Open(opts Options) (*Tier, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	ro, err := ParseURL(opts.URL)
	if err != nil {
		return nil, err
	}
	ro.DialTimeout = opts.Timeout
	ro.ReadTimeout = opts.Timeout
	ro.WriteTimeout = opts.Timeout
	ro.ContextTimeoutEnabled = true
	ro.MaxRetries = -1 // acting alone beats retrying
	ro.DisableIdentity = true
	ro.DialerRetries = 1 // one dial per operation: a refused one means down
	ro.Protocol = 2
	t := &Tier{
		rdb:      redis.NewClient(ro),
		timeout:  opts.Timeout,
		ns:       opts.Prefix + opts.Zone + ":",
		bns:      opts.Prefix + "breaker:",
		opts:     opts,
		waiters:  map[string][]chan bool{},
		done:     make(chan struct{}),
		loopDone: make(chan struct{}),
	}
	t.flights = t.ns + "wake"
	t.breakers = opts.Prefix + "breakers"
	t.cb = gobreaker.NewCircuitBreaker[any](gobreaker.Settings{
		Name:        "redis",
		MaxRequests: 1,
		Timeout:     downFor,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= tripAfter },
		IsSuccessful: func(err error) bool {
			return err == nil || errors.Is(err, redis.Nil)
		},
		OnStateChange: func(_ string, _, to gobreaker.State) {
			if opts.OnState != nil {
				opts.OnState(stateOf(to), nil)
			}
		},
	})
	// The subscription is made by the loop, on a connection of its own.
	t.ps = t.rdb.Subscribe(context.Background())
	go t.listen()
	return t, nil
}

// Close closes the connections and ends the tier's goroutine. Waiting
// followers are woken and go upstream.
func (t *Tier) Close() error {
	var err error
	t.closeOnce.Do(func() {
		close(t.done)
		err = t.ps.Close()
		<-t.loopDone
		if e := t.rdb.Close(); err == nil {
			err = e
		}
	})
	return err
}

// Stats returns the tier's counts.
func (t *Tier) Stats() Stats {
	return Stats{
		State: t.State(), Listening: t.listening.Load(),
		Errors: t.stats.errors.Load(), SharedHits: t.stats.sharedHits.Load(),
		LeadershipsWon: t.stats.won.Load(), LeadershipsLost: t.stats.lost.Load(),
		Waits: t.stats.waits.Load(), WaitTimeouts: t.stats.waitTimeouts.Load(),
		BreakerTrips: t.stats.breakerTrips.Load(),
	}
}

// CountSharedHit counts an entry found in Redis that answered a request.
func (t *Tier) CountSharedHit() { t.stats.sharedHits.Add(1) }
