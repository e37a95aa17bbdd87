package fleet

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

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

func newToken() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}
