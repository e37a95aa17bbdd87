package coalesce

import (
	"errors"
	"math"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"time"
)

// bypassReason says why a request must go upstream on its own, untouched by
// the registry and the cache, or "" when it may be collapsed. The second
// value is the RFC 9211 fwd parameter to report.
func bypassReason(r *http.Request) (detail, fwd string) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return "method", "method"
	}
	h := r.Header
	switch {
	case fieldValue(h, "Upgrade") != "" || headerHasToken(h, "Connection", "upgrade"):
		return "upgrade", "bypass"
	case fieldValue(h, "Range") != "":
		// A 206 answers one client's range; sharing it would hand other
		// ranges (or a full GET) the wrong bytes.
		return "range", "bypass"
	case r.ContentLength > 0 || len(r.TransferEncoding) > 0 || len(h["Transfer-Encoding"]) > 0 ||
		(r.ContentLength < 0 && r.ProtoMajor == 2):
		// A body is not part of the key. A server hands a chunked HTTP/1.1
		// body over in r.TransferEncoding (not the header), and an HTTP/2
		// body without Content-Length as ContentLength -1. (HTTP/3 servers
		// report -1 for every request without Content-Length, body or not.)
		return "request-body", "bypass"
	case fieldValue(h, "If-Match") != "" || fieldValue(h, "If-Unmodified-Since") != "" || fieldValue(h, "If-Range") != "":
		// Preconditions other than revalidation are the origin's business.
		return "precondition", "bypass"
	case requestCacheControl(h).noStore:
		return "no-store", "request"
	case acceptsEventStream(h):
		// Last: a subscriber that any rule above sends on its own is not
		// fanned out either (fansOut).
		return "event-stream", "bypass"
	}
	return "", ""
}

// fieldValue is h.Get(name) for a name already in canonical form (every
// name in this package is a constant): the request path looks up a dozen
// fields, and h.Get would check and canonicalise each name on every call.
func fieldValue(h http.Header, name string) string {
	if v := h[name]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func acceptsEventStream(h http.Header) bool {
	for _, v := range h["Accept"] {
		for part := range strings.SplitSeq(v, ",") {
			mt, _, _ := strings.Cut(part, ";")
			if strings.EqualFold(strings.TrimSpace(mt), "text/event-stream") {
				return true
			}
		}
	}
	return false
}

// headerHasToken reports whether a comma-separated header contains token
// (case-insensitively).
func headerHasToken(h http.Header, name, token string) bool {
	for _, v := range h[name] {
		for part := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(part), token) {
				return true
			}
		}
	}
	return false
}

// cacheControl is the part of a Cache-Control header this package acts on.
type cacheControl struct {
	noStore, noCache, private, public bool
	maxAge, sMaxAge                   int // -1 when absent
	// mustRevalidate: must-revalidate, proxy-revalidate or s-maxage (which
	// implies proxy-revalidate for a shared cache): never served stale.
	mustRevalidate bool
	// sharesAuthorized: public, s-maxage or must-revalidate, the directives
	// that let a shared cache reuse a response to a request that carried
	// Authorization (RFC 9111 §3.5).
	sharesAuthorized bool
}

// parseCacheControl reads every Cache-Control field line. Unknown directives
// are ignored; a malformed max-age counts as 0 (RFC 9111 §4.2.1: treat an
// invalid freshness lifetime as stale).
func parseCacheControl(h http.Header) cacheControl {
	cc := cacheControl{maxAge: -1, sMaxAge: -1}
	for _, line := range h["Cache-Control"] {
		for part := range strings.SplitSeq(line, ",") {
			name, value, _ := strings.Cut(strings.TrimSpace(part), "=")
			name = strings.ToLower(strings.TrimSpace(name))
			value = strings.Trim(strings.TrimSpace(value), `"`)
			switch name {
			case "no-store":
				cc.noStore = true
			case "no-cache":
				// no-cache="field" only forbids reusing those fields without
				// revalidation; we do not rewrite responses, so treat it as
				// plain no-cache.
				cc.noCache = true
			case "private":
				cc.private = true
			case "public":
				cc.public = true
				cc.sharesAuthorized = true
			case "max-age":
				cc.maxAge = shorterLifetime(cc.maxAge, parseDeltaSeconds(value))
			case "s-maxage":
				cc.sMaxAge = shorterLifetime(cc.sMaxAge, parseDeltaSeconds(value))
				cc.mustRevalidate = true
				cc.sharesAuthorized = true
			case "must-revalidate":
				cc.mustRevalidate = true
				cc.sharesAuthorized = true
			case "proxy-revalidate":
				cc.mustRevalidate = true
			}
		}
	}
	return cc
}

// requestCacheControl reads a request's Cache-Control. noCache is set for
// what asks for a response no stored copy can give: no-cache, the HTTP/1.0
// Pragma: no-cache, and max-age=0 (what browsers send on a reload: no copy
// is zero seconds old, RFC 9111 §5.2.1.1).
func requestCacheControl(h http.Header) cacheControl {
	cc := parseCacheControl(h)
	if !cc.noCache && fieldValue(h, "Cache-Control") == "" && headerHasToken(h, "Pragma", "no-cache") {
		cc.noCache = true
	}
	if cc.maxAge == 0 {
		cc.noCache = true
	}
	return cc
}

// parseDeltaSeconds reads RFC 9111 delta-seconds (1*DIGIT); anything else
// (a sign, a space, a letter) is invalid and counts as 0.
func parseDeltaSeconds(s string) int {
	if s == "" || strings.Trim(s, "0123456789") != "" {
		return 0
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 1<<31 - 1 // overflow: RFC 9111 §1.2.2 says use 2^31
	}
	return n
}

// shorterLifetime merges a repeated max-age or s-maxage (-1: not seen yet).
// RFC 9111 §4.2.1 allows the first or treating the response as stale; the
// shorter one is never fresher than either, so a later max-age=60 cannot
// undo an earlier max-age=0.
func shorterLifetime(prev, n int) int {
	if prev < 0 {
		return n
	}
	return min(prev, n)
}

// shareable reports whether a response may be handed to other clients that
// sent the same request (collapsed followers, later cache hits). RFC 9111 §4
// lets a cache collapse only requests the response may be reused for.
func shareable(status int, h http.Header, cc cacheControl) (ok bool, reason string) {
	if len(h["Set-Cookie"]) > 0 {
		return false, "set-cookie"
	}
	if cc.private {
		return false, "private"
	}
	if headerHasToken(h, "Vary", "*") {
		return false, "vary-star"
	}
	if status == http.StatusPartialContent || status < 200 {
		return false, "status"
	}
	return true, ""
}

// detailAuthorization: under public, a response to a request with
// Authorization that did not say it may be shared.
const detailAuthorization = "authorization"

// shareableAuthorized is shareable for a response to a request that
// carried Authorization under `public` (where Authorization is not part of
// the key): RFC 9111 §3.5 lets a shared cache reuse such a response only
// when it says public, s-maxage or must-revalidate. Otherwise the response
// is its requester's alone.
func shareableAuthorized(status int, h http.Header, cc cacheControl) (ok bool, reason string) {
	if ok, reason := shareable(status, h, cc); !ok {
		return false, reason
	}
	if !cc.sharesAuthorized {
		return false, detailAuthorization
	}
	return true, ""
}

// storableStatuses are the final statuses kept in the micro-cache: those
// RFC 9110 §15.1 calls heuristically cacheable, less 206 (ranges are never
// collapsed) and 5xx (an error is shared with the requests waiting for it,
// but never kept).
var storableStatuses = map[int]bool{
	200: true, 203: true, 204: true,
	300: true, 301: true, 308: true,
	404: true, 405: true, 410: true, 414: true,
}

// storable reports whether a shareable response may be kept in the
// micro-cache, and the freshness it allows (0 = as configured).
func storable(status int, cc cacheControl) (ok bool, limit time.Duration, reason string) {
	if !storableStatuses[status] {
		return false, 0, "status"
	}
	switch {
	case cc.noStore:
		return false, 0, "no-store"
	case cc.noCache:
		return false, 0, "no-cache"
	case cc.sMaxAge == 0:
		return false, 0, "s-maxage=0"
	case cc.sMaxAge < 0 && cc.maxAge == 0:
		return false, 0, "max-age=0"
	}
	// An origin that allows less freshness than our TTL wins.
	secs := cc.sMaxAge
	if secs < 0 {
		secs = cc.maxAge
	}
	if secs > 0 {
		// RFC 9111 §1.2.2: a lifetime beyond 2^31 seconds counts as 2^31.
		limit = time.Duration(min(secs, 1<<31)) * time.Second
	}
	return true, limit, ""
}

// freshness is what RFC 9111 §4.2 says of a response as it arrived.
type freshness struct {
	// explicit: the origin gave a freshness lifetime (s-maxage, max-age or
	// Expires). Without one the configured ttl is the only lifetime (a
	// heuristic one, RFC 9111 §4.2.2).
	explicit bool
	// left is the lifetime less the response's current age on arrival; at
	// or below 0 the response arrived stale.
	left time.Duration
}

// responseFreshness computes a response's freshness as it arrived at
// received, for a request sent upstream at requested. The lifetime is
// s-maxage, else max-age, else Expires − Date (RFC 9111 §4.2.1); an invalid
// Expires (such as the HTTP/1.0 idiom "0") or one at or before Date means
// already expired. The current age (§4.2.3) is the larger of the upstream's
// Age plus the time the request took and the apparent age received − Date.
// Date has one-second resolution, so the apparent age is taken in whole
// seconds: a response dated this very second is 0 seconds old, not 0.9.
func responseFreshness(h http.Header, cc cacheControl, requested, received time.Time) freshness {
	hasExpires := len(h["Expires"]) > 0
	if cc.sMaxAge < 0 && cc.maxAge < 0 && !hasExpires {
		// No explicit lifetime (most API responses): nothing to parse.
		return freshness{left: math.MaxInt64}
	}
	date, dateErr := parseHTTPTime(fieldValue(h, "Date"))
	var lifetime time.Duration
	switch {
	case cc.sMaxAge >= 0:
		lifetime = lifetimeSeconds(cc.sMaxAge)
	case cc.maxAge >= 0:
		lifetime = lifetimeSeconds(cc.maxAge)
	default: // Expires
		expires, err := parseHTTPTime(fieldValue(h, "Expires"))
		if err != nil {
			return freshness{explicit: true} // invalid: already expired
		}
		base := received
		if dateErr == nil {
			base = date
		}
		lifetime = max(0, expires.Sub(base))
	}
	age := received.Sub(requested) + lifetimeSeconds(int(min(ageValue(h), 1<<31)))
	if dateErr == nil {
		// Date carries whole seconds: compare it with the whole second
		// the response arrived in.
		age = max(age, received.Truncate(time.Second).Sub(date))
	}
	return freshness{explicit: true, left: lifetime - max(age, 0)}
}

var errNoTime = errors.New("no HTTP date")

// parseHTTPTime is http.ParseTime without its three failed parses (and
// their errors' allocations) for an absent field.
func parseHTTPTime(v string) (time.Time, error) {
	if v == "" {
		return time.Time{}, errNoTime
	}
	return http.ParseTime(v)
}

// lifetimeSeconds converts delta-seconds; RFC 9111 §1.2.2: a lifetime
// beyond 2^31 seconds counts as 2^31.
func lifetimeSeconds(secs int) time.Duration {
	return time.Duration(min(secs, 1<<31)) * time.Second
}

// ageValue is a response's Age in seconds: 0 when absent or invalid (RFC
// 9111 §5.1: a non-negative integer), capped at 2^31.
func ageValue(h http.Header) int64 {
	v := fieldValue(h, "Age")
	if v == "" || strings.Trim(v, "0123456789") != "" {
		return 0
	}
	age, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return maxAge // overflow
	}
	return min(age, maxAge)
}

// streamingResponse reports whether a response must be streamed to the
// client as it arrives, never buffered.
func streamingResponse(h http.Header) bool {
	if ct := fieldValue(h, "Content-Type"); ct != "" {
		// Only the media type matters here, so the parameters are cut off
		// rather than parsed (mime.ParseMediaType allocates a map for them
		// on every response).
		mt, _, _ := strings.Cut(ct, ";")
		mt = strings.ToLower(strings.TrimSpace(mt))
		switch {
		case mt == "text/event-stream",
			mt == "application/x-ndjson",
			mt == "multipart/x-mixed-replace",
			strings.HasPrefix(mt, "application/grpc"):
			return true
		}
	}
	// RFC 10036: the origin asks intermediaries to forward incrementally.
	if v := fieldValue(h, "Incremental"); v == "?1" {
		return true
	}
	return false
}

// varyFields lists the request fields a response varies on, canonicalised.
func varyFields(h http.Header) []string {
	var fields []string
	for _, line := range h["Vary"] {
		for part := range strings.SplitSeq(line, ",") {
			if f := strings.TrimSpace(part); f != "" {
				fields = append(fields, textproto.CanonicalMIMEHeaderKey(f))
			}
		}
	}
	return fields
}

// varyValue is the value of a request field as compared for Vary. The
// Accept-Encoding class is compared rather than the raw header, since it is
// what the key already holds.
func varyValue(h http.Header, field string) string {
	if field == "Accept-Encoding" {
		return encodingClass(h)
	}
	return strings.Join(h.Values(field), ",")
}
