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

// Flight is one request in flight under a key.
type Flight[V any] struct {
	key     string
	note    any
	reg     *Registry[V]
	shard   *shard[V]
	started time.Time

	ctx    context.Context
	cancel context.CancelCauseFunc

	// clients counts the leader's client (until it leaves) and the
	// followers still waiting. It never goes up again once it has reached
	// zero: Join refuses such a flight and starts a new one.
	clients   atomic.Int32
	followers atomic.Int32

	// The watch on the leader's client context (leaderCtx), once
	// WatchLeader has set it; left: the leader has left, and no watch
	// starts any more.
	leaderCtx context.Context
	watchMu   sync.Mutex
	stopWatch func() bool
	left      bool

	publishOnce sync.Once
	// done is closed by Publish. It is made by the first follower, under
	// the shard's lock: a flight nobody joins (most) never needs one.
	// published says the same to whoever has no channel.
	done      chan struct{}
	published atomic.Bool
	val       V
	err       error
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

// WatchLeader ties the leader to its client's context: when the client
// goes away (or has gone already), the leader stops counting as one of the
// flight's clients. It does nothing after the first call, or once the
// leader has left. Safe to call from any goroutine.
func (f *Flight[V]) WatchLeader() {
	f.watchMu.Lock()
	if f.stopWatch == nil && !f.left {
		f.stopWatch = context.AfterFunc(f.leaderCtx, f.release)
	}
	f.watchMu.Unlock()
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

// addFollower counts one more follower unless the flight has been abandoned
// by all its clients or is full. Called under the shard lock.
func (f *Flight[V]) addFollower(max int) bool {
	if int(f.followers.Load()) >= max {
		return false
	}
	for {
		n := f.clients.Load()
		if n == 0 {
			return false
		}
		if f.clients.CompareAndSwap(n, n+1) {
			f.followers.Add(1)
			return true
		}
	}
}

// release drops one client; the last one out cancels the flight's context.
func (f *Flight[V]) release() {
	if f.clients.Add(-1) == 0 {
		published := f.published.Load()
		if !published {
			f.reg.abandoned.Add(1)
		}
		f.cancel(nil)
		if !published {
			f.remove() // Publish removes a published one
		}
	}
}

// remove deletes the flight from the registry if the entry is still this
// flight (a newer flight may have replaced an abandoned one).
func (f *Flight[V]) remove() {
	s := f.shard
	s.mu.Lock()
	if s.flights[f.key] == f {
		delete(s.flights, f.key)
		f.reg.flights.Add(-1)
	}
	s.mu.Unlock()
}

// Key is the key the flight was joined under.
func (f *Flight[V]) Key() string { return f.key }

// Started is when the leader joined.
func (f *Flight[V]) Started() time.Time { return f.started }

// Waiters is the number of followers waiting now.
func (f *Flight[V]) Waiters() int { return int(f.followers.Load()) }

// Context is the context for the leader's work: it carries the values of the
// leader's client context and is cancelled only when every client of the
// flight has gone (or after the flight is done and the leader has left), when
// the leader calls Cancel, or, for a flight started by Lead, when Lead's ctx
// ends.
func (f *Flight[V]) Context() context.Context { return f.ctx }

// Cancel ends the flight's context now, with cause as its context.Cause:
// the leader's work stops as if every client had gone, while the flight
// stays what it was (its followers wait for Publish, new callers join it).
// It lets a leader end work it has given up on, such as an upstream
// request past its deadline, without a context of its own for that.
func (f *Flight[V]) Cancel(cause error) { f.cancel(cause) }

// Publish hands the result to every follower and removes the flight from the
// registry, so that later Joins start afresh. Only the first call counts.
func (f *Flight[V]) Publish(v V, err error) {
	f.publishOnce.Do(func() {
		// Remove first: a Join that comes after a follower has been woken
		// must not join a finished flight.
		f.remove()
		f.val, f.err = v, err
		f.published.Store(true)
		// After remove, no follower can make done any more; remove's lock
		// shows this goroutine the one a follower made.
		if f.done != nil {
			close(f.done)
		}
		r := f.reg
		life := r.now().Sub(f.started)
		r.published.Add(1)
		r.lifetimeNS.Add(uint64(max(life, 0)))
		for {
			m := r.maxLifeNS.Load()
			if int64(life) <= m || r.maxLifeNS.CompareAndSwap(m, int64(life)) {
				break
			}
		}
	})
}

// Leave ends the leader's part. If the leader never published, followers are
// released with ErrAbandoned. The flight's context is cancelled once the
// followers are gone too.
func (f *Flight[V]) Leave() {
	var zero V
	f.Publish(zero, ErrAbandoned)
	f.watchMu.Lock()
	f.left = true
	stop := f.stopWatch
	f.watchMu.Unlock()
	// A watch that already fired has released the leader's client.
	if stop == nil || stop() {
		f.release()
	}
}

// Wait blocks until the leader publishes, ctx ends, or maxWait passes
// (maxWait <= 0 means no bound beyond ctx). It returns the published value,
// ctx.Err(), or ErrWaitTimeout.
func (f *Flight[V]) Wait(ctx context.Context, maxWait time.Duration) (V, error) {
	r := f.reg
	defer func() {
		f.followers.Add(-1)
		r.followers.Add(-1)
		f.release()
	}()
	// Fast path: already published.
	select {
	case <-f.done:
		return f.val, f.err
	default:
	}
	var timeout <-chan time.Time
	if maxWait > 0 {
		t := time.NewTimer(maxWait)
		defer t.Stop()
		timeout = t.C
	}
	var zero V
	select {
	case <-f.done:
		return f.val, f.err
	case <-ctx.Done():
		return zero, ctx.Err()
	case <-timeout:
		r.timedOut.Add(1)
		return zero, ErrWaitTimeout
	}
}

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
