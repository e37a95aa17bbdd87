package coalesce

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// entry is a stored response with its timing. Entries are immutable once
// stored; a refresh stores a new entry.
type entry struct {
	resp         *Response
	stored       time.Time
	fresh        time.Time // served as a hit until then
	stale        time.Time // then served while one refresh runs, until then
	staleIfError time.Time // kept as a stale_if_error stand-in until then
	size         int64
}

// cacheShards spreads the LRU lock; each shard in use has an equal share of the
// entry and byte budgets.
const cacheShards = 16

// microCache is a bounded LRU of entries: at most maxEntries entries and
// maxBytes bytes of bodies and headers. Expiry is checked on read and
// expired entries leave through the LRU; there is no background goroutine.
type microCache struct {
	shards    [cacheShards]cacheShard
	n         uint8 // shards in use: fewer than cacheShards for a tiny budget
	entries   atomic.Int64
	bytes     atomic.Int64
	evictions atomic.Uint64
}

type cacheShard struct {
	mu       sync.Mutex
	lru      *simplelru.LRU[Key, *entry]
	bytes    int64
	maxBytes int64
	owner    *microCache
}

func newMicroCache(maxEntries int, maxBytes int64) *microCache {
	// Budgets are divided rounding down, so that the shards together never
	// hold more than maxEntries entries or maxBytes bytes.
	n := min(cacheShards, max(1, maxEntries))
	c := &microCache{n: uint8(n)}
	perEntries := max(1, maxEntries/n)
	perBytes := max(1, maxBytes/int64(n))
	for i := range c.shards[:n] {
		s := &c.shards[i]
		s.owner = c
		s.maxBytes = perBytes
		s.lru, _ = simplelru.NewLRU[Key, *entry](perEntries, s.onEvict)
	}
	return c
}

// onEvict runs under the shard lock for every entry that leaves the LRU.
func (s *cacheShard) onEvict(_ Key, e *entry) {
	s.bytes -= e.size
	s.owner.bytes.Add(-e.size)
	s.owner.entries.Add(-1)
}

func (c *microCache) shard(k Key) *cacheShard { return &c.shards[k[0]%c.n] }

// get returns the entry for k if it can still be used for anything at now
// (fresh, stale or as an error fallback); entries past all of that are
// dropped.
func (c *microCache) get(k Key, now time.Time) *entry {
	s := c.shard(k)
	s.mu.Lock()
	e, ok := s.lru.Get(k)
	if ok && !now.Before(e.staleIfError) && !now.Before(e.stale) {
		s.lru.Remove(k)
		e, ok = nil, false
	}
	s.mu.Unlock()
	if !ok {
		return nil
	}
	return e
}

// put stores e under k, replacing what was there, and evicts least recently
// used entries until the shard is within its byte budget. An entry larger
// than the whole shard budget is not stored.
func (c *microCache) put(k Key, e *entry) bool {
	s := c.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	if e.size > s.maxBytes {
		s.lru.Remove(k)
		return false
	}
	s.lru.Remove(k)
	for s.bytes+e.size > s.maxBytes {
		if _, _, ok := s.lru.RemoveOldest(); !ok {
			break
		}
		c.evictions.Add(1)
	}
	if s.lru.Add(k, e) {
		c.evictions.Add(1)
	}
	s.bytes += e.size
	c.bytes.Add(e.size)
	c.entries.Add(1)
	return true
}

// remove drops k (used when the origin says a response must not be reused).
func (c *microCache) remove(k Key) {
	s := c.shard(k)
	s.mu.Lock()
	s.lru.Remove(k)
	s.mu.Unlock()
}

// CacheStats describe the micro-cache now.
type CacheStats struct {
	Entries   int64  `json:"entries"`
	Bytes     int64  `json:"bytes"`
	Evictions uint64 `json:"evictions"`
}

func (c *microCache) stats() CacheStats {
	return CacheStats{Entries: c.entries.Load(), Bytes: c.bytes.Load(), Evictions: c.evictions.Load()}
}

// marks remembers keys for a while (hit-for-miss: keys whose responses could
// not be shared). Bounded like the cache, expiry checked on read.
type marks struct {
	mu  sync.RWMutex
	lru *simplelru.LRU[Key, time.Time]
}

func newMarks(size int) *marks {
	l, _ := simplelru.NewLRU[Key, time.Time](max(size, 1), nil)
	return &marks{lru: l}
}

func (m *marks) set(k Key, until time.Time) {
	m.mu.Lock()
	m.lru.Add(k, until)
	m.mu.Unlock()
}

func (m *marks) clear(k Key) {
	m.mu.Lock()
	m.lru.Remove(k)
	m.mu.Unlock()
}

// has reports whether k is marked at now. Expired marks stay until the LRU
// pushes them out, so that the common read takes only a read lock.
func (m *marks) has(k Key, now time.Time) bool {
	m.mu.RLock()
	until, ok := m.lru.Peek(k)
	m.mu.RUnlock()
	return ok && now.Before(until)
}
