// Package fanout shares one upstream stream of server-sent events among every
// subscriber of a key.
//
// The first subscriber of a key starts the stream: one upstream request,
// detached from every client, whose events are cut at their blank lines and
// handed to every subscriber as the upstream sent them. An event is one
// immutable []byte that every subscriber's queue points to; nothing is
// copied per subscriber. A subscriber whose queue is full is dropped, never
// waited for. A ring of recent events answers Last-Event-ID. When the
// upstream connection ends, the stream reconnects with the last event's id
// while its subscribers stay; when the last subscriber leaves, the stream
// closes after a linger.
//
// The package knows nothing of keys, breakers or Caddy: the caller names the
// stream and says how to open its upstream request (Open), with plain
// net/http types.
package fanout

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"sync/atomic"
	"time"
)

// Config bounds a Hub. Every field must be set (see coalesce.DefaultSSE).
type Config struct {
	// Replay is how many recent events a stream keeps to answer
	// Last-Event-ID. 0 keeps none.
	Replay int
	// Buffer is how many events may wait for one subscriber; one more and
	// the subscriber is dropped.
	Buffer int
	// Linger keeps a stream's upstream request open this long after its
	// last subscriber left.
	Linger time.Duration
	// Heartbeat writes a comment to the subscribers of a stream that has
	// been silent this long. 0: never.
	Heartbeat time.Duration
	// MaxSubscribers is the most subscribers of one stream; Join answers
	// Full beyond it.
	MaxSubscribers int
	// MaxEvent is the largest event, and the largest answer other than an
	// event stream that is kept to share. A larger event ends the stream.
	MaxEvent int
	// HeaderWait bounds how long a subscriber waits for the upstream's
	// response header. 0: no bound but the subscriber's own context.
	HeaderWait time.Duration
}

// Reconnection of the upstream request.
const (
	// defaultRetry is the wait before a reconnect when the upstream set no
	// retry: the 3 s browsers use.
	defaultRetry = 3 * time.Second
	// maxRetry bounds the wait, whatever the upstream's retry: says. The
	// subscribers are still connected and waiting.
	maxRetry = 30 * time.Second
	// maxFailures is how many upstream connections in a row may end
	// without an event before the subscribers are closed (they reconnect
	// on their own, and meet the upstream's answer).
	maxFailures = 3
	// handover keeps the ring of a stream whose owner closed (a config
	// reload), so that its subscribers, who reconnect with Last-Event-ID
	// after their retry time, are replayed by the stream's next owner.
	handover = 10 * time.Second
)

// Open sends a stream's upstream request and writes the response into w,
// returning when the response has ended or ctx is done. lastEventID, when
// not empty, is the Last-Event-ID the request must carry.
type Open func(ctx context.Context, lastEventID string, w http.ResponseWriter) error

// ErrRefused is what an Open returns (wrapped) when the upstream must not
// be asked now (a circuit breaker is open): the stream ends at once rather
// than retrying.
var ErrRefused = errors.New("fanout: upstream refused")

// Reason says why a subscriber was closed.
type Reason string

const (
	ReasonSlow     Reason = "slow"     // more than Buffer events behind
	ReasonUpstream Reason = "upstream" // the upstream stream ended for good (failures, breaker, an answer that is not a stream)
	ReasonClosed   Reason = "closed"   // its owner or the hub closed (config reload, shutdown)
)

// Reasons lists every Reason.
var Reasons = []Reason{ReasonSlow, ReasonUpstream, ReasonClosed}

// Tally is told what happens to the streams of an Owner, for metrics.
// Methods are called with no lock held that the Tally could contend on, but
// from the stream's goroutines: they must be quick.
type Tally interface {
	Event()             // an event from the upstream was fanned out
	Replay(hit bool)    // a subscriber with Last-Event-ID was replayed (hit) or sent its own way (miss)
	Drop(reason Reason) // a subscriber was closed by the stream
	Reconnect()         // the upstream request was sent again
	// FanOut: an event from the upstream was handed to every subscriber in
	// d, the time the stream's lock was held for it (what the last
	// subscriber in line waited for before its wake-up).
	FanOut(d time.Duration)
}

type noTally struct{}

func (noTally) Event()      {}
func (noTally) Replay(bool) {}
func (noTally) Drop(Reason) {}
func (noTally) Reconnect()  {}

func (noTally) FanOut(time.Duration) {}

// Hub holds the streams by key. It is safe for concurrent use.
type Hub struct {
	cfg Config

	mu      sync.Mutex
	streams map[string]*stream
	closed  bool

	subscribers atomic.Int64
	wg          sync.WaitGroup // upstream goroutines
	conns       sync.WaitGroup // detached subscribers' goroutines (detached.go)
}

// NewHub returns a hub with no streams.
func NewHub(cfg Config) *Hub {
	return &Hub{cfg: cfg, streams: map[string]*stream{}}
}

// Close ends every stream (its subscribers are closed) and waits for the
// upstream requests to return. Later Joins answer Closed.
func (h *Hub) Close() {
	h.mu.Lock()
	h.closed = true
	var all []*stream
	for _, s := range h.streams {
		all = append(all, s)
	}
	h.mu.Unlock()
	for _, s := range all {
		s.end(ReasonClosed)
	}
	h.wg.Wait()
	h.conns.Wait()
}

// Owner groups the streams started, and the subscribers served, through one
// server configuration. Closing it closes them, so that a server that
// reloads its configuration is not held up by long-lived streams, and the
// streams' next upstream requests go through the new configuration.
type Owner struct {
	hub   *Hub
	tally Tally

	mu     sync.Mutex
	closed bool
	subs   map[*subscriber]struct{}
}

// NewOwner returns an owner whose streams report to tally (nil: nowhere).
func (h *Hub) NewOwner(tally Tally) *Owner {
	if tally == nil {
		tally = noTally{}
	}
	return &Owner{hub: h, tally: tally, subs: map[*subscriber]struct{}{}}
}

// Close closes the owner's subscribers and hands its streams over: each
// stops its upstream request but keeps its recent events for a while, and
// the next owner to Join it reconnects upstream with the last event's id,
// so that the subscribers, who reconnect with Last-Event-ID, are replayed.
// Later Joins through o answer Closed.
func (o *Owner) Close() {
	o.mu.Lock()
	o.closed = true
	subs := make([]*subscriber, 0, len(o.subs))
	for sub := range o.subs {
		subs = append(subs, sub)
	}
	o.mu.Unlock()

	h := o.hub
	h.mu.Lock()
	var owned []*stream
	for _, s := range h.streams {
		s.mu.Lock()
		if s.owner == o {
			owned = append(owned, s)
		}
		s.mu.Unlock()
	}
	h.mu.Unlock()
	for _, s := range owned {
		s.orphan(o)
	}
	for _, sub := range subs {
		sub.stream.drop(sub, ReasonClosed)
	}
}

func (o *Owner) add(sub *subscriber) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return false
	}
	o.subs[sub] = struct{}{}
	return true
}

func (o *Owner) remove(sub *subscriber) {
	o.mu.Lock()
	delete(o.subs, sub)
	o.mu.Unlock()
}

// Outcome is what Join did.
type Outcome int

const (
	// Started: the subscriber started the stream (or took over one whose
	// owner closed); Serve it.
	Started Outcome = iota
	// Joined: the subscriber joined a running stream; Serve it.
	Joined
	// ReplayMiss: the Last-Event-ID is not among the events kept; the
	// subscriber must be sent upstream on its own, with its Last-Event-ID.
	ReplayMiss
	// Full: the stream has MaxSubscribers; send this one on its own.
	Full
	// Answered: the upstream answered something other than an event
	// stream (Subscription.Answer).
	Answered
	// Failed: the upstream request failed (Subscription.Err).
	Failed
	// TimedOut: no response header within HeaderWait.
	TimedOut
	// Closed: the hub or the owner is closing; answer with an empty
	// stream, so that the client reconnects.
	Closed
	// Gone: the subscriber's own context ended while it waited.
	Gone
)

// Answer is an upstream response that is not an event stream.
type Answer struct {
	Status int
	Header http.Header
	Body   []byte
	// Truncated: the body was larger than MaxEvent; Body is its start.
	Truncated bool
}

// StreamInfo describes a stream, for inspection.
type StreamInfo struct {
	Key         string
	Note        string
	Subscribers int
	Events      uint64
	Since       time.Time
	Reconnects  int
	// State is "connecting", "live" or "handover".
	State string
}

// Stats are the hub's state now.
type Stats struct {
	Streams     int   `json:"streams"`
	Subscribers int64 `json:"subscribers"`
}

// Stats returns the number of streams and subscribers.
func (h *Hub) Stats() Stats {
	h.mu.Lock()
	n := len(h.streams)
	h.mu.Unlock()
	return Stats{Streams: n, Subscribers: h.subscribers.Load()}
}

// Streams lists up to limit streams (limit <= 0: all).
func (h *Hub) Streams(limit int) []StreamInfo {
	h.mu.Lock()
	all := make([]*stream, 0, len(h.streams))
	for _, s := range h.streams {
		if limit > 0 && len(all) >= limit {
			break
		}
		all = append(all, s)
	}
	h.mu.Unlock()
	out := make([]StreamInfo, 0, len(all))
	for _, s := range all {
		s.mu.Lock()
		out = append(out, StreamInfo{
			Key: s.key, Note: s.note, Subscribers: len(s.subs), Events: s.events,
			Since: s.since, Reconnects: s.reconnects, State: s.state.String(),
		})
		s.mu.Unlock()
	}
	return out
}

// Join subscribes to the stream of key, starting it with open if there is
// none, and waits until the stream's response header is known. ctx is the
// subscriber's own (its client's). lastEventID is the client's
// Last-Event-ID ("" for none); note describes the stream for Streams.
//
// With Started or Joined, the caller writes Subscription.Header and calls
// Serve. With any other outcome the subscription holds nothing.
func (h *Hub) Join(ctx context.Context, o *Owner, key, note, lastEventID string, open Open) *Subscription {
	o.mu.Lock()
	closed := o.closed
	o.mu.Unlock()
	h.mu.Lock()
	if h.closed || closed {
		h.mu.Unlock()
		return &Subscription{Outcome: Closed}
	}
	s := h.streams[key]
	if s == nil {
		s = newStream(h, key, note)
		h.streams[key] = s
	}
	s.mu.Lock()
	h.mu.Unlock()

	sub, out := s.subscribeLocked(ctx, o, lastEventID, open)
	s.mu.Unlock()
	if sub == nil {
		if out == ReplayMiss {
			o.tally.Replay(false)
		}
		return &Subscription{Outcome: out}
	}
	if lastEventID != "" {
		o.tally.Replay(true)
	}
	if !o.add(sub) {
		s.leave(sub)
		return &Subscription{Outcome: Closed}
	}
	h.subscribers.Add(1)
	return sub.await(out)
}
