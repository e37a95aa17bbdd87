package fleet

import (
	"context"
	"errors"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/sony/gobreaker/v2"
)

// State is the tier's state, as its breaker sees Redis.
type State string

const (
	StateUp      State = "up"      // operations go to Redis
	StateDown    State = "down"    // Redis failed; every server acts alone until the next probe
	StateProbing State = "probing" // a few operations test whether Redis is back
)

// The tier's breaker: after tripAfter consecutive failed operations, Redis
// is left alone for downFor, then one operation probes it.
const (
	tripAfter = 3
	downFor   = time.Second
)

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

// State is the tier's state now.
func (t *Tier) State() State { return stateOf(t.cb.State()) }

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
