package coalesce

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// entry is a stored response with its timing. Entries are immutable once
// stored (but for read); a refresh stores a new entry.
type entry struct {
	resp *Response
	// url is the target's urlHash; began is when the request that fetched
	// resp went upstream. A write to url finished after began makes the
	// entry one it must not become (RFC 9111 §4.4).
	url          urlHash
	began        time.Time
	stored       time.Time
	fresh        time.Time // served as a hit until then
	stale        time.Time // then served while one refresh runs, until then
	staleIfError time.Time // kept as a stale_if_error stand-in until then
	size         int64
	// lone: stored for a request that no other client shared (a lone
	// leader); read is set at its first hit (see loneCopies).
	lone bool
	read atomic.Bool
}

// entryLifetimes are the configured windows of an entry: fresh for ttl,
// then served while one refresh runs for stale, and kept as a stand-in for a
// failed upstream for staleIfError.
type entryLifetimes struct {
	ttl, stale, staleIfError time.Duration
}

// newEntry builds the entry that stores resp, a shareable response that
// arrived at received for a request sent upstream at requested, or returns
// nil and the reason it may not be stored. The origin's freshness (RFC 9111
// §4.2) bounds everything: a response that arrived stale is not stored, the
// ttl is cut to the freshness left, and the stale and stale_if_error
// windows count from the origin's expiry (from the end of the ttl when the
// origin gave no lifetime). A response with must-revalidate,
// proxy-revalidate or s-maxage is never served stale (RFC 9111 §5.2.2.2,
// .8, .10): it lives for its ttl alone.
func newEntry(resp *Response, lt entryLifetimes, requested, received time.Time) (*entry, string) {
	if lt.ttl <= 0 && lt.stale <= 0 && lt.staleIfError <= 0 {
		return nil, "ttl=0"
	}
	ok, _, reason := storable(resp.Status, resp.cc)
	if !ok {
		return nil, reason
	}
	staleAllowed := !resp.cc.mustRevalidate
	if lt.ttl <= 0 && !staleAllowed {
		return nil, "must-revalidate" // kept only to be served stale, which it may not be
	}
	f := responseFreshness(resp.Header, resp.cc, requested, received)
	if f.left <= 0 {
		return nil, "stale"
	}
	ent := &entry{resp: resp, began: requested, stored: received, fresh: received.Add(min(lt.ttl, f.left)), size: resp.size()}
	expires := ent.fresh
	if f.explicit {
		expires = received.Add(f.left)
	}
	ent.stale, ent.staleIfError = ent.fresh, ent.fresh
	if staleAllowed {
		ent.stale = expires.Add(lt.stale)
		ent.staleIfError = expires.Add(lt.staleIfError)
	}
	return ent, ""
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
	// unadmitted counts responses the doorkeeper kept out (see admit).
	unadmitted atomic.Uint64

	// urls finds the keys stored for a URL (one per identity, coding and
	// method); it holds exactly the keys in the shards, so the entry budget
	// bounds it too.
	urls [cacheShards]urlIndex
	// written holds, per slot of urlHashes, when a write last invalidated
	// a URL of that slot (nanoseconds since epoch, plus 1; 0: never). An
	// entry whose request went upstream before then is not stored. Slots
	// are shared by URLs: a collision only leaves one response unstored.
	written [writtenSlots]atomic.Int64
	epoch   time.Time

	door *doorkeeper
	lone loneCopies
}

// writtenSlots: 32 KiB per cache.
const writtenSlots = 4096

// urlIndex is one shard of the URL index, by urlHash.
type urlIndex struct {
	mu   sync.Mutex
	keys map[urlHash]urlKeys
}

// urlKeys are the keys stored for one URL. Most URLs have one (a public
// endpoint, or one user's): it is held inline, with no allocation; a URL
// that many identities ask for gets a set, so that adding and removing a
// key stays O(1).
type urlKeys struct {
	first Key
	more  map[Key]struct{}
}

func (idx *urlIndex) add(u urlHash, k Key) {
	ks, ok := idx.keys[u]
	switch {
	case !ok:
		idx.keys[u] = urlKeys{first: k}
	case ks.first == k:
	default:
		if ks.more == nil {
			ks.more = map[Key]struct{}{}
			idx.keys[u] = ks
		}
		ks.more[k] = struct{}{}
	}
}

func (idx *urlIndex) remove(u urlHash, k Key) {
	ks, ok := idx.keys[u]
	switch {
	case !ok:
	case ks.first != k:
		delete(ks.more, k)
	case len(ks.more) == 0:
		delete(idx.keys, u)
	default:
		for other := range ks.more {
			ks.first = other
			delete(ks.more, other)
			break
		}
		idx.keys[u] = ks
	}
}

// take removes u's keys from the index and returns them.
func (idx *urlIndex) take(u urlHash) []Key {
	ks, ok := idx.keys[u]
	if !ok {
		return nil
	}
	delete(idx.keys, u)
	keys := make([]Key, 0, 1+len(ks.more))
	keys = append(keys, ks.first)
	for k := range ks.more {
		keys = append(keys, k)
	}
	return keys
}

type cacheShard struct {
	mu         sync.Mutex
	lru        *simplelru.LRU[Key, *entry]
	bytes      int64
	maxBytes   int64
	maxEntries int
	owner      *microCache
}

func newMicroCache(maxEntries int, maxBytes int64) *microCache {
	// Budgets are divided rounding down, so that the shards together never
	// hold more than maxEntries entries or maxBytes bytes.
	n := min(cacheShards, max(1, maxEntries))
	c := &microCache{n: uint8(n), epoch: time.Now(), door: newDoorkeeper(maxEntries, 8)}
	for i := range c.urls {
		c.urls[i].keys = map[urlHash]urlKeys{}
	}
	perEntries := max(1, maxEntries/n)
	perBytes := max(1, maxBytes/int64(n))
	for i := range c.shards[:n] {
		s := &c.shards[i]
		s.owner = c
		s.maxBytes = perBytes
		s.maxEntries = perEntries
		s.lru, _ = simplelru.NewLRU[Key, *entry](perEntries, s.onEvict)
	}
	return c
}

// onEvict runs under the shard lock for every entry that leaves the LRU.
// (Lock order: a cache shard, then a urlIndex shard.)
func (s *cacheShard) onEvict(k Key, e *entry) {
	s.bytes -= e.size
	s.owner.bytes.Add(-e.size)
	s.owner.entries.Add(-1)
	idx := s.owner.urlShard(e.url)
	idx.mu.Lock()
	idx.remove(e.url, k)
	idx.mu.Unlock()
}

func (c *microCache) urlShard(u urlHash) *urlIndex { return &c.urls[u%cacheShards] }

func (c *microCache) writtenSlot(u urlHash) *atomic.Int64 {
	return &c.written[uint64(u)/cacheShards%writtenSlots]
}

// writtenSince reports whether a write to u (or to a URL sharing its slot)
// was invalidated at or after t. The caller holds u's urlIndex lock.
func (c *microCache) writtenSince(u urlHash, t time.Time) bool {
	w := c.writtenSlot(u).Load()
	return w != 0 && w-1 >= int64(t.Sub(c.epoch))
}

// invalidate drops every entry stored for u, for every identity, coding and
// method, and refuses entries whose request went upstream before now: the
// answer of a write to u (RFC 9111 §4.4). It returns how many it dropped.
func (c *microCache) invalidate(u urlHash, now time.Time) int {
	idx := c.urlShard(u)
	idx.mu.Lock()
	// Set under the index lock: put checks it and indexes its key under the
	// same lock, so an entry is either refused or in the list taken here.
	slot := c.writtenSlot(u)
	at := int64(now.Sub(c.epoch)) + 1
	for {
		old := slot.Load()
		if old >= at || slot.CompareAndSwap(old, at) {
			break
		}
	}
	keys := idx.take(u)
	idx.mu.Unlock()
	dropped := 0
	for _, k := range keys {
		s := c.shard(k)
		s.mu.Lock()
		// The key may have left and come back for another URL (keys and
		// URLs are hashes, but a HEAD key and a refreshed entry are real).
		if e, ok := s.lru.Peek(k); ok && e.url == u {
			s.lru.Remove(k)
			dropped++
		}
		s.mu.Unlock()
	}
	return dropped
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
// used entries until the shard is within its budgets. An entry larger than
// the whole shard budget is not stored, nor one whose URL was written since
// its request went upstream.
func (c *microCache) put(k Key, e *entry) bool {
	s := c.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.lru.Remove(k)
	if e.size > s.maxBytes {
		return false
	}
	idx := c.urlShard(e.url)
	idx.mu.Lock()
	if c.writtenSince(e.url, e.began) {
		idx.mu.Unlock()
		return false
	}
	idx.add(e.url, k)
	idx.mu.Unlock()
	// Entries past every use (fresh, stale, stale-if-error) leave first, and
	// are not evictions: entries are put in the order they were stored, so
	// the least recently used are the first to die, and under key churn the
	// cache holds what can still answer, not max_memory of dead copies.
	for {
		_, old, ok := s.lru.GetOldest()
		if !ok || e.stored.Before(old.stale) || e.stored.Before(old.staleIfError) {
			break
		}
		s.lru.RemoveOldest()
	}
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
	if e.lone {
		c.lone.storedOne()
	}
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
	// Unadmitted: responses not stored because the cache was full and
	// their key had not been asked for before (the doorkeeper).
	Unadmitted uint64 `json:"unadmitted"`
}

func (c *microCache) stats() CacheStats {
	return CacheStats{Entries: c.entries.Load(), Bytes: c.bytes.Load(), Evictions: c.evictions.Load(), Unadmitted: c.unadmitted.Load()}
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

// clear removes k's mark. Every store clears, and few keys are marked:
// the common case takes only the read lock.
func (m *marks) clear(k Key) {
	m.mu.RLock()
	marked := m.lru.Contains(k)
	m.mu.RUnlock()
	if !marked {
		return
	}
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
