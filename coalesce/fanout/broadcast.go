package fanout

import (
	"context"
	"runtime"
	"sync"
	"time"
)

// subscribeLocked adds a subscriber, starting or taking over the stream
// when it has no running owner. It returns nil and the outcome when the
// subscriber cannot join.
func (s *stream) subscribeLocked(ctx context.Context, o *Owner, lastEventID string, open Open) (*subscriber, Outcome) {
	out := Joined
	var replay []*event
	switch {
	case s.cur == nil:
		// A new stream: its first request carries this subscriber's
		// Last-Event-ID, so the upstream's own history fills it in, and
		// every later subscriber with the same id is replayed from the ring.
		s.base, s.lastID, s.whole = lastEventID, lastEventID, true
		s.start(o, open)
		out = Started
	case s.state == handingOver:
		var ok bool
		if replay, ok = s.replayAfter(lastEventID); !ok {
			return nil, ReplayMiss
		}
		s.start(o, open)
		out = Started
	case len(s.subs) >= s.hub.cfg.MaxSubscribers:
		return nil, Full
	default:
		var ok bool
		if replay, ok = s.replayAfter(lastEventID); !ok {
			return nil, ReplayMiss
		}
	}
	sub := &subscriber{
		stream: s, owner: o, ctx: ctx, run: s.cur, replay: replay,
		wake:  make(chan struct{}, 1),
		index: len(s.subs),
	}
	s.subs = append(s.subs, sub)
	if s.linger != nil {
		s.linger.Stop()
		s.linger = nil
	}
	return sub, out
}

// publish hands one event to every subscriber of run r.
func (s *stream) publish(r *run, ev *event) bool {
	var slow []*subscriber
	s.mu.Lock()
	if s.cur != r || s.state != live {
		s.mu.Unlock()
		return false
	}
	if !ev.comment {
		s.push(ev)
		s.lastID = ev.id
		s.events++
	}
	if ev.retry >= 0 {
		s.retry = ev.retry
	}
	start := time.Now()
	slow = s.deliverLocked(ev)
	took := time.Since(start)
	if s.beat != nil {
		s.beat.Reset(s.hub.cfg.Heartbeat)
	}
	tally := s.owner.tally
	s.mu.Unlock()
	if !ev.comment {
		tally.Event()
		tally.FanOut(took)
	}
	for _, sub := range slow {
		sub.owner.tally.Drop(ReasonSlow)
	}
	return true
}

// deliverLocked hands ev to every subscriber: queued, or written at once to
// a detached subscriber's connection. It drops the subscribers too far
// behind and returns them (for the tally), and takes out those whose
// connection failed (they left). The caller holds the stream's lock.
func (s *stream) deliverLocked(ev *event) (slow []*subscriber) {
	// Writing to a connection is a system call of a few microseconds: a
	// large stream's subscribers are shared among as many goroutines as
	// run at once, so that the last subscriber in line waits for its share,
	// not for all of them.
	subs := s.subs
	parts := min(runtime.GOMAXPROCS(0), len(subs)/minShare)
	if parts <= 1 {
		return s.settleLocked(deliver(subs, ev, s.hub.cfg.Buffer))
	}
	part := func(i int) []*subscriber { return subs[i*len(subs)/parts : (i+1)*len(subs)/parts] }
	outs := make([]deliveries, parts)
	var wg sync.WaitGroup
	for i := 1; i < parts; i++ {
		wg.Go(func() { outs[i] = deliver(part(i), ev, s.hub.cfg.Buffer) })
	}
	outs[0] = deliver(part(0), ev, s.hub.cfg.Buffer)
	wg.Wait()
	var all deliveries
	for _, o := range outs {
		all.slow = append(all.slow, o.slow...)
		all.gone = append(all.gone, o.gone...)
	}
	return s.settleLocked(all)
}

// minShare is the fewest subscribers worth a goroutine of their own when
// an event is handed out.
const minShare = 256

// deliveries are the subscribers an event could not be handed to.
type deliveries struct{ slow, gone []*subscriber }

// deliver hands ev to subs.
func deliver(subs []*subscriber, ev *event, buffer int) (d deliveries) {
	for _, sub := range subs {
		switch sub.enqueue(ev, buffer) {
		case behind:
			d.slow = append(d.slow, sub)
		case lost:
			d.gone = append(d.gone, sub)
		}
	}
	return d
}

// settleLocked drops the subscribers an event found too far behind, and
// takes out those whose connection failed. It returns the dropped ones.
func (s *stream) settleLocked(d deliveries) (slow []*subscriber) {
	slow, gone := d.slow, d.gone
	for _, sub := range slow {
		s.dropLocked(sub, ReasonSlow)
	}
	for _, sub := range gone {
		if !sub.removed {
			s.removeLocked(sub)
		}
		sub.hangUp()
	}
	return slow
}

// heartbeat writes a comment to every subscriber after a silence.
func (s *stream) heartbeat() {
	var slow []*subscriber
	s.mu.Lock()
	if s.state == ended || s.state == handingOver || s.beat == nil {
		s.mu.Unlock()
		return
	}
	slow = s.deliverLocked(heartbeat)
	s.beat.Reset(s.hub.cfg.Heartbeat)
	s.mu.Unlock()
	for _, sub := range slow {
		sub.owner.tally.Drop(ReasonSlow)
	}
}

// dropLocked takes sub out of the stream and closes it.
func (s *stream) dropLocked(sub *subscriber, reason Reason) {
	if sub.removed {
		return
	}
	s.removeLocked(sub)
	if sub.rc != nil {
		// A writer blocked on a client that stopped reading returns now;
		// one that is writing finishes what is queued first (not for slow
		// ones: they are cut).
		deadline := time.Now()
		if reason != ReasonSlow {
			deadline = deadline.Add(closeGrace)
		}
		_ = sub.rc.SetWriteDeadline(deadline)
	}
	sub.closeLocked(reason)
}

// closeGrace is how long a subscriber closed for a reason other than being
// slow may take to write what was queued for it.
const closeGrace = time.Second

// drop closes sub, unless it already left.
func (s *stream) drop(sub *subscriber, reason Reason) {
	s.mu.Lock()
	was := sub.removed
	s.dropLocked(sub, reason)
	s.mu.Unlock()
	if !was {
		sub.owner.tally.Drop(reason)
	}
}

// removeLocked takes sub out of the list; the last one out starts the
// linger.
func (s *stream) removeLocked(sub *subscriber) {
	sub.removed = true
	last := len(s.subs) - 1
	moved := s.subs[last]
	s.subs[sub.index] = moved
	moved.index = sub.index
	s.subs[last] = nil
	s.subs = s.subs[:last]
	if len(s.subs) == 0 && (s.state == connecting || s.state == live) {
		s.lingerGen++
		gen := s.lingerGen
		s.linger = time.AfterFunc(max(s.hub.cfg.Linger, 0), func() { s.lingered(gen) })
	}
}

// lingered ends the stream if nobody joined during the linger.
func (s *stream) lingered(gen uint64) {
	h := s.hub
	h.mu.Lock()
	s.mu.Lock()
	if s.lingerGen != gen || s.linger == nil || len(s.subs) > 0 || s.state == ended || s.state == handingOver {
		s.mu.Unlock()
		h.mu.Unlock()
		return
	}
	s.endLocked()
	s.mu.Unlock()
	h.mu.Unlock()
}

// leave takes sub out of the stream if it is still in.
func (s *stream) leave(sub *subscriber) {
	s.mu.Lock()
	if !sub.removed {
		s.removeLocked(sub)
	}
	s.mu.Unlock()
}
