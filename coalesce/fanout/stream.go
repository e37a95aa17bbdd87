package fanout

import (
	"context"
	"net/http"
	"sync"
	"time"
)

type streamState uint8

const (
	connecting  streamState = iota // the current run's first response is not known yet
	live                           // the upstream answered with an event stream
	handingOver                    // its owner closed; the ring waits for the next owner
	ended
)

func (st streamState) String() string {
	switch st {
	case connecting:
		return "connecting"
	case live:
		return "live"
	case handingOver:
		return "handover"
	default:
		return "ended"
	}
}

// stream is the fan-out of one key: one upstream request at a time, its
// subscribers, and its recent events.
type stream struct {
	hub   *Hub
	key   string
	note  string
	since time.Time

	mu    sync.Mutex
	state streamState
	owner *Owner
	cur   *run // the current upstream run; nil before the first

	// ring holds the last Replay events (not comments), oldest at head.
	ring     []*event
	ringHead int
	ringLen  int
	// base is the Last-Event-ID the stream's first request carried; whole:
	// the ring still holds every event since then.
	base   string
	whole  bool
	lastID string
	retry  time.Duration // the upstream's retry:, or -1

	subs []*subscriber

	linger     *time.Timer
	lingerGen  uint64
	beat       *time.Timer
	handoverAt *time.Timer

	events     uint64
	reconnects int
}

// run is one owner's upstream request loop (reconnects included). Its
// fields are written before ready is closed and not after.
type run struct {
	ready  chan struct{}
	cancel context.CancelFunc
	live   bool
	header http.Header
	answer *Answer
	err    error
}

func newStream(h *Hub, key, note string) *stream {
	return &stream{hub: h, key: key, note: note, since: time.Now(), retry: -1}
}

// end ends the stream for good and closes its subscribers.
func (s *stream) end(reason Reason) {
	h := s.hub
	h.mu.Lock()
	s.mu.Lock()
	if s.state == ended {
		s.mu.Unlock()
		h.mu.Unlock()
		return
	}
	subs := s.endLocked()
	for _, sub := range subs {
		s.closeSubLocked(sub, reason)
	}
	s.mu.Unlock()
	h.mu.Unlock()
	for _, sub := range subs {
		sub.owner.tally.Drop(reason)
	}
}

// closeSubLocked closes a subscriber endLocked took out.
func (s *stream) closeSubLocked(sub *subscriber, reason Reason) {
	sub.removed = true
	if sub.rc != nil {
		_ = sub.rc.SetWriteDeadline(time.Now().Add(closeGrace))
	}
	sub.closeLocked(reason)
}

// endLocked marks the stream ended, takes it out of the hub and stops its
// run and timers. It returns the subscribers it took out (not closed).
// The caller holds the hub's lock and the stream's.
func (s *stream) endLocked() []*subscriber {
	s.state = ended
	if s.hub.streams[s.key] == s {
		delete(s.hub.streams, s.key)
	}
	if s.cur != nil {
		s.cur.cancel()
	}
	s.stopTimersLocked()
	subs := s.subs
	s.subs = nil
	for _, sub := range subs {
		sub.removed = true
	}
	return subs
}

func (s *stream) stopTimersLocked() {
	for _, t := range []*time.Timer{s.linger, s.beat, s.handoverAt} {
		if t != nil {
			t.Stop()
		}
	}
	s.linger, s.beat, s.handoverAt = nil, nil, nil
}

// orphan hands the stream over when its owner o closes: the run stops, the
// subscribers are closed, and the ring waits for the next owner.
func (s *stream) orphan(o *Owner) {
	h := s.hub
	h.mu.Lock()
	s.mu.Lock()
	if s.owner != o || s.state == ended || s.state == handingOver {
		s.mu.Unlock()
		h.mu.Unlock()
		return
	}
	var subs []*subscriber
	if s.ringLen == 0 && s.lastID == "" {
		// Nothing to hand over.
		subs = s.endLocked()
	} else {
		s.state = handingOver
		s.cur.cancel()
		s.stopTimersLocked()
		subs = s.subs
		s.subs = nil
		s.handoverAt = time.AfterFunc(handover, s.handoverExpired)
	}
	for _, sub := range subs {
		s.closeSubLocked(sub, ReasonClosed)
	}
	s.mu.Unlock()
	h.mu.Unlock()
	for _, sub := range subs {
		sub.owner.tally.Drop(ReasonClosed)
	}
}

// handoverExpired ends a stream nobody took over.
func (s *stream) handoverExpired() {
	h := s.hub
	h.mu.Lock()
	s.mu.Lock()
	if s.state == handingOver {
		s.endLocked()
	}
	s.mu.Unlock()
	h.mu.Unlock()
}
