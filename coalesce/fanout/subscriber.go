package fanout

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"
)

// subscriber is one client of a stream. Its fields below mu are guarded by
// the stream's lock.
type subscriber struct {
	stream *stream
	owner  *Owner
	ctx    context.Context
	run    *run
	replay []*event
	queue  chan *event
	gone   chan struct{} // closed when the stream drops it

	index   int                      // in stream.subs
	removed bool                     // out of stream.subs
	reason  Reason                   // why gone was closed
	rc      *http.ResponseController // set once Serve writes

	leaveOnce sync.Once
}

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
	select {
	case <-r.ready:
	case <-sub.gone:
		other = Closed
	case <-sub.ctx.Done():
		other = Gone
	case <-timeout:
		other = TimedOut
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

// Serve writes the stream to w: a 200 with the header already in w, the
// replayed events, then every event as it comes, until the client leaves
// or the stream drops the subscriber. The caller copies Header into w
// first. Serve returns nil when the stream closed the subscriber.
func (s *Subscription) Serve(w http.ResponseWriter) error {
	sub := s.sub
	if sub == nil {
		return errors.New("fanout: Serve of a subscription that did not join")
	}
	defer sub.leave()
	rc := http.NewResponseController(w)
	st := sub.stream
	st.mu.Lock()
	sub.rc = rc
	st.mu.Unlock()

	w.WriteHeader(http.StatusOK)
	for _, ev := range sub.replay {
		if _, err := w.Write(ev.raw); err != nil {
			return err
		}
	}
	sub.replay = nil
	if err := flush(rc); err != nil {
		return err
	}
	for {
		select {
		case ev := <-sub.queue:
			if err := writeQueued(w, ev, sub.queue); err != nil {
				return err
			}
			if err := flush(rc); err != nil {
				return err
			}
		case <-sub.gone:
			if sub.reason == ReasonSlow {
				return nil
			}
			// Closed cleanly: what was queued goes out first, and the
			// connection stays usable (the client reconnects on it).
			select {
			case ev := <-sub.queue:
				if err := writeQueued(w, ev, sub.queue); err != nil {
					return err
				}
			default:
			}
			err := flush(rc)
			_ = rc.SetWriteDeadline(time.Time{})
			return err
		case <-sub.ctx.Done():
			return nil
		}
	}
}

// writeQueued writes ev and whatever else is queued already, so that a
// burst costs one flush.
func writeQueued(w http.ResponseWriter, ev *event, queue chan *event) error {
	if _, err := w.Write(ev.raw); err != nil {
		return err
	}
	for n := len(queue); n > 0; n-- {
		if _, err := w.Write((<-queue).raw); err != nil {
			return err
		}
	}
	return nil
}

func flush(rc *http.ResponseController) error {
	if err := rc.Flush(); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	return nil
}
