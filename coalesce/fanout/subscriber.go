package fanout

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"
)

// subscriber is one client of a stream. It costs what an open stream must
// hold and no more: a subscriber that keeps up queues one event at a time,
// so its queue starts empty and grows only with its backlog (at most
// Buffer events), and its request's goroutine waits on two channels.
type subscriber struct {
	stream *stream
	owner  *Owner
	ctx    context.Context
	run    *run
	replay []*event
	// wake holds one signal: events were queued. The stream closes it when
	// it closes the subscriber (closed and reason are set first).
	wake chan struct{}

	// Guarded by mu, which the stream takes under its own lock.
	mu     sync.Mutex
	queue  []*event // events not yet taken by Serve (or a drain); at most Buffer
	closed bool     // wake is closed
	reason Reason   // why it was closed
	// conn is set when the subscriber is detached from its request
	// (detached.go): its events are written to conn by the stream itself.
	conn conn

	// Guarded by the stream's lock.
	index   int                      // in stream.subs
	removed bool                     // out of stream.subs
	rc      *http.ResponseController // net/http's writer, set once Serve writes

	leaveOnce sync.Once
}

// delivery is what enqueue did with an event.
type delivery uint8

const (
	delivered delivery = iota // queued, or written
	behind                    // Buffer events already wait: nothing queued
	lost                      // a detached subscriber's connection failed
)

// enqueue queues ev for the subscriber, unless Buffer events already wait.
// A detached subscriber that is not behind gets ev written at once. The
// caller holds the stream's lock.
func (sub *subscriber) enqueue(ev *event, buffer int) delivery {
	sub.mu.Lock()
	if sub.conn.c != nil && (sub.conn.dead || !sub.conn.draining) {
		d := lost
		if !sub.conn.dead {
			d = sub.writeLocked(ev)
		}
		sub.mu.Unlock()
		return d
	}
	n := len(sub.queue)
	if n >= buffer {
		sub.mu.Unlock()
		return behind
	}
	sub.queue = append(sub.queue, ev)
	detached := sub.conn.c != nil
	sub.mu.Unlock()
	if n == 0 && !detached {
		// The first event of a batch wakes Serve; it takes the whole
		// queue, so later events need no signal of their own.
		select {
		case sub.wake <- struct{}{}:
		default:
		}
	}
	return delivered
}

// closeLocked marks the subscriber closed for reason and wakes it for good.
// The caller holds the stream's lock, and has taken sub out of the
// stream's list (nothing enqueues to it after).
func (sub *subscriber) closeLocked(reason Reason) {
	sub.mu.Lock()
	sub.closed, sub.reason = true, reason
	if sub.conn.c != nil {
		sub.closeConnLocked()
	}
	sub.mu.Unlock()
	close(sub.wake)
}

// take returns the queued events and leaves spare (empty) in their place.
func (sub *subscriber) take(spare []*event) (batch []*event, closed bool, reason Reason) {
	sub.mu.Lock()
	batch, sub.queue = sub.queue, spare
	closed, reason = sub.closed, sub.reason
	sub.mu.Unlock()
	return batch, closed, reason
}

// isClosed reports whether the stream closed the subscriber.
func (sub *subscriber) isClosed() bool {
	sub.mu.Lock()
	defer sub.mu.Unlock()
	return sub.closed
}

// spareQueue is the largest queue Serve keeps to reuse after writing it:
// a subscriber that once fell behind does not hold its backlog's room.
const spareQueue = 8

// Subscription is the result of Join.
type Subscription struct {
	Outcome Outcome
	// Started: this subscriber's Join started the upstream request (also
	// when the outcome is Answered or Failed).
	Started bool
	// Header is the upstream's response header (Started, Joined). It is
	// shared by every subscriber: copy it, never modify it.
	Header http.Header
	// Replayed is how many kept events the subscriber receives first.
	Replayed int
	// Answer is the upstream's response (Answered).
	Answer *Answer
	// Err is the upstream request's error (Failed).
	Err error

	sub *subscriber
}

// await waits for the response header of the subscriber's run.
func (sub *subscriber) await(out Outcome) *Subscription {
	r := sub.run
	var timeout <-chan time.Time
	if d := sub.stream.hub.cfg.HeaderWait; d > 0 {
		select {
		case <-r.ready:
		default:
			t := time.NewTimer(d)
			defer t.Stop()
			timeout = t.C
		}
	}
	other := Outcome(-1) // ready
wait:
	for {
		select {
		case <-r.ready:
		case <-sub.wake:
			if !sub.isClosed() {
				// An event queued once the stream went live: the signal
				// is Serve's, put it back.
				select {
				case sub.wake <- struct{}{}:
				default:
				}
				continue wait
			}
			other = Closed
		case <-sub.ctx.Done():
			other = Gone
		case <-timeout:
			other = TimedOut
		}
		break
	}
	select {
	case <-r.ready:
		switch {
		case r.answer != nil:
			sub.leave()
			return &Subscription{Outcome: Answered, Answer: r.answer, Started: out == Started}
		case !r.live:
			sub.leave()
			return &Subscription{Outcome: Failed, Err: r.err, Started: out == Started}
		}
		if other < 0 {
			return &Subscription{Outcome: out, Started: out == Started, Header: r.header, Replayed: len(sub.replay), sub: sub}
		}
	default:
	}
	sub.leave()
	return &Subscription{Outcome: other, Started: out == Started}
}

// leave takes the subscriber out of its stream and its owner, once.
func (sub *subscriber) leave() {
	sub.leaveOnce.Do(func() {
		sub.stream.leave(sub)
		sub.owner.remove(sub)
		sub.stream.hub.subscribers.Add(-1)
	})
}

// Serve writes the stream to w, the response to r: a 200 with the header
// already in w, the replayed events, then every event as it comes, until
// the client leaves or the stream drops the subscriber. The caller copies
// Header into w first. Serve returns nil when the stream closed the
// subscriber.
//
// Once the header and the replayed events are out, an HTTP/1 response
// whose body goes out as written (no Content-Encoding) is detached: Serve
// takes its connection over from net/http and returns at once, and the
// stream writes the events to the connection itself (detached.go).
func (s *Subscription) Serve(w http.ResponseWriter, r *http.Request) error {
	sub := s.sub
	if sub == nil {
		return errors.New("fanout: Serve of a subscription that did not join")
	}
	rc := http.NewResponseController(w)
	// The stream sets the connection's write deadline from its own
	// goroutine: on net/http's writer, which allows that, not through the
	// writers in between (Caddy's idle timeout keeps the deadline in a
	// field that its Write reads without a lock).
	inner := innermost(w)
	conn := http.NewResponseController(inner)
	st := sub.stream
	st.mu.Lock()
	sub.rc = conn
	st.mu.Unlock()

	w.WriteHeader(http.StatusOK)
	for _, ev := range sub.replay {
		if _, err := w.Write(ev.raw); err != nil {
			sub.leave()
			return err
		}
	}
	sub.replay = nil
	flushed := rc.Flush()
	if flushed != nil && !errors.Is(flushed, http.ErrNotSupported) {
		sub.leave()
		return flushed
	}
	// The connection is taken over from net/http's own writer: the writers
	// in between (Caddy's recorders count the bytes of a connection they
	// hand out, and read those counts when the handler returns) are left
	// out of the stream's writes.
	if hj, ok := inner.(http.Hijacker); ok && flushed == nil && detachable(r, w) {
		if c, _, err := hj.Hijack(); err == nil {
			sub.detach(c, r.ProtoAtLeast(1, 1))
			return nil
		}
	}
	defer sub.leave()
	var spare []*event
	for {
		select {
		case <-sub.wake:
		case <-sub.ctx.Done():
			return nil
		}
		batch, closed, reason := sub.take(spare)
		if closed && reason == ReasonSlow {
			return nil
		}
		// A burst costs one flush. Closed cleanly, what was queued goes out
		// first, and the connection stays usable (the client reconnects
		// on it).
		for _, ev := range batch {
			if _, err := w.Write(ev.raw); err != nil {
				return err
			}
		}
		clear(batch)
		spare = nil
		if cap(batch) <= spareQueue {
			spare = batch[:0]
		}
		err := flush(rc)
		if closed {
			_ = conn.SetWriteDeadline(time.Time{})
			return err
		}
		if err != nil {
			return err
		}
	}
}

func flush(rc *http.ResponseController) error {
	if err := rc.Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}
