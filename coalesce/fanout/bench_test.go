package fanout

import (
	"context"
	"testing"
)

// BenchmarkPublish measures handing one event to 1000 subscribers: a shared
// pointer appended to each one's queue (and a wake-up for an empty one),
// under the stream's lock. The queues are drained outside the timer.
func BenchmarkPublish(b *testing.B) {
	const subscribers, buffer = 1000, 64
	s, subs := liveStream(Config{Replay: 256, Buffer: buffer, MaxSubscribers: subscribers, MaxEvent: 1 << 20}, subscribers, nil)
	ev := &event{raw: []byte("id: 1\ndata: {\"sessions\":3}\n\n"), id: "1", hasID: true, retry: -1}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i%buffer == 0 && i > 0 {
			b.StopTimer()
			drain(subs)
			b.StartTimer()
		}
		s.publish(s.cur, ev)
	}
	b.StopTimer()
	if len(s.subs) != subscribers {
		b.Fatalf("%d subscribers left of %d", len(s.subs), subscribers)
	}
}

// BenchmarkPublishWithStalledSubscriber is BenchmarkPublish with one more
// subscriber that never reads: its queue grows to Buffer, the next event
// drops it, and a new stalled one takes its place (outside the timer): one
// drop every 2×Buffer events. Next to BenchmarkPublish it is what a stalled
// subscriber adds to the fan-out of an event, which the other subscribers'
// delivery waits for.
func BenchmarkPublishWithStalledSubscriber(b *testing.B) {
	const subscribers, buffer = 1000, 64
	s, subs := liveStream(Config{Replay: 256, Buffer: buffer, MaxSubscribers: subscribers + 1, MaxEvent: 1 << 20}, subscribers, nil)
	addStalled := func() {
		sub := &subscriber{stream: s, owner: s.owner, ctx: context.Background(), run: s.cur,
			wake: make(chan struct{}, 1), index: len(s.subs)}
		s.subs = append(s.subs, sub)
	}
	addStalled()
	ev := &event{raw: []byte("id: 1\ndata: {\"sessions\":3}\n\n"), id: "1", hasID: true, retry: -1}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i%buffer == 0 && i > 0 {
			b.StopTimer()
			drain(subs)
			if len(s.subs) == subscribers {
				addStalled()
			}
			b.StartTimer()
		}
		s.publish(s.cur, ev)
	}
	b.StopTimer()
	if got := len(s.subs); got < subscribers {
		b.Fatalf("%d subscribers left of %d readers", got, subscribers)
	}
}

// drain empties the queues of subs, as their requests would by writing
// them out, so that a benchmark's subscribers never fall behind.
func drain(subs []*subscriber) {
	for _, sub := range subs {
		batch, _, _ := sub.take(nil)
		clear(batch)
		sub.queue = batch[:0]
		select {
		case <-sub.wake:
		default:
		}
	}
}
