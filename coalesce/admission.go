package coalesce

// Admission: which responses the micro-cache lets in. While it has room and
// its lone copies are read, every storable one; otherwise only those of keys
// asked for before (a doorkeeper, which the hot-key view uses too), and a
// response it keeps out need not be buffered at all.

import (
	"encoding/binary"
	"sync/atomic"
)

// loneCopies tells whether the copies stored for lone leaders are read
// again, window by window of loneWindow such copies. While nearly none are
// (fewer than 1 in 16: an all-miss load of ids, crawlers or cache busting,
// where every miss would pay a store and push out an expired entry for
// nothing), the doorkeeper decides for lone responses even while the cache
// has room; once 1 in 8 are read again, every storable response is stored
// again. Lock-free, no goroutine.
type loneCopies struct {
	stored atomic.Int64 // in this window
	read   atomic.Int64 // first hits on lone copies, in this window
	unread atomic.Bool  // the last window's copies went (nearly) unread
	kept   atomic.Int64 // lone responses kept out since unread was set
}

const loneWindow = 1024

// keptOut counts a lone response the doorkeeper kept out while copies went
// unread. Every loneRetry of them, lone copies are stored again for a
// window, so that a load that changed (its keys asked for again, or only
// herds, which store no lone copy to end a window with) is seen.
func (l *loneCopies) keptOut() {
	if l.kept.Add(1)%loneRetry == 0 {
		l.unread.Store(false)
	}
}

const loneRetry = 16 * loneWindow

// storedOne counts a lone copy stored; the one that ends a window decides
// the next.
func (l *loneCopies) storedOne() {
	if l.stored.Add(1) != loneWindow {
		return
	}
	read := l.read.Swap(0)
	l.stored.Add(-loneWindow)
	if l.unread.Load() {
		l.unread.Store(read*8 < loneWindow)
	} else {
		l.unread.Store(read*16 < loneWindow)
	}
}

// hit tells the cache that e answered a request.
func (c *microCache) hit(e *entry) {
	if e.lone && !e.read.Load() && e.read.CompareAndSwap(false, true) {
		c.lone.read.Add(1)
	}
}

// admits decides whether a response of size bytes that only one client
// asked for (a lone leader) may be stored under k: while k's shard has room
// and lone copies are read again (loneCopies) it may, but otherwise only for
// a key asked for before, as TinyLFU's doorkeeper admits. Traffic of keys
// asked for once (ids, crawlers, cache busting) then costs no entry, no
// store and no eviction, and never pushes out entries that are asked for
// again. Every call records k, so that the key's next miss is stored. (Room
// may be taken between admits and put: then put evicts, as for a herd.)
func (c *microCache) admits(k Key, size int64) bool {
	if c.door.seen(k) {
		return true
	}
	if c.lone.unread.Load() {
		c.unadmitted.Add(1)
		c.lone.keptOut()
		return false
	}
	s := c.shard(k)
	s.mu.Lock()
	full := s.lru.Len() >= s.maxEntries || s.bytes+size > s.maxBytes
	if full && s.lru.Contains(k) {
		full = false // it replaces its own entry
	}
	s.mu.Unlock()
	if full {
		c.unadmitted.Add(1)
	}
	return !full
}

// passesLone decides, for a response only one client asked for, whether
// the cache would keep it out before it is buffered: while lone copies go
// unread, for a key not asked for before (recording k, as admits does).
func (c *microCache) passesLone(k Key) bool {
	if !c.lone.unread.Load() || c.holds(k) || c.door.seen(k) {
		return false
	}
	c.unadmitted.Add(1)
	c.lone.keptOut()
	return true
}

// mayPassLone reports, recording nothing, whether passesLone is likely to
// say yes for k.
func (c *microCache) mayPassLone(k Key) bool {
	return c.lone.unread.Load() && !c.door.has(k)
}

// holds reports whether an entry is stored under k, of any age: a copy that
// may stand in for a failure, or that a response must replace or remove.
func (c *microCache) holds(k Key) bool {
	s := c.shard(k)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lru.Contains(k)
}

// doorkeeper remembers, approximately, the keys asked for lately: a bloom
// filter with three bits per key (taken from the key, a SHA-256, so no
// hashing), eight bits per cache entry, cleared after as many new keys as
// the cache holds entries. A false positive stores a response once asked
// for; a clear costs each key one more miss. Lock-free, no goroutine.
type doorkeeper struct {
	words   []atomic.Uint64
	mask    uint64 // bit index mask
	added   atomic.Int64
	resetAt int64
}

// newDoorkeeper returns a doorkeeper cleared after entries new keys, with
// bitsPerKey bits per key it may hold.
func newDoorkeeper(entries, bitsPerKey int) *doorkeeper {
	bits := uint64(1) << 12
	for bits < uint64(bitsPerKey)*uint64(entries) && bits < 1<<27 {
		bits <<= 1
	}
	return &doorkeeper{words: make([]atomic.Uint64, bits/64), mask: bits - 1, resetAt: int64(max(entries, 64))}
}

// seen reports whether k was recorded since the last clear, and records it.
func (d *doorkeeper) seen(k Key) bool {
	return d.seenHashes(binary.LittleEndian.Uint64(k[8:]), binary.LittleEndian.Uint64(k[16:]), binary.LittleEndian.Uint64(k[24:]))
}

// has reports whether k was recorded since the last clear, recording
// nothing.
func (d *doorkeeper) has(k Key) bool {
	for _, h := range [...]uint64{binary.LittleEndian.Uint64(k[8:]), binary.LittleEndian.Uint64(k[16:]), binary.LittleEndian.Uint64(k[24:])} {
		bit := h & d.mask
		if d.words[bit/64].Load()&(uint64(1)<<(bit%64)) == 0 {
			return false
		}
	}
	return true
}

// seenHashes is seen for a key given by three independent hashes of it.
func (d *doorkeeper) seenHashes(hashes ...uint64) bool {
	present := true
	for _, h := range hashes {
		bit := h & d.mask
		w, b := &d.words[bit/64], uint64(1)<<(bit%64)
		if w.Load()&b == 0 {
			present = false
			w.Or(b)
		}
	}
	if !present && d.added.Add(1) == d.resetAt {
		// One caller reaches resetAt; concurrent records that the clear
		// wipes cost their keys one more miss.
		for i := range d.words {
			d.words[i].Store(0)
		}
		d.added.Add(-d.resetAt)
	}
	return present
}
