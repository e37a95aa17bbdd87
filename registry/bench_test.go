package registry_test

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"

	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// keyTable returns rows×cols distinct keys, built before the timer starts.
func keyTable(rows, cols int) [][]string {
	t := make([][]string, rows)
	for i := range t {
		t[i] = make([]string, cols)
		for j := range t[i] {
			t[i][j] = fmt.Sprintf("GET https://api.example/sessions/%d/%d", i, j)
		}
	}
	return t
}

// The whole life of a flight nobody else wants: one leader, no followers.
func BenchmarkJoinLeaveUncontended(b *testing.B) {
	keys := keyTable(1, 1024)[0]
	r := registry.New[string](registry.Options{})
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		f, role := r.Join(ctx, keys[i%len(keys)], "")
		if role != registry.Leader {
			b.Fatalf("role %v", role)
		}
		f.Publish("v", nil)
		f.Leave()
	}
}

// Followers joining and leaving a few hot, long-lived flights from every
// CPU: the cost of collapsing onto a flight (shard lock, client count),
// without the wait itself. Each follower's client has already gone, so Wait
// returns at once.
func BenchmarkJoinFollowerParallel(b *testing.B) {
	const hot = 16
	keys := keyTable(1, hot)[0]
	r := registry.New[string](registry.Options{})
	leaders := make([]*registry.Flight[string], hot)
	for i, key := range keys {
		leaders[i], _ = r.Join(context.Background(), key, "")
	}
	gone, cancel := context.WithCancel(context.Background())
	cancel()
	var next atomic.Uint32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1))
		for pb.Next() {
			f, role := r.Join(gone, keys[i%hot], "")
			if role != registry.Follower {
				b.Errorf("role %v", role)
				return
			}
			f.Wait(gone, 0)
			i++
		}
	})
	b.StopTimer()
	for _, f := range leaders {
		f.Publish("v", nil)
		f.Leave()
	}
}

// Leaders of distinct keys on every CPU: contention on the shards and the
// registry-wide counters.
func BenchmarkJoinLeaveParallel(b *testing.B) {
	const rows, cols = 64, 1024
	keys := keyTable(rows, cols)
	r := registry.New[string](registry.Options{})
	ctx := context.Background()
	var next atomic.Uint32
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		row := keys[int(next.Add(1)-1)%rows]
		for i := 0; pb.Next(); i++ {
			f, role := r.Join(ctx, row[i%cols], "")
			if role != registry.Leader {
				// Two goroutines share a row only with more than 64 of them.
				if role == registry.Follower {
					f.Wait(ctx, 0)
				}
				continue
			}
			f.Publish("v", nil)
			f.Leave()
		}
	})
}
