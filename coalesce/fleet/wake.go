package fleet

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// recheckScript answers a follower that has begun to listen: a fresh
// entry when the leader wrote one meanwhile, 0 when the leader has gone
// (its lock was released or expired), 1 while it still leads.
var recheckScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v then
  local i = string.find(v, '|', 1, true)
  if i and tonumber(string.sub(v, 1, i - 1)) > tonumber(ARGV[1]) then return v end
end
return redis.call('EXISTS', KEYS[2])
`)

// Wait waits up to limit for the fleet leader of key and returns the entry
// it wrote (fresh or not: it is the leader's answer). ErrNoEntry: it had none to share (or is gone);
// ErrWaitTimeout: it did not answer in time. Either way, and on any other
// error, the caller goes upstream itself.
func (t *Tier) Wait(ctx context.Context, key string, limit time.Duration) ([]byte, error) {
	if !t.listening.Load() {
		// Not subscribed: a wake-up would be missed.
		return nil, ErrNoEntry
	}
	t.stats.waits.Add(1)
	ch := make(chan bool, 1)
	t.mu.Lock()
	t.waiters[key] = append(t.waiters[key], ch)
	t.mu.Unlock()
	defer t.forget(key, ch)
	if !t.listening.Load() {
		// The subscription broke since the check above, and its release
		// of the waiters (listen) may have come before this one joined.
		return nil, ErrNoEntry
	}

	// Listening began after the lock was found taken: the leader may have
	// finished in between.
	v, err := t.do(ctx, func(ctx context.Context) (any, error) {
		return recheckScript.Run(ctx, t.rdb, []string{t.entryKey(key), t.lockKey(key)}, time.Now().UnixMilli()).Result()
	})
	if err != nil {
		return nil, err
	}
	switch v := v.(type) {
	case string:
		if e, _, ok := unwrap(v); ok {
			return e, nil
		}
	case int64:
		if v == 0 {
			return nil, ErrNoEntry
		}
	}

	timer := time.NewTimer(limit)
	defer timer.Stop()
	select {
	case written := <-ch:
		if !written {
			return nil, ErrNoEntry
		}
	case <-timer.C:
		t.stats.waitTimeouts.Add(1)
		return nil, ErrWaitTimeout
	case <-ctx.Done():
		return nil, ctx.Err()
	case <-t.done:
		return nil, ErrNoEntry
	}
	s, err := t.do(ctx, func(ctx context.Context) (any, error) {
		return t.rdb.Get(ctx, t.entryKey(key)).Result()
	})
	if errors.Is(err, redis.Nil) {
		return nil, ErrNoEntry
	}
	if err != nil {
		return nil, err
	}
	e, _, ok := unwrap(s.(string))
	if !ok {
		return nil, ErrNoEntry
	}
	return e, nil
}

func (t *Tier) forget(key string, ch chan bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	ws := t.waiters[key]
	for i, c := range ws {
		if c == ch {
			ws = append(ws[:i], ws[i+1:]...)
			break
		}
	}
	if len(ws) == 0 {
		delete(t.waiters, key)
	} else {
		t.waiters[key] = ws
	}
}

func (t *Tier) wake(key string, written bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, ch := range t.waiters[key] {
		select {
		case ch <- written:
		default:
		}
	}
}

// releaseAll wakes every waiting follower with no entry to share.
func (t *Tier) releaseAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, chs := range t.waiters {
		for _, ch := range chs {
			select {
			case ch <- false:
			default:
			}
		}
	}
}

// listen subscribes to the zone's wake-ups and the fleet's breaker
// openings, and dispatches them. go-redis connects again after a broken
// connection and subscribes on the new one; until Redis confirms the
// subscription, nobody waits for a fleet leader.
func (t *Tier) listen() {
	defer close(t.loopDone)
	ctx := context.Background()
	// The channels are remembered even when Redis is down now: the next
	// Receive subscribes to them on its new connection.
	_ = t.ps.Subscribe(ctx, t.flights, t.breakers)
	const quiet = 2 * time.Second
	backoff := 50 * time.Millisecond
	for {
		msg, err := t.ps.ReceiveTimeout(ctx, quiet)
		select {
		case <-t.done:
			return
		default:
		}
		if err != nil {
			var ne interface{ Timeout() bool }
			if errors.As(err, &ne) && ne.Timeout() {
				// Nothing for a while: a ping finds a broken connection.
				_ = t.ps.Ping(ctx)
				continue
			}
			if t.listening.Swap(false) {
				// Wake-ups published while the connection was broken are
				// lost: every follower goes upstream on its own now, not
				// once its wait runs out.
				t.releaseAll()
			}
			if !t.pause(backoff) {
				return
			}
			backoff = min(2*backoff, downFor/2)
			continue
		}
		backoff = 50 * time.Millisecond
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" && m.Channel == t.flights {
				t.listening.Store(true)
			}
		case *redis.Message:
			t.dispatch(m)
		}
	}
}

// pause waits d unless the tier closes first (false).
func (t *Tier) pause(d time.Duration) bool {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-timer.C:
		return true
	case <-t.done:
		return false
	}
}

func (t *Tier) dispatch(m *redis.Message) {
	switch m.Channel {
	case t.flights:
		i := strings.LastIndexByte(m.Payload, ':')
		if i < 0 {
			return
		}
		t.wake(m.Payload[:i], m.Payload[i+1:] == "e")
	case t.breakers:
		at, upstream, ok := strings.Cut(m.Payload, " ")
		ms, err := strconv.ParseInt(at, 10, 64)
		if !ok || err != nil || t.opts.OnBreakerOpen == nil {
			return
		}
		t.opts.OnBreakerOpen(upstream, time.UnixMilli(ms))
	}
}
