package coalesce

import (
	"net/http"
	"strconv"
	"sync"
	"time"
)

// CacheName is this cache's name in Cache-Status (RFC 9211).
const CacheName = "caddy-coalesce"

// Why a request went upstream: the fwd parameter of Cache-Status (RFC 9211
// §2.2).
const (
	fwdURIMiss  = "uri-miss"  // no usable copy
	fwdVaryMiss = "vary-miss" // a copy stored for a request that differs in a field the response varies on
	fwdStale    = "stale"     // the copy was stale
	fwdBypass   = "bypass"    // the request was not eligible, or the breaker answered
)

// cacheStatus is this cache's member of a response's Cache-Status field
// (RFC 9211). Its parameters are written in the order the RFC lists them.
type cacheStatus struct {
	hit       bool
	fwd       string
	fwdStatus int // the upstream's status; 0: not written
	// ttl is the freshness the copy has left, negative when it is stale;
	// written (in whole seconds) when withTTL is set.
	ttl     time.Duration
	withTTL bool
	stored  bool
	// collapsed: the response was shared with this request by its leader.
	collapsed bool
	detail    string
	// quoteDetail writes detail as a string even when it is a token.
	quoteDetail bool
	// detailTTL writes the ttl in milliseconds as the detail
	// (detail="ttl-ms=37"), the precision a micro-cache needs.
	detailTTL bool
}

// String is the member as sent, e.g. `caddy-coalesce; fwd=uri-miss; fwd-status=200; stored`.
func (cs cacheStatus) String() string {
	if cs.fwd == fwdURIMiss && cs.fwdStatus >= 200 && cs.fwdStatus < 600 &&
		cs == (cacheStatus{fwd: fwdURIMiss, fwdStatus: cs.fwdStatus, stored: cs.stored}) {
		return missStatuses()[cs.fwdStatus-200][b2i(cs.stored)]
	}
	var buf [128]byte
	return string(cs.append(buf[:0]))
}

// missStatuses are the members of a plain miss, stored or not, by the
// upstream's status from 200: what nearly every miss carries, built once
// rather than on every request.
var missStatuses = sync.OnceValue(func() *[400][2]string {
	var t [400][2]string
	for i := range t {
		for stored := range 2 {
			cs := cacheStatus{fwd: fwdURIMiss, fwdStatus: 200 + i, stored: stored == 1}
			t[i][stored] = string(cs.append(nil))
		}
	}
	return &t
})

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

func (cs cacheStatus) append(b []byte) []byte {
	b = append(b, CacheName...)
	if cs.hit {
		b = append(b, "; hit"...)
	}
	if cs.fwd != "" {
		b = append(b, "; fwd="...)
		b = append(b, cs.fwd...)
	}
	if cs.fwdStatus != 0 {
		b = append(b, "; fwd-status="...)
		b = strconv.AppendInt(b, int64(cs.fwdStatus), 10)
	}
	if cs.withTTL {
		b = append(b, "; ttl="...)
		b = strconv.AppendInt(b, ttlSeconds(cs.ttl), 10)
	}
	if cs.stored {
		b = append(b, "; stored"...)
	}
	if cs.collapsed {
		b = append(b, "; collapsed"...)
	}
	switch {
	case cs.detailTTL:
		b = append(b, `; detail="ttl-ms=`...)
		b = strconv.AppendInt(b, cs.ttl.Milliseconds(), 10)
		b = append(b, '"')
	case cs.detail != "":
		b = append(b, "; detail="...)
		b = appendDetail(b, cs.detail, cs.quoteDetail)
	}
	return b
}

// appendDetail writes d as a token when it is one (RFC 8941 §3.3.4) and
// quote is not set, else as a quoted string.
func appendDetail(b []byte, d string, quote bool) []byte {
	if !quote && isToken(d) {
		return append(b, d...)
	}
	b = append(b, '"')
	for i := 0; i < len(d); i++ {
		c := d[i]
		if c < 0x20 || c > 0x7e {
			continue // not allowed in a string
		}
		if c == '"' || c == '\\' {
			b = append(b, '\\')
		}
		b = append(b, c)
	}
	return append(b, '"')
}

func isToken(s string) bool {
	if s == "" || !(s[0] == '*' || s[0] >= 'a' && s[0] <= 'z' || s[0] >= 'A' && s[0] <= 'Z') {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(validFieldName(s[i:i+1]) || c == ':' || c == '/') {
			return false
		}
	}
	return true
}

// ttlSeconds is the Cache-Status ttl for a copy with left of its freshness
// lifetime left: whole seconds rounded down, so that a copy 0.3 s past its
// lifetime says -1 (stale), not 0 (RFC 9211 §2.5: negative when stale).
func ttlSeconds(left time.Duration) int64 {
	s := int64(left / time.Second)
	if left < 0 && left%time.Second != 0 {
		s--
	}
	return s
}

// ttlLeft is the freshness the entry has left at now. An entry at or past
// its freshness lifetime is stale: what is left is negative.
func (ent *entry) ttlLeft(now time.Time) time.Duration {
	left := ent.fresh.Sub(now)
	if !now.Before(ent.fresh) {
		left = min(left, -time.Nanosecond)
	}
	return left
}

// writeStale writes an entry that stands in for a failed upstream
// (stale_if_error); collapsed for a follower. Its ttl is negative even when
// the copy is still fresh (a no-cache request led, and its upstream
// failed): the answer is a stand-in, not a fresh response.
func (ent *entry) writeStale(w http.ResponseWriter, r *http.Request, collapsed bool, now time.Time) {
	cs := cacheStatus{fwd: fwdStale, ttl: min(ent.ttlLeft(now), -time.Nanosecond), withTTL: true, collapsed: collapsed, detail: detailStaleIfError}
	ent.resp.write(w, r, cs, now.Sub(ent.stored))
}

// Details of Cache-Status and of Event that more than one path gives.
const (
	detailBreakerOpen          = "breaker-open"
	detailStaleIfError         = "stale-if-error"
	detailStaleWhileRevalidate = "stale-while-revalidate"
	detailUpstreamError        = "upstream-error"
	detailAbandoned            = "abandoned"
	detailFlightMemory         = "flight-memory"
	// A lone leader's response that the cache would not keep went to its
	// client as it arrived (see flightRecorder.passes).
	detailLoneMiss      = "lone-miss"
	detailUncollapsible = "uncollapsible"
	detailVaryMismatch  = "vary-mismatch"
	// A follower of a refresh that Close cancelled went upstream alone.
	detailClosed = "closed"
)
