package registry_test

import (
	"context"
	"fmt"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

func Example() {
	reg := registry.New[string](registry.Options{})
	ctx := context.Background() // in a handler: r.Context()

	leader, role := reg.Join(ctx, "GET /api/sessions", "GET /api/sessions")
	fmt.Println(role)
	follower, role := reg.Join(ctx, "GET /api/sessions", "GET /api/sessions")
	fmt.Println(role)

	// The leader does the work with leader.Context(), which outlives its own
	// client while a follower still waits, then shares the result.
	leader.Publish("3 sessions", nil)
	leader.Leave()

	v, err := follower.Wait(ctx, time.Second)
	fmt.Println(v, err)
	// Output:
	// leader
	// follower
	// 3 sessions <nil>
}
