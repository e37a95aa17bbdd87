package coalesce

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
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

// indexed counts the keys the URL index holds.
func (c *microCache) indexed() int {
	n := 0
	for i := range c.urls {
		c.urls[i].mu.Lock()
		for _, keys := range c.urls[i].keys {
			n += 1 + len(keys.more)
		}
		c.urls[i].mu.Unlock()
	}
	return n
}

func urlOf(target string) urlHash { return requestURL(getReq(target)) }

// entryAt is entryFor with the entry's URL and the time its request began.
func entryAt(u urlHash, began, now time.Time, ttl time.Duration) *entry {
	e := entryFor(10, now, ttl)
	e.url, e.began = u, began
	return e
}

// A write drops what is stored for its URL under every key: every
// identity, coding, method and query.
func TestInvalidateDropsEveryKeyOfTheURL(t *testing.T) {
	c := newMicroCache(100, 1<<20)
	now := time.Now()
	d := newKeyDeriver(nil, false, nil)
	list, other := urlOf("http://a/list"), urlOf("http://a/items")
	var keys []Key
	for _, r := range []*http.Request{
		getReq("http://a/list"),
		getReq("http://a/list", "Authorization", "Bearer alice"),
		getReq("http://a/list", "Cookie", "sid=bob", "Accept-Encoding", "gzip"),
	} {
		k := keyOf(d, r)
		keys = append(keys, k)
		if !c.put(k, entryAt(requestURL(r), now, now, time.Hour)) {
			t.Fatal("put refused")
		}
	}
	head := d.derive(getReq("http://a/list"), http.MethodHead)
	c.put(head, entryAt(list, now, now, time.Hour))
	keys = append(keys, head)
	page2 := keyOf(d, getReq("http://a/list?page=2"))
	c.put(page2, entryAt(list, now, now, time.Hour))
	keys = append(keys, page2)
	kept := keyOf(d, getReq("http://a/items"))
	c.put(kept, entryAt(other, now, now, time.Hour))

	if n := c.invalidate(list, now.Add(time.Millisecond)); n != 5 {
		t.Errorf("invalidate dropped %d entries, want 5", n)
	}
	for i, k := range keys {
		if c.get(k, now) != nil {
			t.Errorf("entry %d of the written URL is still there", i)
		}
	}
	if c.get(kept, now) == nil {
		t.Error("the entry of another URL was dropped")
	}
	if got := c.stats().Entries; got != 1 {
		t.Errorf("entries: %d, want 1", got)
	}
	if n := c.indexed(); n != 1 {
		t.Errorf("the URL index holds %d keys, want 1", n)
	}
}

// A GET that went upstream before a write to its URL finished may carry the
// old state: it is not stored. One that went after is.
func TestEntryWhoseRequestBeganBeforeAWriteIsNotStored(t *testing.T) {
	c := newMicroCache(100, 1<<20)
	t0 := time.Now()
	u := urlOf("http://a/list")
	c.invalidate(u, t0.Add(10*time.Millisecond))
	if c.put(keyN(1), entryAt(u, t0, t0.Add(20*time.Millisecond), time.Hour)) {
		t.Error("an entry whose request began before the write was stored")
	}
	if !c.put(keyN(2), entryAt(u, t0.Add(11*time.Millisecond), t0.Add(20*time.Millisecond), time.Hour)) {
		t.Error("an entry whose request began after the write was not stored")
	}
	if !c.put(keyN(3), entryAt(urlOf("http://a/other"), t0, t0.Add(20*time.Millisecond), time.Hour)) {
		t.Error("an entry of another URL was refused")
	}
	if n := c.indexed(); n != 2 {
		t.Errorf("the URL index holds %d keys, want 2", n)
	}
}

// The index holds only keys that are in the cache: evictions, expiry,
// replacement and removal take them out.
func TestURLIndexIsBoundedByTheCache(t *testing.T) {
	c := newMicroCache(64, 1<<20)
	now := time.Now()
	for i := range 10_000 {
		c.put(keyN(i), entryAt(urlOf(fmt.Sprintf("http://a/item/%d", i%500)), now, now, time.Duration(i%3)*time.Millisecond))
	}
	if n, e := c.indexed(), c.stats().Entries; int64(n) != e || n > 64 {
		t.Errorf("the index holds %d keys for %d entries (budget 64)", n, e)
	}
	for i := range 10_000 {
		c.get(keyN(i), now.Add(time.Second)) // expired ones leave
		c.remove(keyN(i))
	}
	if n := c.indexed(); n != 0 {
		t.Errorf("the index holds %d keys of an empty cache", n)
	}
}

// Writes, stores and reads of one URL at once: no race, and the index never
// disagrees with the cache.
func TestInvalidateRacesWithPutsAndGets(t *testing.T) {
	c := newMicroCache(256, 1<<20)
	u := urlOf("http://a/list")
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 2000 {
				now := time.Now()
				k := keyN(g*10 + i%10)
				switch i % 3 {
				case 0:
					c.put(k, entryAt(u, now, now, time.Hour))
				case 1:
					c.invalidate(u, now)
				default:
					c.get(k, now)
				}
			}
		}()
	}
	wg.Wait()
	if n, e := c.indexed(), c.stats().Entries; int64(n) != e {
		t.Errorf("the index holds %d keys for %d entries", n, e)
	}
	c.invalidate(u, time.Now())
	if e := c.stats().Entries; e != 0 {
		t.Errorf("%d entries outlived the last write", e)
	}
}

func TestNewEntryFollowsTheOriginsFreshness(t *testing.T) {
	lt := entryLifetimes{ttl: 500 * time.Millisecond, stale: 2 * time.Second, staleIfError: 10 * time.Second}
	received := time.Now()
	requested := received.Add(-10 * time.Millisecond)
	build := func(h http.Header) (*entry, string) {
		return newEntry(newResponse(200, h, []byte("x"), getReq("http://a/x")), lt, requested, received)
	}
	cases := []struct {
		name                       string
		header                     http.Header
		reason                     string
		fresh, stale, staleIfError time.Duration // from received
	}{
		{"no lifetime: the ttl", http.Header{}, "", 500 * time.Millisecond, 2500 * time.Millisecond, 10500 * time.Millisecond},
		{"a longer lifetime: the ttl, stale windows from its expiry", http.Header{"Cache-Control": {"max-age=60"}},
			"", 500 * time.Millisecond, 62*time.Second - 10*time.Millisecond, 70*time.Second - 10*time.Millisecond},
		{"Age uses the whole lifetime", http.Header{"Cache-Control": {"max-age=10"}, "Age": {"10"}},
			"stale", 0, 0, 0},
		{"a lifetime of a second", http.Header{"Cache-Control": {"max-age=1"}},
			"", 500 * time.Millisecond, 3*time.Second - 10*time.Millisecond, 11*time.Second - 10*time.Millisecond},
		{"max-age=60 with Age: 120", http.Header{"Cache-Control": {"max-age=60"}, "Age": {"120"}}, "stale", 0, 0, 0},
		{"s-maxage=60, must-revalidate with Age: 3600", http.Header{"Cache-Control": {"s-maxage=60, must-revalidate"}, "Age": {"3600"}}, "stale", 0, 0, 0},
		{"must-revalidate: the ttl alone", http.Header{"Cache-Control": {"max-age=60, must-revalidate"}}, "", 500 * time.Millisecond, 500 * time.Millisecond, 500 * time.Millisecond},
		{"Expires: 0", http.Header{"Expires": {"0"}}, "stale", 0, 0, 0},
		{"Expires at Date", http.Header{"Date": {received.Format(http.TimeFormat)}, "Expires": {received.Format(http.TimeFormat)}}, "stale", 0, 0, 0},
		{"no-store", http.Header{"Cache-Control": {"no-store"}}, "no-store", 0, 0, 0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			e, reason := build(c.header)
			if reason != c.reason || (e == nil) != (c.reason != "") {
				t.Fatalf("newEntry: %v, %q; want reason %q", e != nil, reason, c.reason)
			}
			if e == nil {
				return
			}
			if got := [3]time.Duration{e.fresh.Sub(received), e.stale.Sub(received), e.staleIfError.Sub(received)}; got != [3]time.Duration{c.fresh, c.stale, c.staleIfError} {
				t.Errorf("fresh, stale, stale_if_error after %v, want %v", got, [3]time.Duration{c.fresh, c.stale, c.staleIfError})
			}
			if !e.began.Equal(requested) {
				t.Errorf("began %v, want the request's time", e.began)
			}
		})
	}
	// Freshness left shorter than the ttl cuts it: a second's lifetime,
	// 700 ms of it spent on the way.
	short := newResponse(200, http.Header{"Cache-Control": {"max-age=1"}}, nil, getReq("http://a/x"))
	if e, _ := newEntry(short, lt, received.Add(-700*time.Millisecond), received); e == nil ||
		e.fresh.Sub(received) != 300*time.Millisecond || e.stale.Sub(received) != 2300*time.Millisecond {
		t.Errorf("max-age=1 after 700 ms upstream: %+v, want fresh for 300ms, stale until 2.3s", e)
	}
	if e, reason := newEntry(newResponse(200, http.Header{}, nil, getReq("http://a/x")), entryLifetimes{}, requested, received); e != nil || reason != "ttl=0" {
		t.Errorf("nothing configured to keep: %v %q", e != nil, reason)
	}
}

// A full cache stores a lone leader's response only for a key asked for
// before; while it has room it stores every one.
func TestDoorkeeperAdmitsKeysAskedForBeforeWhenTheCacheIsFull(t *testing.T) {
	c := newMicroCache(16, 1<<20) // one entry per shard
	now := time.Now()
	admit := func(k Key, e *entry) bool { return c.admits(k, e.size) && c.put(k, e) }
	first := map[uint8]int{} // shard -> the key that filled it
	for i := 0; len(first) < 16; i++ {
		sh := keyN(i)[0] % 16
		if _, ok := first[sh]; ok {
			continue
		}
		if !admit(keyN(i), entryFor(10, now, time.Hour)) {
			t.Fatalf("key %d not stored in an empty shard", i)
		}
		first[sh] = i
	}
	newcomer := -1
	for i := 1000; newcomer < 0; i++ {
		if keyN(i)[0]%16 == keyN(first[0])[0]%16 {
			newcomer = i
		}
	}
	if admit(keyN(newcomer), entryFor(10, now, time.Hour)) {
		t.Error("a key asked for once pushed an entry out of a full cache")
	}
	if c.get(keyN(first[0]), now) == nil {
		t.Error("the entry of the full shard was pushed out")
	}
	if !admit(keyN(newcomer), entryFor(10, now, time.Hour)) {
		t.Error("a key asked for the second time was not stored")
	}
	if c.get(keyN(newcomer), now) == nil || c.get(keyN(first[0]), now) != nil {
		t.Error("the second miss did not replace the least recently used entry")
	}
	if st := c.stats(); st.Unadmitted != 1 || st.Entries != 16 {
		t.Errorf("stats %+v, want 1 unadmitted and 16 entries", st)
	}
	// A flight with followers (put) always stores.
	if !c.put(keyN(newcomer+1), entryFor(10, now, time.Hour)) {
		t.Error("put refused an entry in a full cache")
	}
}

// The doorkeeper forgets after as many new keys as the cache holds, and
// holds few false positives before that.
func TestDoorkeeperForgetsAndRarelyErrs(t *testing.T) {
	d := newDoorkeeper(1000, 8)
	for i := range 999 {
		if d.seen(keyN(i)) {
			t.Logf("false positive at key %d", i)
		}
	}
	if !d.seen(keyN(5)) {
		t.Error("a recorded key is not seen")
	}
	falsePositives := 0
	for i := 100_000; i < 101_000; i++ {
		if d.seen(keyN(i)) {
			falsePositives++
		}
	}
	if falsePositives > 50 {
		t.Errorf("%d false positives in 1000 new keys", falsePositives)
	}
	// 1000 new keys since: cleared at least once.
	if d.seen(keyN(5)) && d.seen(keyN(6)) && d.seen(keyN(7)) {
		t.Error("the doorkeeper never forgets")
	}
}

// Under key churn (every URL asked for once) the cache must not fill its
// byte budget with copies past every use: a put drops the dead entries at
// the old end of its shard, so the cache holds what can still answer.
func TestPutDropsDeadEntriesBeforeTheBudgetFills(t *testing.T) {
	c := newMicroCache(10_000, 64<<20)
	start := time.Now()
	const n = 2000
	for i := range n {
		now := start.Add(time.Duration(i) * time.Millisecond)
		c.put(keyN(i), entryFor(16<<10, now, 50*time.Millisecond))
	}
	// At the end, entries of the last 50 ms are alive, and each shard may
	// keep the ones that died since its own last put: about 50 more.
	if st := c.stats(); st.Entries > 100 || st.Evictions != 0 {
		t.Errorf("after %d puts 1ms apart, each alive for 50ms: %+v; want at most 100 entries, no evictions", n, st)
	}
	if c.get(keyN(n-1), start.Add(n*time.Millisecond)) == nil {
		t.Error("the last entry, still fresh, is gone")
	}
}

// While the copies stored for lone requests go unread (an all-miss load),
// a key's first miss is not stored, even with room in the cache; its
// second is, and the third is a hit. Once such copies are read again, every
// first miss is stored again. A herd is stored whatever the mode.
func TestUnreadLoneCopiesLetOnlyKeysAskedForBeforeIn(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	var calls atomic.Int64
	upstream := func(w http.ResponseWriter, _ *http.Request) error {
		calls.Add(1)
		_, err := w.Write([]byte("ok"))
		return err
	}
	serve := func(path string) string {
		t.Helper()
		rec := httptest.NewRecorder()
		if err := e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil), upstream); err != nil || rec.Code != 200 || rec.Body.String() != "ok" {
			t.Fatalf("GET %s: %v, status %d, body %q", path, err, rec.Code, rec.Body)
		}
		return rec.Header().Get("Cache-Status")
	}
	stored := func(cs string) bool { return strings.Contains(cs, "stored") }
	hit := func(cs string) bool { return strings.Contains(cs, "; hit") }

	// A fresh cache stores the first miss: the second request is a hit.
	if cs := serve("/first"); !stored(cs) {
		t.Fatalf("first miss on a fresh cache: %q, want stored", cs)
	}
	if cs := serve("/first"); !hit(cs) {
		t.Fatalf("second request: %q, want a hit", cs)
	}

	// A window of keys asked for once: their copies go unread.
	for i := range loneWindow {
		serve("/once/" + strconv.Itoa(i))
	}
	before := calls.Load()
	if cs := serve("/new"); cs != "caddy-coalesce; fwd=uri-miss; fwd-status=200" {
		t.Errorf("first miss after a window of unread copies: %q, want a miss not stored", cs)
	}
	if cs := serve("/new"); !stored(cs) {
		t.Errorf("second miss of the key: %q, want stored", cs)
	}
	if cs := serve("/new"); !hit(cs) {
		t.Errorf("third request: %q, want a hit", cs)
	}
	if got := calls.Load() - before; got != 2 {
		t.Errorf("upstream calls for /new: %d, want 2", got)
	}
	if st := e.Stats().Cache; st.Unadmitted == 0 {
		t.Errorf("cache stats %+v: want the unstored first miss counted as unadmitted", st)
	}

	// A herd is stored on its first miss all the same.
	g := newGate(t)
	herdCalls := calls.Load()
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			rec := httptest.NewRecorder()
			_ = e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example/herd", nil), func(w http.ResponseWriter, r *http.Request) error {
				g.wait(r)
				return upstream(w, r)
			})
		})
	}
	waitFor(t, "a follower of /herd", func() bool { return e.Stats().Registry.Waiters == 1 })
	g.open()
	wg.Wait()
	if cs := serve("/herd"); !hit(cs) || calls.Load()-herdCalls != 1 {
		t.Errorf("after a herd of 2 on a new key: %q and %d upstream calls, want a hit after 1", cs, calls.Load()-herdCalls)
	}

	// Keys read again: each asked for three times (its second miss
	// stored, its third a hit). A window of such copies turns storing
	// every first miss back on.
	for i := range loneWindow {
		p := "/again/" + strconv.Itoa(i)
		serve(p)
		serve(p)
		serve(p)
	}
	if cs := serve("/fresh"); !stored(cs) {
		t.Errorf("first miss once copies are read again: %q, want stored", cs)
	}
}

// A lone leader's response that the cache would not keep goes to its client
// as it arrives: a request for the same key that comes once the header is
// out does not wait for the rest of the body.
func TestUnkeptLoneMissPassesThroughUnbuffered(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	quick := func(w http.ResponseWriter, _ *http.Request) error {
		_, err := w.Write([]byte("abcd"))
		return err
	}
	for i := range loneWindow { // lone copies that go unread
		if err := e.Serve(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "http://api.example/once/"+strconv.Itoa(i), nil), quick); err != nil {
			t.Fatal(err)
		}
	}
	g := newGate(t)
	headerOut := make(chan struct{})
	var calls atomic.Int64
	upstream := func(w http.ResponseWriter, r *http.Request) error {
		if calls.Add(1) > 1 {
			return quick(w, r)
		}
		w.Header().Set("Content-Length", "4")
		w.WriteHeader(http.StatusOK)
		_, _ = w.Write([]byte("ab"))
		_ = http.NewResponseController(w).Flush()
		close(headerOut)
		g.wait(r)
		_, err := w.Write([]byte("cd"))
		return err
	}
	first := httptest.NewRecorder()
	done := make(chan error, 1)
	go func() {
		done <- e.Serve(first, httptest.NewRequest(http.MethodGet, "http://api.example/slow", nil), upstream)
	}()
	<-headerOut
	second := httptest.NewRecorder()
	if err := e.Serve(second, httptest.NewRequest(http.MethodGet, "http://api.example/slow", nil), upstream); err != nil || second.Body.String() != "abcd" {
		t.Fatalf("second request while the first's body arrives: %v, body %q", err, second.Body)
	}
	select {
	case <-done:
		t.Fatal("the first request ended before its upstream finished the body")
	default:
	}
	g.open()
	if err := <-done; err != nil || first.Code != 200 || first.Body.String() != "abcd" {
		t.Fatalf("first request: %v, status %d, body %q", err, first.Code, first.Body)
	}
	if cs := first.Header().Get("Cache-Status"); cs != "caddy-coalesce; fwd=uri-miss; fwd-status=200" {
		t.Errorf("first request's Cache-Status %q, want a miss not stored", cs)
	}
	if n := calls.Load(); n != 2 {
		t.Errorf("%d upstream calls, want 2 (the second did not wait for the first)", n)
	}
	// The key has now been asked for: its copy was kept.
	if cs := second.Header().Get("Cache-Status"); !strings.Contains(cs, "stored") {
		t.Errorf("second request's Cache-Status %q, want stored", cs)
	}
	// A conditional request's answer is worked out from the response: it
	// is buffered, and a validator that matches is answered 304.
	cond := httptest.NewRequest(http.MethodGet, "http://api.example/tagged", nil)
	cond.Header.Set("If-None-Match", `"v1"`)
	rec := httptest.NewRecorder()
	err := e.Serve(rec, cond, func(w http.ResponseWriter, r *http.Request) error {
		if r.Header.Get("If-None-Match") != "" {
			t.Error("the client's validator went upstream")
		}
		w.Header().Set("Etag", `"v1"`)
		return quick(w, r)
	})
	if err != nil || rec.Code != http.StatusNotModified || rec.Body.Len() != 0 {
		t.Errorf("new key with a matching If-None-Match: %v, status %d, body %q; want 304", err, rec.Code, rec.Body)
	}
}

// A key that still has a copy in the cache is buffered whatever the
// doorkeeper says: its copy stands in for an upstream that fails mid-body
// (stale_if_error).
func TestLoneMissWithAStoredCopyIsBuffered(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.TTL, c.StaleIfError = 20*time.Millisecond, time.Minute })
	quick := func(w http.ResponseWriter, _ *http.Request) error {
		_, err := w.Write([]byte("good"))
		return err
	}
	get := func(path string, next Next) (*httptest.ResponseRecorder, error) {
		rec := httptest.NewRecorder()
		return rec, e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil), next)
	}
	if rec, err := get("/kept", quick); err != nil || !strings.Contains(rec.Header().Get("Cache-Status"), "stored") {
		t.Fatalf("first request: %v, %q", err, rec.Header().Get("Cache-Status"))
	}
	// Lone copies that go unread, then enough new keys for the doorkeeper
	// (cleared after max_entries new keys) to forget /kept.
	for i := range loneWindow + DefaultMaxEntries {
		if _, err := get("/once/"+strconv.Itoa(i), quick); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the copy of /kept to expire", func() bool {
		ent := e.cache.get(e.keys.derive(httptest.NewRequest(http.MethodGet, "http://api.example/kept", nil), http.MethodGet), time.Now())
		return ent != nil && !time.Now().Before(ent.fresh)
	})
	broken := func(w http.ResponseWriter, _ *http.Request) error {
		w.Header().Set("Content-Length", "10")
		_, _ = w.Write([]byte("ba"))
		return errors.New("upstream broke mid-body")
	}
	rec, err := get("/kept", broken)
	if err != nil || rec.Body.String() != "good" || !strings.Contains(rec.Header().Get("Cache-Status"), "stale-if-error") {
		t.Errorf("upstream broke mid-body with a copy stored: %v, body %q, Cache-Status %q; want the stale_if_error copy", err, rec.Body, rec.Header().Get("Cache-Status"))
	}
}

// While lone copies go unread, the cache stores them again for a window
// every loneRetry responses it kept out, to see whether the load changed.
func TestUnreadLoneCopiesAreTriedAgain(t *testing.T) {
	e := newEngine(t, func(c *Config) { c.TTL = time.Second })
	serve := func(path string) string {
		t.Helper()
		rec := httptest.NewRecorder()
		if err := e.Serve(rec, httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil), func(w http.ResponseWriter, _ *http.Request) error {
			_, err := w.Write([]byte("ok"))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return rec.Header().Get("Cache-Status")
	}
	for i := range loneWindow {
		serve("/once/" + strconv.Itoa(i))
	}
	if cs := serve("/new"); strings.Contains(cs, "stored") {
		t.Fatalf("first miss after a window of unread copies: %q, want not stored", cs)
	}
	// The doorkeeper's false positives store a few; the rest are kept out
	// until loneRetry of them have been.
	stored := 0
	i := 0
	for ; i < loneRetry*9/10; i++ {
		if strings.Contains(serve("/more/"+strconv.Itoa(i)), "stored") {
			stored++
		}
	}
	if stored > i/50 {
		t.Errorf("%d of %d first misses stored while copies went unread", stored, i)
	}
	// Around loneRetry kept out, every first miss is stored again, for a
	// window of loneWindow copies: a run of them, not a false positive.
	for run := 0; run < 8; i++ {
		if i == loneRetry*11/10 {
			t.Fatalf("no run of stored first misses after %d requests", i)
		}
		if strings.Contains(serve("/more/"+strconv.Itoa(i)), "stored") {
			run++
		} else {
			run = 0
		}
	}
	stored = 0
	for j := range 256 {
		if strings.Contains(serve("/after/"+strconv.Itoa(j)), "stored") {
			stored++
		}
	}
	if stored != 256 {
		t.Errorf("%d of the next 256 first misses stored, want all (tried again)", stored)
	}
}
