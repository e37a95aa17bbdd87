package fleet

import (
	"context"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

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
