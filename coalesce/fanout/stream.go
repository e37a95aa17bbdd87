package fanout

import (
	"context"
	"errors"
	"fmt"
	"mime"
	"net/http"
	"strings"
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
		queue: make(chan *event, s.hub.cfg.Buffer),
		gone:  make(chan struct{}),
		index: len(s.subs),
	}
	s.subs = append(s.subs, sub)
	if s.linger != nil {
		s.linger.Stop()
		s.linger = nil
	}
	return sub, out
}

// replayAfter returns the events a subscriber that saw lastEventID last has
// missed, and whether the ring can tell.
func (s *stream) replayAfter(lastEventID string) ([]*event, bool) {
	if lastEventID == "" || lastEventID == s.lastID {
		return nil, true
	}
	for i := s.ringLen - 1; i >= 0; i-- {
		if ev := s.ringAt(i); ev.hasID && ev.id == lastEventID {
			return s.ringFrom(i + 1), true
		}
	}
	if lastEventID == s.base && s.whole {
		return s.ringFrom(0), true
	}
	return nil, false
}

func (s *stream) ringAt(i int) *event { return s.ring[(s.ringHead+i)%len(s.ring)] }

func (s *stream) ringFrom(i int) []*event {
	out := make([]*event, 0, s.ringLen-i)
	for ; i < s.ringLen; i++ {
		out = append(out, s.ringAt(i))
	}
	return out
}

func (s *stream) push(ev *event) {
	n := s.hub.cfg.Replay
	if n <= 0 {
		s.whole = false
		return
	}
	if s.ring == nil {
		s.ring = make([]*event, n)
	}
	if s.ringLen < n {
		s.ring[(s.ringHead+s.ringLen)%n] = ev
		s.ringLen++
		return
	}
	s.ring[s.ringHead] = ev
	s.ringHead = (s.ringHead + 1) % n
	s.whole = false
}

// start begins a run for owner o.
func (s *stream) start(o *Owner, open Open) {
	ctx, cancel := context.WithCancel(context.Background())
	s.owner, s.state = o, connecting
	s.cur = &run{ready: make(chan struct{}), cancel: cancel}
	if s.handoverAt != nil {
		s.handoverAt.Stop()
		s.handoverAt = nil
	}
	s.hub.wg.Add(1)
	go s.loop(ctx, s.cur, o, open)
}

// loop sends the upstream request, and again whenever the connection ends,
// until the run is cancelled or the upstream is given up.
func (s *stream) loop(ctx context.Context, r *run, o *Owner, open Open) {
	defer s.hub.wg.Done()
	failures := 0
	for attempt := 0; ; attempt++ {
		s.mu.Lock()
		lastID := s.lastID
		s.mu.Unlock()
		w := &upstreamWriter{s: s, run: r, owner: o, ctx: ctx, first: attempt == 0, header: http.Header{},
			split: newSplitter(s.hub.cfg.MaxEvent, lastID)}
		err := callOpen(open, ctx, lastID, w)
		if ctx.Err() != nil {
			return // ended or handed over; the subscribers were told
		}
		switch {
		case attempt == 0 && !w.live:
			// Nobody has a header yet: the waiting subscribers get this
			// answer, as any other response.
			var ans *Answer
			if w.wroteHeader {
				ans = &Answer{Status: w.status, Header: w.header, Body: w.body, Truncated: w.truncated}
			} else if err == nil {
				err = errors.New("fanout: the upstream request returned without a response")
			}
			s.fail(r, ans, err)
			return
		case !w.live && (w.wroteHeader || errors.Is(err, ErrRefused)):
			// A reconnect met another answer than a stream, or a refusal:
			// the subscribers reconnect on their own and meet it.
			s.end(ReasonUpstream)
			return
		case w.events > 0:
			failures = 0
		default:
			failures++
		}
		if failures >= maxFailures {
			s.end(ReasonUpstream)
			return
		}
		t := time.NewTimer(s.retryDelay(failures))
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		s.mu.Lock()
		s.reconnects++
		s.mu.Unlock()
		o.tally.Reconnect()
	}
}

// callOpen runs open, turning a panic (http.ErrAbortHandler is how a proxy
// aborts a response whose upstream broke) into an error.
func callOpen(open Open, ctx context.Context, lastID string, w http.ResponseWriter) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("fanout: upstream request panicked: %v", p)
		}
	}()
	return open(ctx, lastID, w)
}

func (s *stream) retryDelay(failures int) time.Duration {
	s.mu.Lock()
	d := s.retry
	s.mu.Unlock()
	if d < 0 {
		d = defaultRetry
	}
	for i := 1; i < failures && d < maxRetry; i++ {
		d *= 2
	}
	return min(d, maxRetry)
}

// goLive records the first event-stream response of run r.
func (s *stream) goLive(r *run, header http.Header) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur != r || s.state != connecting {
		return
	}
	r.live, r.header = true, header
	s.state = live
	if hb := s.hub.cfg.Heartbeat; hb > 0 && s.beat == nil {
		s.beat = time.AfterFunc(hb, s.heartbeat)
	}
	close(r.ready)
}

// fail answers the subscribers waiting for run r's first response and ends
// the stream.
func (s *stream) fail(r *run, ans *Answer, err error) {
	h := s.hub
	h.mu.Lock()
	s.mu.Lock()
	r.answer, r.err = ans, err
	close(r.ready)
	subs := s.endLocked()
	for _, sub := range subs {
		// They read the answer; nobody dropped them.
		sub.removed = true
	}
	s.mu.Unlock()
	h.mu.Unlock()
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
	for _, sub := range s.subs {
		select {
		case sub.queue <- ev:
		default:
			slow = append(slow, sub)
		}
	}
	for _, sub := range slow {
		s.dropLocked(sub, ReasonSlow)
	}
	if s.beat != nil {
		s.beat.Reset(s.hub.cfg.Heartbeat)
	}
	tally := s.owner.tally
	s.mu.Unlock()
	if !ev.comment {
		tally.Event()
	}
	for _, sub := range slow {
		sub.owner.tally.Drop(ReasonSlow)
	}
	return true
}

// heartbeat writes a comment to every subscriber after a silence.
func (s *stream) heartbeat() {
	var slow []*subscriber
	s.mu.Lock()
	if s.state == ended || s.state == handingOver || s.beat == nil {
		s.mu.Unlock()
		return
	}
	for _, sub := range s.subs {
		select {
		case sub.queue <- heartbeat:
		default:
			slow = append(slow, sub)
		}
	}
	for _, sub := range slow {
		s.dropLocked(sub, ReasonSlow)
	}
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
	sub.reason = reason
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
	close(sub.gone)
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
	sub.reason = reason
	if sub.rc != nil {
		_ = sub.rc.SetWriteDeadline(time.Now().Add(closeGrace))
	}
	close(sub.gone)
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

// upstreamWriter receives one upstream connection's response.
type upstreamWriter struct {
	s     *stream
	run   *run
	owner *Owner
	ctx   context.Context
	first bool

	header      http.Header
	wroteHeader bool
	status      int
	live        bool
	split       *splitter
	events      int

	body      []byte
	truncated bool
}

func (w *upstreamWriter) Header() http.Header { return w.header }

func (w *upstreamWriter) WriteHeader(code int) {
	if w.wroteHeader || code < 200 {
		return // 1xx: informational, not the answer
	}
	w.wroteHeader, w.status = true, code
	if code == http.StatusOK && isEventStream(w.header) {
		w.live = true
		if w.first {
			w.s.goLive(w.run, w.header.Clone())
		}
	}
}

func (w *upstreamWriter) Write(p []byte) (int, error) {
	if err := w.ctx.Err(); err != nil {
		return 0, err
	}
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.live {
		if room := w.s.hub.cfg.MaxEvent - len(w.body); room < len(p) {
			w.truncated = true
			w.body = append(w.body, p[:max(room, 0)]...)
		} else {
			w.body = append(w.body, p...)
		}
		return len(p), nil
	}
	var stale bool
	err := w.split.feed(p, func(ev *event) {
		if !stale && !w.s.publish(w.run, ev) {
			stale = true
		}
		w.events++
	})
	if err != nil {
		return 0, err
	}
	if stale {
		return 0, context.Canceled
	}
	return len(p), nil
}

// Flush is a no-op: events are handed on as soon as they are complete.
func (w *upstreamWriter) Flush() {}

// isEventStream: a 200 whose body can be cut into events (not compressed).
func isEventStream(h http.Header) bool {
	mt, _, err := mime.ParseMediaType(h.Get("Content-Type"))
	if err != nil || mt != "text/event-stream" {
		return false
	}
	ce := strings.TrimSpace(h.Get("Content-Encoding"))
	return ce == "" || strings.EqualFold(ce, "identity")
}
