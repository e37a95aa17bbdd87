package coalesce

import (
	"bytes"
	"context"
	"encoding/gob"
	"encoding/hex"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce/fleet"
)

// The shared tier (Config.Shared): a local leader, and only a local leader,
// asks the fleet before it goes upstream. A local hit never reaches here,
// and a local flight's followers wait for their leader as always, so N
// local requests for a key cost one conversation with Redis.

// Cache-Status details of answers the fleet gave.
const (
	detailSharedHit     = "shared-hit"     // a fresh entry another server stored
	detailFleetFollower = "fleet-follower" // the answer of another server's flight
	detailFleetLeader   = "fleet-leader"   // this flight went upstream for the fleet
)

// Outcomes of a local leader answered by the fleet.
const (
	OutcomeSharedHit     Outcome = "shared_hit"     // a fresh entry from the shared tier
	OutcomeFleetFollower Outcome = "fleet_follower" // the answer of another server's flight
)

// SharedStats describe the shared tier (nil in Stats without one).
type SharedStats = fleet.Stats

// sharedEntry is an entry as it is kept in Redis.
type sharedEntry struct {
	Status   int
	Header   http.Header
	Body     []byte
	FromHead bool
	// VaryFields and VaryValues: the request fields the response varies on
	// and the leader's values for them (never an identity: see shares).
	VaryFields, VaryValues []string
	// Unix nanoseconds of the leader's clock.
	Stored, Fresh, Stale, StaleIfError int64
	// Upstream answered the leader (host:port), so that an instance
	// answered from Redis learns where its requests go (see admit).
	Upstream string
	// DropServer: see Response.dropServer.
	DropServer bool
}

// fleetHold is how long a fleet leader's lock lasts: as long as its
// followers would wait for it, so that a leader that died holds nobody
// longer than that.
func (e *Engine) fleetHold() time.Duration {
	if e.cfg.MaxWait > 0 {
		return e.cfg.MaxWait
	}
	return DefaultMaxWait
}

// fleetWait is how long a local leader waits for another server's flight:
// half of max_wait, so that when it gives up there is time left for its own
// upstream request before its local followers give up on it.
func (e *Engine) fleetWait() time.Duration { return e.fleetHold() / 2 }

// askFleet is a local leader's conversation with the shared tier before it
// goes upstream for key. It returns the entry that answers the flight (a
// fresh shared entry, or the answer of another server's flight) with the
// Cache-Status detail saying which; or the fleet's leadership of key, which
// the caller finishes; or neither: the caller goes upstream on its own
// (no tier, Redis slow or down, the entry unusable for r, a fleet leader
// that gave no answer in time). fleetKey is what the fleet knows the
// flight by: key, or a variant's key (variants.go); a shared entry is kept
// locally under key.
func (e *Engine) askFleet(ctx context.Context, r *http.Request, key, fleetKey Key) (*entry, string, *fleet.Lock) {
	t := e.tier
	if t == nil {
		return nil, "", nil
	}
	began := time.Now()
	// The whole hash: a short one shared by two requests of the fleet
	// would hand one's answer to the other.
	hk := hex.EncodeToString(fleetKey[:])
	data, fresh, lock, err := t.Lookup(ctx, hk, e.fleetHold())
	if err != nil {
		return nil, "", nil
	}
	if data != nil {
		if ent := e.sharedCopy(data, r, began); ent != nil {
			if fresh && time.Now().Before(ent.fresh) {
				t.CountSharedHit()
				e.keepShared(key, ent)
				return ent, detailSharedHit, nil
			}
			// Kept for its stale windows: a stand-in should this flight fail.
			e.keepShared(key, ent)
		}
	}
	if lock != nil || fresh {
		return nil, "", lock
	}
	data, err = t.Wait(ctx, hk, e.fleetWait())
	if err != nil {
		return nil, "", nil
	}
	ent := e.sharedCopy(data, r, began)
	if ent == nil {
		return nil, "", nil
	}
	e.keepShared(key, ent)
	return ent, detailFleetFollower, nil
}

// keepShared stores a shared entry locally for what is left of its windows.
func (e *Engine) keepShared(key Key, ent *entry) {
	if e.cfg.TTL <= 0 && e.cfg.Stale <= 0 && e.cfg.StaleIfError <= 0 {
		return // collapse only
	}
	if time.Now().Before(ent.stale) || time.Now().Before(ent.staleIfError) {
		e.hitForMiss.clear(key)
		e.cache.put(key, ent)
	}
}

// shareFlight finishes the fleet's leadership of key after the flight
// stored its answer locally: the stored entry goes to Redis for its
// windows, and the fleet's followers are woken to read it. An answer not
// stored (or one that may not leave this server) wakes them to go upstream
// on their own.
func (e *Engine) shareFlight(lock *fleet.Lock, key Key, upstream string) {
	if lock == nil {
		return
	}
	var data []byte
	var fresh, keep time.Time
	if ent := e.cache.get(key, time.Now()); ent != nil && e.shares(ent.resp) {
		se := sharedEntry{
			Status: ent.resp.Status, Header: ent.resp.Header, Body: ent.resp.Body, FromHead: ent.resp.fromHead,
			VaryFields: ent.resp.varyFields, VaryValues: ent.resp.varyValues,
			Stored: ent.stored.UnixNano(), Fresh: ent.fresh.UnixNano(), Stale: ent.stale.UnixNano(), StaleIfError: ent.staleIfError.UnixNano(),
			Upstream: upstream, DropServer: ent.resp.dropServer,
		}
		var buf bytes.Buffer
		if gob.NewEncoder(&buf).Encode(&se) == nil {
			data, fresh = buf.Bytes(), ent.fresh
			keep = ent.fresh
			if ent.stale.After(keep) {
				keep = ent.stale
			}
			if ent.staleIfError.After(keep) {
				keep = ent.staleIfError
			}
		}
	}
	_ = lock.Finish(context.Background(), data, fresh, keep)
}

// shares reports whether a stored response may go to Redis. It was stored,
// so it is shareable and storable (docs/SECURITY.md); what is left out is a
// response that varies on a field carrying the requester's identity, whose
// values (the leader's credentials) would be written along.
func (e *Engine) shares(resp *Response) bool {
	for _, f := range resp.varyFields {
		switch f {
		case "Authorization", "Cookie", "Proxy-Authorization":
			return false
		}
		if slices.ContainsFunc(e.cfg.IdentityHeaders, func(h string) bool { return http.CanonicalHeaderKey(h) == f }) {
			return false
		}
	}
	return true
}

// sharedCopy decodes an entry read from Redis, or returns nil when it
// cannot be decoded or does not match r's Vary.
func (e *Engine) sharedCopy(data []byte, r *http.Request, began time.Time) *entry {
	var se sharedEntry
	if err := gob.NewDecoder(bytes.NewReader(data)).Decode(&se); err != nil {
		return nil
	}
	if len(se.VaryFields) != len(se.VaryValues) {
		return nil
	}
	if se.Header == nil {
		se.Header = http.Header{}
	}
	resp := &Response{Status: se.Status, Header: se.Header, Body: se.Body, fromHead: se.FromHead,
		varyFields: se.VaryFields, varyValues: se.VaryValues, cc: parseCacheControl(se.Header), dropServer: se.DropServer}
	if v := se.Header.Get("Age"); v != "" {
		if age, err := strconv.ParseInt(v, 10, 64); err == nil && age > 0 {
			resp.upstreamAge = min(age, maxAge)
		}
	}
	if !resp.matchesVary(r) {
		return nil
	}
	if e.guard != nil && se.Upstream != "" {
		// Requests of this handler go there too: without it, an instance
		// that has seen one of several upstreams answer guesses that one
		// for all of them, and refuses them all when its breaker opens.
		e.seen.saw(e.guard.breaker(se.Upstream), time.Now())
	}
	return &entry{resp: resp, url: requestURL(r), began: began,
		stored: time.Unix(0, se.Stored), fresh: time.Unix(0, se.Fresh),
		stale: time.Unix(0, se.Stale), staleIfError: time.Unix(0, se.StaleIfError), size: resp.size()}
}
