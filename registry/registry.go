// Package registry keeps track of in-flight requests by key so that concurrent
// identical requests can share one upstream call.
//
// The first client to Join a key becomes the leader of a new flight; clients
// that Join while the flight runs become its followers and Wait for the one
// result the leader Publishes. Unlike golang.org/x/sync/singleflight, a flight
// has its own context, detached from the leader's client: it is cancelled
// when every client (leader and followers) has gone, so the first client to
// disconnect never fails the others, or when the leader gives its work up
// (Cancel). Followers wait with a bound, and a
// registry holds a bounded number of flights.
//
// The package uses only the standard library.
package registry

import (
	"context"
	"errors"
	"hash/maphash"
	"sync"
	"sync/atomic"
	"time"
)

// ErrWaitTimeout is returned by Wait when the leader did not publish within
// the follower's bound.
var ErrWaitTimeout = errors.New("registry: timed out waiting for the leader")

// ErrAbandoned is what a flight's followers receive when the leader left
// without publishing (for example after a panic that Publish did not see).
var ErrAbandoned = errors.New("registry: the leader left without a result")

// Role says what a caller of Join has become.
type Role uint8

const (
	// Leader: the caller must do the work and Publish its result, then Leave.
	Leader Role = iota
	// Follower: the caller must Wait for the leader's result.
	Follower
	// Rejected: the registry is full; the caller goes its own way and must
	// not touch the returned flight (it is nil).
	Rejected
)

func (r Role) String() string {
	switch r {
	case Leader:
		return "leader"
	case Follower:
		return "follower"
	default:
		return "rejected"
	}
}

// Options bound a Registry. The zero value means the defaults below.
type Options struct {
	// MaxFlights is the largest number of keys in flight at once; a Join for
	// a new key beyond it is Rejected. Zero means 100 000.
	MaxFlights int
	// MaxFollowers is the largest number of followers of one flight; more are
	// Rejected. Zero means 100 000.
	MaxFollowers int
}

const shardCount = 32

// Registry is a set of flights keyed by string. It is safe for concurrent use.
type Registry[V any] struct {
	opts   Options
	seed   maphash.Seed
	shards [shardCount]shard[V]
	now    func() time.Time

	flights   atomic.Int64 // flights in the map now
	followers atomic.Int64 // followers waiting now

	led        atomic.Uint64
	collapsed  atomic.Uint64
	rejected   atomic.Uint64
	timedOut   atomic.Uint64
	abandoned  atomic.Uint64
	published  atomic.Uint64
	lifetimeNS atomic.Uint64 // sum over published flights
	maxLifeNS  atomic.Int64
}

type shard[V any] struct {
	mu      sync.Mutex
	flights map[string]*Flight[V]
}

// New returns an empty registry.
func New[V any](opts Options) *Registry[V] {
	if opts.MaxFlights <= 0 {
		opts.MaxFlights = 100_000
	}
	if opts.MaxFollowers <= 0 {
		opts.MaxFollowers = 100_000
	}
	r := &Registry[V]{opts: opts, seed: maphash.MakeSeed(), now: time.Now}
	for i := range r.shards {
		r.shards[i].flights = make(map[string]*Flight[V])
	}
	return r
}

// Join makes the caller the leader of a new flight for key, or a follower of
// the flight already running. ctx is the caller's own (client) context: when
// it ends, the caller stops counting as someone waiting for the flight. The
// leader's flight context (Context) keeps ctx's values but not its
// cancellation.
//
// A leader must call Publish once and Leave once; a follower must call Wait
// once. A Rejected caller gets a nil flight.
//
// note describes the flight for inspection (Inflight), e.g. the method and
// path of the request; the registry keeps it and never looks at it.
func (r *Registry[V]) Join(ctx context.Context, key string, note any) (*Flight[V], Role) {
	f, role := r.JoinUnwatched(ctx, key, note)
	if role == Leader {
		f.WatchLeader()
	}
	return f, role
}

// JoinUnwatched is Join for a leader whose work is usually over at once:
// its client's context is not watched until the leader calls WatchLeader
// (the watch costs a few allocations, most of them wasted on a request that
// ends within a millisecond). Until then the leader's client counts as
// waiting even if it has gone: its leaving ends the flight's context only
// from WatchLeader on, or at Leave.
func (r *Registry[V]) JoinUnwatched(ctx context.Context, key string, note any) (*Flight[V], Role) {
	s := r.shardFor(key)
	s.mu.Lock()
	if f, ok := s.flights[key]; ok {
		if r.follow(f) {
			s.mu.Unlock()
			return f, Follower
		}
		if f.clients.Load() > 0 {
			// Too many followers on this flight already.
			s.mu.Unlock()
			r.rejected.Add(1)
			return nil, Rejected
		}
		// Every client of f has gone and it is being cancelled; its leader
		// still has to publish, but nobody should wait for a cancelled
		// call. Replace it: f.remove checks that the entry is still f.
	} else if !r.reserveFlight() {
		s.mu.Unlock()
		r.rejected.Add(1)
		return nil, Rejected
	}
	f := r.newFlight(context.WithoutCancel(ctx), s, key, note)
	s.mu.Unlock()
	f.leaderCtx = ctx
	return f, Leader
}

// Follow makes the caller a follower of the flight running for key, as Join
// would; when none runs (or it takes no more followers) it returns nil and
// false and the caller is not counted anywhere. It lets a request that
// another kind of request can answer (a HEAD, by a GET) wait for one that is
// already in flight, without starting one of its own.
func (r *Registry[V]) Follow(key string) (*Flight[V], bool) {
	s := r.shardFor(key)
	s.mu.Lock()
	f, ok := s.flights[key]
	ok = ok && r.follow(f)
	s.mu.Unlock()
	if !ok {
		return nil, false
	}
	return f, true
}

// follow counts the caller as a follower of f, unless f takes no more (its
// followers are at MaxFollowers, or every client has gone). Called under the
// lock of f's shard.
func (r *Registry[V]) follow(f *Flight[V]) bool {
	if !f.addFollower(r.opts.MaxFollowers) {
		return false
	}
	if f.done == nil {
		f.done = make(chan struct{})
	}
	r.followers.Add(1)
	r.collapsed.Add(1)
	return true
}

// Lead makes the caller the leader of a new flight for key if none is
// running; otherwise it returns nil and false and the caller is not counted
// anywhere. It suits work done on nobody's behalf, such as a background
// refresh that must not run twice. Its Context ends when ctx does, also
// while followers wait: ctx is the bound of the work, and followers that
// keep joining must not keep it running past that.
func (r *Registry[V]) Lead(ctx context.Context, key string, note any) (*Flight[V], bool) {
	s := r.shardFor(key)
	s.mu.Lock()
	if _, ok := s.flights[key]; ok || !r.reserveFlight() {
		s.mu.Unlock()
		return nil, false
	}
	f := r.newFlight(ctx, s, key, note)
	s.mu.Unlock()
	f.leaderCtx = ctx
	f.WatchLeader()
	return f, true
}

// Running reports whether a flight for key is in flight now. By the time the
// caller acts the answer may be stale; it only lets a caller skip work that
// Lead would refuse anyway.
func (r *Registry[V]) Running(key string) bool {
	s := r.shardFor(key)
	s.mu.Lock()
	_, ok := s.flights[key]
	s.mu.Unlock()
	return ok
}

// newFlight creates a flight with its leader counted and puts it in s; the
// flight's context is a child of parent. Called under s.mu.
func (r *Registry[V]) newFlight(parent context.Context, s *shard[V], key string, note any) *Flight[V] {
	f := &Flight[V]{key: key, note: note, reg: r, shard: s, started: r.now()}
	f.ctx, f.cancel = context.WithCancelCause(parent)
	f.clients.Store(1)
	s.flights[key] = f
	r.led.Add(1)
	return f
}

// shardFor is the shard that holds key's flights.
func (r *Registry[V]) shardFor(key string) *shard[V] {
	return &r.shards[maphash.String(r.seed, key)%shardCount]
}

// reserveFlight counts one more flight unless MaxFlights is reached. Joins
// for new keys on different shards hold different locks, so a check followed
// by an Add would let several of them pass the bound together.
func (r *Registry[V]) reserveFlight() bool {
	for {
		n := r.flights.Load()
		if n >= int64(r.opts.MaxFlights) {
			return false
		}
		if r.flights.CompareAndSwap(n, n+1) {
			return true
		}
	}
}
