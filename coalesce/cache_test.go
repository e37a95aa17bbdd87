package coalesce

import (
	"fmt"
	"net/http"
	"runtime"
	"testing"
	"time"
)

// keyN returns a distinct key per n, spread over the shards as real keys are.
func keyN(n int) Key {
	d := newKeyDeriver(nil, true, nil)
	return d.derive(getReq(fmt.Sprintf("http://a/item/%d", n)), http.MethodGet)
}

// entryFor builds an entry with a body of n bytes, fresh for ttl from now.
func entryFor(n int, now time.Time, ttl time.Duration) *entry {
	resp := &Response{Status: 200, Header: http.Header{}, Body: make([]byte, n)}
	return &entry{resp: resp, stored: now, fresh: now.Add(ttl), stale: now.Add(ttl), staleIfError: now.Add(ttl), size: resp.size()}
}

func TestCacheHitsUntilItsLifetimeEnds(t *testing.T) {
	c := newMicroCache(100, 1<<20)
	now := time.Now()
	k := keyN(1)
	c.put(k, entryFor(10, now, 50*time.Millisecond))
	if c.get(k, now) == nil || c.get(k, now.Add(49*time.Millisecond)) == nil {
		t.Fatal("a fresh entry is not found")
	}
	if c.get(keyN(2), now) != nil {
		t.Fatal("a key never stored is found")
	}
	if c.get(k, now.Add(50*time.Millisecond)) != nil {
		t.Fatal("an expired entry is still found")
	}
}

func TestCacheKeepsStaleAndSpareEntries(t *testing.T) {
	c := newMicroCache(100, 1<<20)
	now := time.Now()
	e := entryFor(10, now, 10*time.Millisecond)
	e.stale = now.Add(20 * time.Millisecond)
	e.staleIfError = now.Add(time.Second)
	k := keyN(1)
	c.put(k, e)
	if c.get(k, now.Add(15*time.Millisecond)) == nil {
		t.Error("an entry within its stale window is dropped")
	}
	if c.get(k, now.Add(500*time.Millisecond)) == nil {
		t.Error("an entry within its stale_if_error window is dropped")
	}
	if c.get(k, now.Add(time.Second)) != nil {
		t.Error("an entry past every window is kept")
	}
}

// Expiry costs nothing until someone looks: no goroutine is started, and an
// expired entry leaves the cache (and its budget) on the next read.
func TestExpiredEntriesAreDroppedLazily(t *testing.T) {
	before := runtime.NumGoroutine()
	c := newMicroCache(100, 1<<20)
	now := time.Now()
	for i := range 10 {
		c.put(keyN(i), entryFor(100, now, time.Millisecond))
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("the cache started %d goroutines", n-before)
	}
	if s := c.stats(); s.Entries != 10 {
		t.Fatalf("entries = %d, want 10 before anyone reads", s.Entries)
	}
	later := now.Add(time.Second)
	for i := range 10 {
		if c.get(keyN(i), later) != nil {
			t.Fatalf("expired entry %d found", i)
		}
	}
	if s := c.stats(); s.Entries != 0 || s.Bytes != 0 || s.Evictions != 0 {
		t.Errorf("after reading expired entries: %+v, want empty with no evictions counted", s)
	}
}

func TestCacheEntryBudgetHolds(t *testing.T) {
	for _, max := range []int{1, 5, 16, 100, 1000} {
		t.Run(fmt.Sprint(max), func(t *testing.T) {
			c := newMicroCache(max, 1<<30)
			now := time.Now()
			n := 4*max + 64
			for i := range n {
				if !c.put(keyN(i), entryFor(10, now, time.Minute)) {
					t.Fatalf("put %d refused", i)
				}
				if s := c.stats(); s.Entries > int64(max) {
					t.Fatalf("after %d puts: %d entries, budget %d", i+1, s.Entries, max)
				}
			}
			s := c.stats()
			if s.Evictions != uint64(int64(n)-s.Entries) {
				t.Errorf("evictions = %d, want %d (puts) - %d (entries)", s.Evictions, n, s.Entries)
			}
			found := 0
			for i := range n {
				if c.get(keyN(i), now) != nil {
					found++
				}
			}
			if int64(found) != s.Entries {
				t.Errorf("%d entries reachable, stats say %d", found, s.Entries)
			}
		})
	}
}

func TestCacheByteBudgetHolds(t *testing.T) {
	const budget = 64 << 10
	c := newMicroCache(100_000, budget)
	now := time.Now()
	for i := range 2000 {
		c.put(keyN(i), entryFor(500, now, time.Minute))
		if s := c.stats(); s.Bytes > budget {
			t.Fatalf("after %d puts: %d bytes, budget %d", i+1, s.Bytes, budget)
		}
	}
	s := c.stats()
	if s.Evictions == 0 {
		t.Error("no evictions counted although the byte budget was exceeded many times")
	}
	if s.Entries == 0 || s.Bytes == 0 {
		t.Errorf("cache empty after filling: %+v", s)
	}
}

func TestCacheEvictsLeastRecentlyUsed(t *testing.T) {
	// Find three keys of one shard, whose budget is 2 entries.
	c := newMicroCache(2*cacheShards, 1<<30)
	var same []Key
	for i := 0; len(same) < 3; i++ {
		if k := keyN(i); c.shard(k) == c.shard(keyN(0)) {
			same = append(same, k)
		}
	}
	now := time.Now()
	c.put(same[0], entryFor(1, now, time.Minute))
	c.put(same[1], entryFor(1, now, time.Minute))
	c.get(same[0], now) // same[1] is now the least recently used
	c.put(same[2], entryFor(1, now, time.Minute))
	if c.get(same[0], now) == nil || c.get(same[2], now) == nil {
		t.Error("a recently used entry was evicted")
	}
	if c.get(same[1], now) != nil {
		t.Error("the least recently used entry was kept")
	}
	if s := c.stats(); s.Evictions != 1 {
		t.Errorf("evictions = %d, want 1", s.Evictions)
	}
}

func TestCacheReplacingAnEntryKeepsTheBudgetExact(t *testing.T) {
	c := newMicroCache(100, 1<<20)
	now := time.Now()
	k := keyN(1)
	c.put(k, entryFor(1000, now, time.Minute))
	e := entryFor(10, now, time.Minute)
	c.put(k, e)
	if s := c.stats(); s.Entries != 1 || s.Bytes != e.size || s.Evictions != 0 {
		t.Errorf("after replacing: %+v, want 1 entry of %d bytes and no eviction", s, e.size)
	}
	c.remove(k)
	if s := c.stats(); s.Entries != 0 || s.Bytes != 0 {
		t.Errorf("after remove: %+v, want empty", s)
	}
}

func TestEntryLargerThanAShardIsNotStored(t *testing.T) {
	const budget = 16 << 10 // 1 KiB a shard
	c := newMicroCache(100, budget)
	now := time.Now()
	k := keyN(1)
	c.put(k, entryFor(10, now, time.Minute))
	if c.put(k, entryFor(2<<10, now, time.Minute)) {
		t.Fatal("an entry larger than its shard's budget was stored")
	}
	if c.get(k, now) != nil {
		t.Error("the older entry under the key is still served after a newer response was refused")
	}
	if s := c.stats(); s.Entries != 0 || s.Bytes != 0 {
		t.Errorf("stats after refusing: %+v", s)
	}
}

func TestHitForMissMarksExpire(t *testing.T) {
	m := newMarks(10)
	now := time.Now()
	k := keyN(1)
	if m.has(k, now) {
		t.Fatal("an unmarked key is marked")
	}
	m.set(k, now.Add(time.Second))
	if !m.has(k, now) || !m.has(k, now.Add(999*time.Millisecond)) {
		t.Error("a mark is not seen within its lifetime")
	}
	if m.has(k, now.Add(time.Second)) {
		t.Error("a mark is seen after it expired")
	}
	m.clear(k)
	if m.has(k, now) {
		t.Error("a cleared mark is seen")
	}
}

func TestHitForMissMarksAreBounded(t *testing.T) {
	m := newMarks(8)
	now := time.Now()
	for i := range 100 {
		m.set(keyN(i), now.Add(time.Minute))
	}
	if n := m.lru.Len(); n > 8 {
		t.Errorf("%d marks kept, bound 8", n)
	}
	if !m.has(keyN(99), now) {
		t.Error("the newest mark was pushed out")
	}
}
