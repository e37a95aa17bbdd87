// Package fleet is the shared tier of a fleet of coalescing servers: on
// Redis (or Valkey) it holds one lock and one entry per key, so that one
// server's leader goes upstream for the whole fleet and the others are woken
// with its answer, and it tallies upstream failures fleet-wide so that one
// server's breaker trip opens every server's.
//
// Every operation is bounded by a timeout; an error, a timeout, or the
// tier's own breaker being open is reported to the caller, who then acts
// alone. Nothing here ever waits on Redis longer than that, except a
// follower waiting for its fleet leader, which is bounded by its caller.
//
// Values are opaque bytes: what may be stored, and how it is encoded, is
// the caller's business. Keys are given already hashed.
package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// Options configure a Tier. Zero fields take their defaults.
type Options struct {
	// URL is redis://[user:password@]host:port[/db], or rediss:// for TLS.
	URL string
	// Prefix starts every Redis key and channel. "": "coalesce:".
	Prefix string
	// Timeout bounds each Redis operation. 0: 50ms.
	Timeout time.Duration
	// Zone keeps apart the keys of handlers that must not share entries;
	// every server of the fleet must give the same handler the same zone.
	Zone string
	// OnState is told each change of the tier's state, once per change
	// (not for every failed operation). nil: nobody.
	OnState func(State, error)
	// OnBreakerOpen is told when any server of the fleet opened the breaker
	// of upstream until the given time (this server included).
	OnBreakerOpen func(upstream string, until time.Time)
}

// DefaultPrefix and DefaultTimeout are the defaults of Options.
const (
	DefaultPrefix  = "coalesce:"
	DefaultTimeout = 50 * time.Millisecond
)

// State is the tier's state, as its breaker sees Redis.
type State string

const (
	StateUp      State = "up"      // operations go to Redis
	StateDown    State = "down"    // Redis failed; every server acts alone until the next probe
	StateProbing State = "probing" // a few operations test whether Redis is back
)

// Errors the operations return besides Redis's own.
var (
	// ErrDown: the tier's breaker is open; the caller acts alone.
	ErrDown = errors.New("fleet: shared tier down")
	// ErrNoEntry: the fleet leader finished without an entry to share (or
	// left its lock to expire); the caller goes upstream itself.
	ErrNoEntry = errors.New("fleet: the fleet leader left no entry")
	// ErrWaitTimeout: the fleet leader did not answer in time.
	ErrWaitTimeout = errors.New("fleet: timed out waiting for the fleet leader")
)

// The tier's breaker: after tripAfter consecutive failed operations, Redis
// is left alone for downFor, then one operation probes it.
const (
	tripAfter = 3
	downFor   = time.Second
)

// Tier is a connection to the fleet's Redis. Its methods are safe for
// concurrent use.
type Tier struct {
	rdb      *redis.Client
	ps       *redis.PubSub
	cb       *gobreaker.CircuitBreaker[any]
	timeout  time.Duration
	ns       string // prefix + zone: starts the keys of entries and locks
	flights  string // the zone's channel: "<key>:e" (entry written) or "<key>:x" (none)
	breakers string // the prefix's channel: "<until ms> <upstream>"
	bns      string // starts the keys of the breakers' tallies
	opts     Options

	mu      sync.Mutex
	waiters map[string][]chan bool // per key: woken with true when an entry was written

	// listening: the subscription is confirmed on the current connection;
	// while it is not, nobody waits for a fleet leader.
	listening atomic.Bool
	done      chan struct{}
	loopDone  chan struct{}
	closeOnce sync.Once

	stats counters
}

type counters struct {
	errors, sharedHits, won, lost, waits, waitTimeouts, breakerTrips atomic.Uint64
}

// Stats count what the tier did since it was opened.
type Stats struct {
	State State `json:"state"`
	// Listening: subscribed to the fleet's wake-ups.
	Listening bool `json:"listening"`
	// Errors: Redis operations that failed or timed out.
	Errors uint64 `json:"redis_errors"`
	// SharedHits: fresh entries found in Redis and served.
	SharedHits uint64 `json:"shared_hits"`
	// LeadershipsWon and LeadershipsLost: lock attempts that made this
	// server the fleet leader of a key, or found another one.
	LeadershipsWon  uint64 `json:"leaderships_won"`
	LeadershipsLost uint64 `json:"leaderships_lost"`
	// Waits and WaitTimeouts: waits for another server's fleet leader, and
	// those that ran out of time.
	Waits        uint64 `json:"fleet_waits"`
	WaitTimeouts uint64 `json:"fleet_wait_timeouts"`
	// BreakerTrips: fleet-wide breaker openings this server published.
	BreakerTrips uint64 `json:"breaker_trips"`
}

// Open connects to Redis as opts say. It does not wait for Redis: a tier
// whose Redis is down works (every caller acts alone) and comes up when
// Redis does. Close it.
func Open(opts Options) (*Tier, error) {
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultTimeout
	}
	ro, err := ParseURL(opts.URL)
	if err != nil {
		return nil, err
	}
	ro.DialTimeout = opts.Timeout
	ro.ReadTimeout = opts.Timeout
	ro.WriteTimeout = opts.Timeout
	ro.ContextTimeoutEnabled = true
	ro.MaxRetries = -1 // acting alone beats retrying
	ro.DisableIdentity = true
	ro.DialerRetries = 1 // one dial per operation: a refused one means down
	ro.Protocol = 2
	t := &Tier{
		rdb:      redis.NewClient(ro),
		timeout:  opts.Timeout,
		ns:       opts.Prefix + opts.Zone + ":",
		bns:      opts.Prefix + "breaker:",
		opts:     opts,
		waiters:  map[string][]chan bool{},
		done:     make(chan struct{}),
		loopDone: make(chan struct{}),
	}
	t.flights = t.ns + "wake"
	t.breakers = opts.Prefix + "breakers"
	t.cb = gobreaker.NewCircuitBreaker[any](gobreaker.Settings{
		Name:        "redis",
		MaxRequests: 1,
		Timeout:     downFor,
		ReadyToTrip: func(c gobreaker.Counts) bool { return c.ConsecutiveFailures >= tripAfter },
		IsSuccessful: func(err error) bool {
			return err == nil || errors.Is(err, redis.Nil)
		},
		OnStateChange: func(_ string, _, to gobreaker.State) {
			if opts.OnState != nil {
				opts.OnState(stateOf(to), nil)
			}
		},
	})
	// The subscription is made by the loop, on a connection of its own.
	t.ps = t.rdb.Subscribe(context.Background())
	go t.listen()
	return t, nil
}

// MaxTimeout is the longest timeout allowed: a request may wait for Redis
// this long before its server acts alone.
const MaxTimeout = 10 * time.Second

// Validate explains what is wrong with o, in words for an operator.
func (o Options) Validate() error {
	if _, err := ParseURL(o.URL); err != nil {
		return err
	}
	if o.Timeout < 0 || o.Timeout > MaxTimeout {
		return fmt.Errorf("shared: timeout is the longest one Redis operation may take, from 1ms to %s (got %s); default 50ms", MaxTimeout, o.Timeout)
	}
	if strings.ContainsAny(o.Prefix, " \t\r\n") {
		return fmt.Errorf("shared: prefix %q must not contain white space", o.Prefix)
	}
	return nil
}

// ParseURL parses a redis:// or rediss:// URL, and says what is wrong with
// a bad one in words for an operator.
func ParseURL(u string) (*redis.Options, error) {
	if !strings.HasPrefix(u, "redis://") && !strings.HasPrefix(u, "rediss://") {
		return nil, fmt.Errorf("shared: %q is not a Redis URL; write redis://[user:password@]host:port[/db] (rediss:// for TLS)", redact(u))
	}
	ro, err := redis.ParseURL(u)
	if err != nil {
		return nil, fmt.Errorf("shared: %q: %v", redact(u), err)
	}
	return ro, nil
}

// redact hides a URL's password.
func redact(u string) string {
	at := strings.LastIndex(u, "@")
	scheme := strings.Index(u, "://")
	if at < 0 || scheme < 0 || at < scheme {
		return u
	}
	cred := u[scheme+3 : at]
	if i := strings.Index(cred, ":"); i >= 0 {
		cred = cred[:i+1] + "xxxxx"
	}
	return u[:scheme+3] + cred + u[at:]
}

func stateOf(s gobreaker.State) State {
	switch s {
	case gobreaker.StateOpen:
		return StateDown
	case gobreaker.StateHalfOpen:
		return StateProbing
	default:
		return StateUp
	}
}

// Close closes the connections and ends the tier's goroutine. Waiting
// followers are woken and go upstream.
func (t *Tier) Close() error {
	var err error
	t.closeOnce.Do(func() {
		close(t.done)
		err = t.ps.Close()
		<-t.loopDone
		if e := t.rdb.Close(); err == nil {
			err = e
		}
	})
	return err
}

// State is the tier's state now.
func (t *Tier) State() State { return stateOf(t.cb.State()) }

// Stats returns the tier's counts.
func (t *Tier) Stats() Stats {
	return Stats{
		State: t.State(), Listening: t.listening.Load(),
		Errors: t.stats.errors.Load(), SharedHits: t.stats.sharedHits.Load(),
		LeadershipsWon: t.stats.won.Load(), LeadershipsLost: t.stats.lost.Load(),
		Waits: t.stats.waits.Load(), WaitTimeouts: t.stats.waitTimeouts.Load(),
		BreakerTrips: t.stats.breakerTrips.Load(),
	}
}

// CountSharedHit counts an entry found in Redis that answered a request.
func (t *Tier) CountSharedHit() { t.stats.sharedHits.Add(1) }

// do runs one operation under the tier's breaker and the timeout.
func (t *Tier) do(ctx context.Context, op func(context.Context) (any, error)) (any, error) {
	v, err := t.cb.Execute(func() (any, error) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), t.timeout)
		defer cancel()
		return op(ctx)
	})
	switch {
	case err == nil, errors.Is(err, redis.Nil):
	case errors.Is(err, gobreaker.ErrOpenState), errors.Is(err, gobreaker.ErrTooManyRequests):
		return nil, ErrDown
	default:
		t.stats.errors.Add(1)
	}
	return v, err
}

// An entry is stored as "<fresh until, unix ms>|<value>", so that the
// scripts tell a fresh entry from one kept for its stale windows.

// lookupScript answers a local leader in one round trip: a fresh entry
// when there is one; else the lock, taken when free, with the stale entry
// if any. Reply: {entry or false, 1 when the lock was taken}.
var lookupScript = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v then
  local i = string.find(v, '|', 1, true)
  if i and tonumber(string.sub(v, 1, i - 1)) > tonumber(ARGV[3]) then return {v, 2} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {v, 1} end
return {v, 0}
`)

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

// unwrap splits a stored entry into its value and freshness.
func unwrap(s string) (value []byte, fresh time.Time, ok bool) {
	at, v, ok := strings.Cut(s, "|")
	ms, err := strconv.ParseInt(at, 10, 64)
	if !ok || err != nil {
		return nil, time.Time{}, false
	}
	return []byte(v), time.UnixMilli(ms), true
}

// finishScript writes the entry (unless its ttl is 0), releases the lock
// if it is still this leader's, and wakes the fleet's followers.
var finishScript = redis.NewScript(`
if ARGV[2] ~= '0' then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
`)

func (t *Tier) entryKey(key string) string { return t.ns + "e:" + key }
func (t *Tier) lockKey(key string) string  { return t.ns + "l:" + key }

// Lock is a fleet leadership: its holder goes upstream and must Finish.
type Lock struct {
	t     *Tier
	key   string
	token string
	done  bool
}

// Lookup is a local leader's one question. A fresh shared entry for key
// answers it (fresh is true, lock nil). Otherwise this server tries to
// become the fleet's leader of key (a lock that expires after hold): lock
// is set when it did; when it is nil, another server leads: Wait for it.
// Either way entry is the stale entry Redis still keeps, if any. An error
// means: act alone.
func (t *Tier) Lookup(ctx context.Context, key string, hold time.Duration) (entry []byte, fresh bool, lock *Lock, err error) {
	token := newToken()
	v, err := t.do(ctx, func(ctx context.Context) (any, error) {
		return lookupScript.Run(ctx, t.rdb, []string{t.entryKey(key), t.lockKey(key)},
			token, max(hold.Milliseconds(), 1), time.Now().UnixMilli()).Slice()
	})
	if err != nil {
		return nil, false, nil, err
	}
	reply := v.([]any)
	if s, ok := reply[0].(string); ok {
		entry, _, _ = unwrap(s)
	}
	switch n, _ := reply[1].(int64); n {
	case 2:
		return entry, true, nil, nil
	case 1:
		t.stats.won.Add(1)
		return entry, false, &Lock{t: t, key: key, token: token}, nil
	}
	t.stats.lost.Add(1)
	return entry, false, nil, nil
}

// Finish ends the leadership: with entry (fresh until fresh, kept until
// keep) when the leader has one to share, else with nothing, which sends
// the followers upstream. Only the first call counts; a nil Lock does
// nothing.
func (l *Lock) Finish(ctx context.Context, entry []byte, fresh, keep time.Time) error {
	if l == nil || l.done {
		return nil
	}
	l.done = true
	msg, ms := l.key+":x", int64(0)
	var value []byte
	if ttl := time.Until(keep); entry != nil && ttl > 0 {
		msg, ms = l.key+":e", max(ttl.Milliseconds(), 1)
		value = append(strconv.AppendInt(nil, fresh.UnixMilli(), 10), '|')
		value = append(value, entry...)
	}
	t := l.t
	_, err := t.do(ctx, func(ctx context.Context) (any, error) {
		return finishScript.Run(ctx, t.rdb, []string{t.entryKey(l.key), t.lockKey(l.key)},
			value, ms, l.token, t.flights, msg).Result()
	})
	return err
}

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
			t.listening.Store(false)
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

func newToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// failureScript counts one failure of an upstream toward the fleet's
// tally, which lasts ARGV[2] ms past the last failure; at ARGV[1] failures
// it opens the upstream's breaker for the fleet for ARGV[3] ms and tells
// every server. The tally stays: after the open period, one more failure
// (a probe's) opens it again at once.
var failureScript = redis.NewScript(`
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if n >= tonumber(ARGV[1]) then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  return 1
end
return 0
`)

// Failure counts a failure of upstream fleet-wide. When the fleet's tally
// reaches failures, the breaker opens on every server until the returned
// time (OnBreakerOpen is told, on this server too); zero otherwise. The
// tally is forgotten keep after the last failure, or at a Success.
func (t *Tier) Failure(ctx context.Context, upstream string, failures int, keep, open time.Duration) (time.Time, error) {
	until := time.Now().Add(open)
	msg := strconv.FormatInt(until.UnixMilli(), 10) + " " + upstream
	v, err := t.do(ctx, func(ctx context.Context) (any, error) {
		return failureScript.Run(ctx, t.rdb, []string{t.bns + upstream}, failures,
			max(keep.Milliseconds(), 1), max(open.Milliseconds(), 1), t.breakers, msg).Int64()
	})
	if err != nil || v.(int64) == 0 {
		return time.Time{}, err
	}
	t.stats.breakerTrips.Add(1)
	if t.opts.OnBreakerOpen != nil {
		// The published message reaches this server too, later; the
		// breaker must refuse the very next request.
		t.opts.OnBreakerOpen(upstream, until)
	}
	return until, nil
}

// Success forgets the fleet's tally of upstream's failures.
func (t *Tier) Success(ctx context.Context, upstream string) error {
	_, err := t.do(ctx, func(ctx context.Context) (any, error) {
		return t.rdb.Del(ctx, t.bns+upstream).Result()
	})
	return err
}
