package registry

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// A flight's life: its leader's client watched, followers counted in and
// out, the result published, the context ended when nobody is left.

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
