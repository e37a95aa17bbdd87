package coalesce

import (
	"crypto/sha256"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/registry"
	"github.com/hashicorp/golang-lru/v2/simplelru"
)

// Variant flights. A response that varies on request fields (Vary) answers
// only the followers whose request has the leader's values for them. The
// others gather in a flight of their own variant, keyed by the key and
// their values of those fields, instead of each going upstream alone; and
// the key remembers the fields for hit_for_miss, so that the next burst
// gathers by variant from the start rather than queueing behind a response
// it cannot use. The micro-cache keeps one variant per key, as before.

// variants remembers, per key, the request fields its responses vary on.
// Bounded like the cache; expiry checked on read. It learns only from a
// mismatch, so a key whose requests all agree (Vary: Accept-Encoding, whose
// class is in the key) costs it nothing.
type variants struct {
	n   atomic.Int64 // entries, so that the common case takes no lock
	mu  sync.RWMutex
	lru *simplelru.LRU[Key, variantFields]
}

type variantFields struct {
	fields []string
	until  time.Time
}

func newVariants(size int) *variants {
	v := &variants{}
	v.lru, _ = simplelru.NewLRU[Key, variantFields](max(size, 1), func(Key, variantFields) { v.n.Add(-1) })
	return v
}

// learn remembers until then that k's responses vary on fields.
func (v *variants) learn(k Key, fields []string, until time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if !v.lru.Contains(k) {
		v.n.Add(1)
	}
	v.lru.Add(k, variantFields{fields: fields, until: until})
}

// fields returns the fields k's responses vary on, or nil when not known
// at now. An expired entry is removed, so that once none is left the common
// case takes no lock again.
func (v *variants) fields(k Key, now time.Time) []string {
	if v.n.Load() == 0 {
		return nil
	}
	v.mu.RLock()
	vf, ok := v.lru.Peek(k)
	v.mu.RUnlock()
	if !ok {
		return nil
	}
	if !now.Before(vf.until) {
		v.mu.Lock()
		if vf, ok := v.lru.Peek(k); ok && !now.Before(vf.until) {
			v.lru.Remove(k)
		}
		v.mu.Unlock()
		return nil
	}
	return vf.fields
}

// variant is the key of r's variant of k: k and r's values of fields.
func (k Key) variant(r *http.Request, fields []string) Key {
	h := sha256.New()
	h.Write(k[:])
	for _, f := range fields {
		h.Write([]byte(f))
		h.Write([]byte{':'})
		h.Write([]byte(varyValue(r.Header, f)))
		h.Write([]byte{'\n'})
	}
	var v Key
	h.Sum(v[:0])
	return v
}

// flightKey is the key r's flight for k goes under: its variant's, when k's
// responses are known to vary on fields r may differ in.
func (e *Engine) flightKey(r *http.Request, k Key, now time.Time) Key {
	if fields := e.variants.fields(k, now); fields != nil {
		return k.variant(r, fields)
	}
	return k
}

// minVariantWait is the least of max_wait a follower must have left to
// wait again, in its variant's flight; with less it goes upstream alone.
const minVariantWait = 10 * time.Millisecond

// followVariant is a follower whose leader's response varies on a field in
// which its request differs: it learns the key's fields, and joins (or
// leads) the flight of its own variant, waiting there for what is left of
// max_wait. It goes upstream alone instead when it already followed a
// flight of its variant, when it is a HEAD (which never leads a GET's
// flight), when it carries Authorization under public (its answer may be
// its own: it must not lead others), or when little of max_wait is left.
func (e *Engine) followVariant(w http.ResponseWriter, r *http.Request, next Next, followed string, key Key, res *result, waited time.Duration) error {
	fields := res.resp.varyFields
	if e.cfg.HitForMiss > 0 {
		e.variants.learn(key, fields, time.Now().Add(e.cfg.HitForMiss))
	}
	left := time.Duration(0) // no bound
	if e.cfg.MaxWait > 0 {
		left = e.cfg.MaxWait - waited
	}
	if r.Method != http.MethodGet || followed != string(key[:]) || e.keys.authorizedUnderPublic(r) ||
		(e.cfg.MaxWait > 0 && left < minVariantWait) {
		return e.uncollapsible(w, r, next, key, detailVaryMismatch, fwdVaryMiss, res.admitted)
	}
	vk := key.variant(r, fields)
	f, role := e.reg.Join(r.Context(), string(vk[:]), flightNote{method: r.Method, path: r.URL.Path, base: &key})
	switch role {
	case registry.Follower:
		return e.followFor(w, r, next, f, key, fwdVaryMiss, left)
	case registry.Leader:
		return e.lead(w, r, next, f, key, fwdVaryMiss, res.admitted)
	default:
		return e.uncollapsible(w, r, next, key, detailVaryMismatch, fwdVaryMiss, res.admitted)
	}
}

// fleetKey is the key flight f of key asks the fleet under: its own, so
// that a variant's flight (variants.go) does not wait on another variant's
// fleet lock for an answer it cannot use.
func fleetKey(f *registry.Flight[*result], key Key) Key {
	if fk := f.Key(); fk != string(key[:]) && len(fk) == len(key) {
		copy(key[:], fk)
	}
	return key
}
