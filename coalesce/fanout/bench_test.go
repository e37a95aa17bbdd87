package fanout

import (
	"context"
	"testing"
)

// BenchmarkPublish measures handing one event to 1000 subscribers: one
// non-blocking send of a shared pointer each, under the stream's lock. The
// queues are drained outside the timer.
func BenchmarkPublish(b *testing.B) {
	const subscribers, buffer = 1000, 64
	h := NewHub(Config{Replay: 256, Buffer: buffer, MaxSubscribers: subscribers, MaxEvent: 1 << 20})
	s := newStream(h, "key", "/events")
	ready := make(chan struct{})
	close(ready)
	s.cur = &run{ready: ready, cancel: func() {}, live: true}
	s.state = live
	s.owner = h.NewOwner(nil)
	for i := range subscribers {
		s.subs = append(s.subs, &subscriber{stream: s, owner: s.owner, ctx: context.Background(), run: s.cur,
			queue: make(chan *event, buffer), gone: make(chan struct{}), index: i})
	}
	ev := &event{raw: []byte("id: 1\ndata: {\"sessions\":3}\n\n"), id: "1", hasID: true, retry: -1}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		if i%buffer == 0 && i > 0 {
			b.StopTimer()
			for _, sub := range s.subs {
				for len(sub.queue) > 0 {
					<-sub.queue
				}
			}
			b.StartTimer()
		}
		s.publish(s.cur, ev)
	}
	b.StopTimer()
	if len(s.subs) != subscribers {
		b.Fatalf("%d subscribers left of %d", len(s.subs), subscribers)
	}
}
