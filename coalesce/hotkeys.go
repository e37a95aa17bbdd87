package coalesce

import (
	"hash/maphash"
	"math"
	"math/bits"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"
	"unsafe"
)

// Hot keys: the requests asked for most right now, the way varnishtop shows
// them, so that the client behind a storm can be found although collapsing
// hides the storm from the upstream.
//
// Requests are counted by method, host and path (never the query, never the
// identity: the number of distinct identities is counted instead), over a
// sliding window: the current window's count plus the previous window's,
// weighted by how much of it still lies within one window of now. Each
// window is a Space-Saving summary of fixed capacity (Metwally et al.,
// 2005): a key not yet counted replaces the smallest counter and inherits
// its count, so memory is bounded whatever the key churn, every key whose
// count exceeds window/capacity is present, and a count overestimates by at
// most the replaced counter's count. The summaries are sharded by key so
// that requests for different keys rarely meet on a lock; a key lives in
// one shard, so a shard's summary is exact for its keys.
//
// Once a summary is full, a key takes a counter from it only at its second
// request among the last four times capacity new keys (a doorkeeper, as
// the micro-cache's): traffic of paths asked for once, which Space-Saving
// would write into the summary on every request, costs a few bits instead.
// The first request is then added to the count, not to the shares (hit,
// collapsed, stale, upstream) nor to the identities; a false positive of
// the doorkeeper (with 32 bits a key, under one in a thousand) counts one
// request too many.

// HotKeysConfig configures the hot-key view. The zero value means the
// documented defaults.
type HotKeysConfig struct {
	// Window is the span rates are measured over. 0: one minute.
	Window time.Duration
	// Capacity is the number of keys counted per window. 0: 1024.
	Capacity int
	// AlertRate: a key asked for more than this many times within Window
	// is reported (Hooks.HotKey), once per key per window. 0: no alert.
	AlertRate int
}

// Defaults of HotKeysConfig.
const (
	DefaultHotKeyWindow   = time.Minute
	DefaultHotKeyCapacity = 1024
	hotShards             = 8
)

func (c HotKeysConfig) window() time.Duration {
	if c.Window <= 0 {
		return DefaultHotKeyWindow
	}
	return c.Window
}

func (c HotKeysConfig) capacity() int {
	if c.Capacity <= 0 {
		return DefaultHotKeyCapacity
	}
	return c.Capacity
}

// HotKey is one row of the hot-key view.
type HotKey struct {
	Method string `json:"method"`
	Host   string `json:"host"`
	Path   string `json:"path"`
	// Requests and Upstream are per minute, measured over the window.
	Requests float64 `json:"requests_per_minute"`
	Upstream float64 `json:"upstream_per_minute"`
	// Shares of the requests answered from the micro-cache, by a leader's
	// response (collapsed) and by an expired copy (stale: while a refresh
	// runs, or standing in for a failed upstream).
	Hit       float64 `json:"hit_share"`
	Collapsed float64 `json:"collapsed_share"`
	Stale     float64 `json:"stale_share"`
	// Identities is the number of distinct identities (Authorization,
	// Cookie and identity headers; none counts as one) seen in the window,
	// estimated.
	Identities int `json:"identities"`
	// Count is the estimated number of requests within the window, and
	// Overcount the most it may exceed the true number by.
	Count     uint64 `json:"count"`
	Overcount uint64 `json:"overcount"`
}

// HotKeys counts requests per method, host and path; safe for concurrent
// use.
type HotKeys struct {
	window   time.Duration
	rate     uint64 // AlertRate
	epoch    time.Time
	identity []string
	seed     maphash.Seed
	shards   [hotShards]hotShard
	// door lets a key take a counter at its second request among the last
	// doorKeys new keys: under key churn (every request for another path)
	// the summaries are not rewritten on every request.
	door *doorkeeper
}

type hotShard struct {
	mu         sync.Mutex
	period     int64 // index of the current window since epoch
	cur, prev  hotSummary
	capacity   int
	labelBytes int64 // of the labels of both windows' counters
}

// hotSummary is one window's Space-Saving summary: counters indexed by key
// hash, and a min-heap on count to find the one to replace.
type hotSummary struct {
	index map[uint64]*hotCounter
	heap  []*hotCounter
}

type hotCounter struct {
	id                         uint64
	method, host, path         string
	count, overcount           uint64
	upstream, hit, coll, stale uint64
	prevCount                  uint64 // the key's count in the previous window when this one began
	unkinded                   uint64 // requests in count whose outcome was not recorded (the doorkeeper's)
	identities                 [16]uint64
	alerted                    bool
	pos                        int // in the heap
}

// NewHotKeys returns an empty view; identity names the request headers
// that identify a requester, besides Authorization and Cookie.
func NewHotKeys(cfg HotKeysConfig, identity []string) *HotKeys {
	h := &HotKeys{
		window:   cfg.window(),
		rate:     uint64(max(cfg.AlertRate, 0)),
		epoch:    time.Now(),
		identity: append(slices.Clone(DefaultIdentityHeaders), identity...),
		seed:     maphash.MakeSeed(),
		door:     newDoorkeeper(4*cfg.capacity(), 32),
	}
	per := max(1, cfg.capacity()/hotShards)
	for i := range h.shards {
		s := &h.shards[i]
		s.capacity = per
		s.cur.index = make(map[uint64]*hotCounter, per)
		s.prev.index = make(map[uint64]*hotCounter, per)
	}
	return h
}

// Record counts one request for r's method, host and path with its
// outcome, at now. When the request takes its key past the alert rate for
// the first time in the window, it returns the key's row and true.
func (h *HotKeys) Record(r *http.Request, ev Event, now time.Time) (HotKey, bool) {
	id := maphash.String(h.seed, r.URL.Path) ^ bits.RotateLeft64(maphash.String(h.seed, r.Host), 21) ^
		bits.RotateLeft64(maphash.String(h.seed, r.Method), 42)
	ident := uint64(0)
	for i, name := range h.identity {
		for _, v := range r.Header[name] {
			ident ^= bits.RotateLeft64(maphash.String(h.seed, v), i)
		}
	}

	s := &h.shards[id%hotShards]
	s.mu.Lock()
	period := h.periodOf(now)
	s.advance(period)
	c := s.cur.index[id]
	if c == nil {
		full := len(s.cur.heap) >= s.capacity
		if full && !h.door.seenHashes(id, bits.RotateLeft64(id, 21)*0x9e3779b97f4a7c15, bits.RotateLeft64(id, 42)*0xc2b2ae3d27d4eb4f) {
			// A key not asked for lately takes no counter from a full
			// summary yet.
			s.mu.Unlock()
			return HotKey{}, false
		}
		c = s.insert(id, r)
		if full {
			c.count++ // the request the doorkeeper let by, of no known kind
			c.unkinded++
		}
	}
	c.count++
	switch ev.Outcome {
	case OutcomeHit:
		c.hit++
	case OutcomeCollapsed:
		c.coll++
	case OutcomeStale, OutcomeStaleIfError:
		c.stale++
	}
	if ev.Upstream {
		c.upstream++
	}
	c.identities[(ident>>6)&15] |= 1 << (ident & 63)
	s.cur.fix(c.pos)
	var row HotKey
	alert := false
	if h.rate > 0 && !c.alerted {
		if h.estimate(c.count, c.prevCount, now, period) > float64(h.rate) {
			c.alerted = true
			row, alert = h.row(c, c.prevCount, now, period), true
		}
	}
	s.mu.Unlock()
	return row, alert
}

// periodOf is the index of the window that now falls in.
func (h *HotKeys) periodOf(now time.Time) int64 {
	return int64(now.Sub(h.epoch) / h.window)
}

// weight is how much of the previous window still counts at now.
func (h *HotKeys) weight(now time.Time, period int64) float64 {
	into := now.Sub(h.epoch) - time.Duration(period)*h.window
	return 1 - float64(into)/float64(h.window)
}

func (h *HotKeys) estimate(cur, prev uint64, now time.Time, period int64) float64 {
	return float64(cur) + float64(prev)*h.weight(now, period)
}

// row turns a counter (and its key's count in the previous window) into a
// row of the view.
func (h *HotKeys) row(c *hotCounter, prev uint64, now time.Time, period int64) HotKey {
	perMinute := float64(time.Minute) / float64(h.window)
	count := h.estimate(c.count, prev, now, period)
	k := HotKey{
		Method: c.method, Host: c.host, Path: c.path,
		Requests:   count * perMinute,
		Identities: distinct(c.identities),
		Count:      uint64(math.Round(count)),
		Overcount:  c.overcount,
	}
	if kinded := c.count - min(c.unkinded, c.count); kinded > 0 {
		// Shares and the upstream rate come from the current window, the
		// one with the outcomes.
		n := float64(kinded - min(c.overcount, kinded))
		if n > 0 {
			k.Hit, k.Collapsed, k.Stale = float64(c.hit)/n, float64(c.coll)/n, float64(c.stale)/n
		}
		k.Upstream = float64(c.upstream) * count / float64(kinded) * perMinute
	}
	return k
}

// distinct estimates the number of distinct values set in a 1024-bit
// bitmap by linear counting (ten identities share a bit with a chance of
// about 4 %, two bits with one of under 0.1 %).
func distinct(bm [16]uint64) int {
	set := 0
	for _, w := range bm {
		set += bits.OnesCount64(w)
	}
	if set == 0 {
		return 0
	}
	zeros := 1024 - set
	if zeros == 0 {
		zeros = 1 // saturated: a lower bound
	}
	return int(math.Round(-1024 * math.Log(float64(zeros)/1024)))
}

// advance moves the shard's windows to period.
func (s *hotShard) advance(period int64) {
	switch {
	case period == s.period:
		return
	case period == s.period+1:
		s.prev, s.cur = s.cur, s.prev
	default:
		s.prev.reset()
	}
	s.cur.reset()
	s.period = period
	s.labelBytes = 0
	for _, c := range s.prev.heap {
		s.labelBytes += int64(len(c.method) + len(c.host) + len(c.path))
	}
}

// insert adds a counter for id, replacing the smallest when full.
func (s *hotShard) insert(id uint64, r *http.Request) *hotCounter {
	var prev uint64
	if p := s.prev.index[id]; p != nil {
		prev = p.count
	}
	sum := &s.cur
	if len(sum.heap) < s.capacity {
		c := &hotCounter{id: id, prevCount: prev, pos: len(sum.heap)}
		c.label(r)
		sum.heap = append(sum.heap, c)
		sum.index[id] = c
		s.labelBytes += int64(len(c.method) + len(c.host) + len(c.path))
		sum.up(c.pos)
		return c
	}
	// Space-Saving: the new key takes the smallest counter over, with its
	// count as the possible overcount.
	c := sum.heap[0]
	delete(sum.index, c.id)
	s.labelBytes -= int64(len(c.method) + len(c.host) + len(c.path))
	// Most keys of a site share its host and method: the replaced
	// counter's copies are kept for them (label).
	*c = hotCounter{id: id, prevCount: prev, count: c.count, overcount: c.count, pos: 0, method: c.method, host: c.host}
	c.label(r)
	sum.index[id] = c
	s.labelBytes += int64(len(c.method) + len(c.host) + len(c.path))
	return c
}

// label copies the request's method, host and path into the counter (the
// request's own strings may share memory with the rest of it), keeping the
// counter's method and host when they are the request's.
func (c *hotCounter) label(r *http.Request) {
	c.method, c.host, c.path = cloneUnless(r.Method, c.method), cloneUnless(r.Host, c.host), strings.Clone(r.URL.Path)
}

// cloneUnless returns a copy of s, or had when it already holds s.
func cloneUnless(s, had string) string {
	if s == had {
		return had
	}
	return strings.Clone(s)
}

func (m *hotSummary) reset() {
	clear(m.index)
	clear(m.heap)
	m.heap = m.heap[:0]
}

// fix restores the heap after the counter at i grew.
func (m *hotSummary) fix(i int) {
	h := m.heap
	for {
		l := 2*i + 1
		if l >= len(h) {
			return
		}
		j := l
		if r := l + 1; r < len(h) && h[r].count < h[l].count {
			j = r
		}
		if h[i].count <= h[j].count {
			return
		}
		h[i], h[j] = h[j], h[i]
		h[i].pos, h[j].pos = i, j
		i = j
	}
}

// up restores the heap after a counter was appended at i.
func (m *hotSummary) up(i int) {
	h := m.heap
	for i > 0 {
		p := (i - 1) / 2
		if h[p].count <= h[i].count {
			return
		}
		h[i], h[p] = h[p], h[i]
		h[i].pos, h[p].pos = i, p
		i = p
	}
}

// Top returns up to limit keys with the highest request rate at now,
// highest first.
func (h *HotKeys) Top(limit int, now time.Time) []HotKey {
	var rows []HotKey
	period := h.periodOf(now)
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		s.advance(period)
		for _, c := range s.cur.heap {
			prev := uint64(0)
			if p := s.prev.index[c.id]; p != nil {
				prev = p.count
			}
			rows = append(rows, h.row(c, prev, now, period))
		}
		// Keys not asked for in this window still count for the part of
		// the previous one that lies within the window.
		for _, p := range s.prev.heap {
			if s.cur.index[p.id] == nil {
				row := h.row(&hotCounter{method: p.method, host: p.host, path: p.path, identities: p.identities}, p.count, now, period)
				if kinded := p.count - min(p.unkinded, p.count); kinded > 0 {
					row.Hit, row.Collapsed, row.Stale = ratio(p.hit, kinded), ratio(p.coll, kinded), ratio(p.stale, kinded)
					row.Upstream = float64(p.upstream) * float64(p.count) / float64(kinded) * h.weight(now, period) * float64(time.Minute) / float64(h.window)
				}
				if row.Requests > 0 {
					rows = append(rows, row)
				}
			}
		}
		s.mu.Unlock()
	}
	slices.SortFunc(rows, func(a, b HotKey) int {
		switch {
		case a.Requests > b.Requests:
			return -1
		case a.Requests < b.Requests:
			return 1
		}
		return 0
	})
	if limit >= 0 && len(rows) > limit {
		rows = rows[:limit]
	}
	return rows
}

func ratio(a, b uint64) float64 { return float64(a) / float64(b) }

// MemoryBytes estimates the memory the view holds: its counters, their
// labels and the indexes, for both windows.
func (h *HotKeys) MemoryBytes() int64 {
	const perCounter = int64(unsafe.Sizeof(hotCounter{})) + 8 /* heap slot */ + 48 /* map entry */
	var n int64
	for i := range h.shards {
		s := &h.shards[i]
		s.mu.Lock()
		n += int64(len(s.cur.heap)+len(s.prev.heap))*perCounter + s.labelBytes
		s.mu.Unlock()
	}
	return n
}
