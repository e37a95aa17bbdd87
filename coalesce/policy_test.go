package coalesce

import (
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestBypassReasons(t *testing.T) {
	cases := []struct {
		name       string
		method     string
		body       string
		headers    []string
		detail     string
		wantDetail string
		wantFwd    string
	}{
		{name: "plain GET", method: "GET"},
		{name: "plain HEAD", method: "HEAD"},
		{name: "revalidation is not a bypass", method: "GET", headers: []string{"If-None-Match", `"v1"`, "If-Modified-Since", "Mon, 02 Jan 2006 15:04:05 GMT"}},
		{name: "request no-cache is not a bypass", method: "GET", headers: []string{"Cache-Control", "no-cache"}},
		{name: "POST", method: "POST", wantDetail: "method", wantFwd: "method"},
		{name: "DELETE", method: "DELETE", wantDetail: "method", wantFwd: "method"},
		{name: "OPTIONS", method: "OPTIONS", wantDetail: "method", wantFwd: "method"},
		{name: "websocket", method: "GET", headers: []string{"Connection", "keep-alive, Upgrade", "Upgrade", "websocket"}, wantDetail: "upgrade", wantFwd: "bypass"},
		{name: "connection upgrade alone", method: "GET", headers: []string{"Connection", "upgrade"}, wantDetail: "upgrade", wantFwd: "bypass"},
		{name: "range", method: "GET", headers: []string{"Range", "bytes=0-99"}, wantDetail: "range", wantFwd: "bypass"},
		{name: "event stream", method: "GET", headers: []string{"Accept", "text/event-stream"}, wantDetail: "event-stream", wantFwd: "bypass"},
		{name: "event stream with params", method: "GET", headers: []string{"Accept", "Text/Event-Stream; charset=utf-8; q=0.9"}, wantDetail: "event-stream", wantFwd: "bypass"},
		{name: "event stream in a list", method: "GET", headers: []string{"Accept", "application/json, text/event-stream;q=0.5"}, wantDetail: "event-stream", wantFwd: "bypass"},
		{name: "event stream on a second line", method: "GET", headers: []string{"Accept", "application/json", "Accept", "text/event-stream"}, wantDetail: "event-stream", wantFwd: "bypass"},
		{name: "request body", method: "GET", body: "{}", wantDetail: "request-body", wantFwd: "bypass"},
		{name: "chunked request body", method: "GET", headers: []string{"Transfer-Encoding", "chunked"}, wantDetail: "request-body", wantFwd: "bypass"},
		{name: "if-match", method: "GET", headers: []string{"If-Match", `"v1"`}, wantDetail: "precondition", wantFwd: "bypass"},
		{name: "if-unmodified-since", method: "GET", headers: []string{"If-Unmodified-Since", "Mon, 02 Jan 2006 15:04:05 GMT"}, wantDetail: "precondition", wantFwd: "bypass"},
		{name: "if-range", method: "GET", headers: []string{"If-Range", `"v1"`}, wantDetail: "precondition", wantFwd: "bypass"},
		{name: "request no-store", method: "GET", headers: []string{"Cache-Control", "max-age=0, No-Store"}, wantDetail: "no-store", wantFwd: "request"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := httptest.NewRequest(c.method, "http://a/x", strings.NewReader(c.body))
			if c.body == "" {
				r = httptest.NewRequest(c.method, "http://a/x", nil)
			}
			for i := 0; i+1 < len(c.headers); i += 2 {
				r.Header.Add(c.headers[i], c.headers[i+1])
			}
			detail, fwd := bypassReason(r)
			if detail != c.wantDetail || fwd != c.wantFwd {
				t.Errorf("bypassReason = (%q, %q), want (%q, %q)", detail, fwd, c.wantDetail, c.wantFwd)
			}
		})
	}
}

// Servers describe a request body's framing outside the header.
func TestBypassRequestBodyAsServersReportIt(t *testing.T) {
	cases := []struct {
		name          string
		proto         int
		contentLength int64
		te            []string
		want          string
	}{
		{"HTTP/1.1 chunked", 1, -1, []string{"chunked"}, "request-body"},
		{"HTTP/1.1 no body", 1, 0, nil, ""},
		{"HTTP/2 body of unknown length", 2, -1, nil, "request-body"},
		{"HTTP/2 with Content-Length", 2, 10, nil, "request-body"},
		{"HTTP/2 no body", 2, 0, nil, ""},
		// quic-go reports -1 for every request without Content-Length:
		// a body cannot be told from none.
		{"HTTP/3 without Content-Length", 3, -1, nil, ""},
	}
	for _, c := range cases {
		r := httptest.NewRequest(http.MethodGet, "http://a/x", nil)
		r.ProtoMajor, r.ContentLength, r.TransferEncoding = c.proto, c.contentLength, c.te
		if got, _ := bypassReason(r); got != c.want {
			t.Errorf("%s: bypassReason = %q, want %q", c.name, got, c.want)
		}
	}
}

func TestShareable(t *testing.T) {
	cases := []struct {
		name   string
		status int
		header http.Header
		ok     bool
		reason string
	}{
		{"plain 200", 200, http.Header{"Content-Type": {"application/json"}}, true, ""},
		{"404", 404, nil, true, ""},
		{"503 is shared with waiters", 503, nil, true, ""},
		{"public with max-age", 200, http.Header{"Cache-Control": {"public, max-age=60"}}, true, ""},
		{"no-store is still shareable with waiters", 200, http.Header{"Cache-Control": {"no-store"}}, true, ""},
		{"set-cookie", 200, http.Header{"Set-Cookie": {"sid=1"}}, false, "set-cookie"},
		{"private", 200, http.Header{"Cache-Control": {"max-age=10, Private"}}, false, "private"},
		{"private with fields", 200, http.Header{"Cache-Control": {`private="X-User"`}}, false, "private"},
		{"vary star", 200, http.Header{"Vary": {"Accept, *"}}, false, "vary-star"},
		{"vary fields", 200, http.Header{"Vary": {"Accept-Language"}}, true, ""},
		{"partial content", 206, nil, false, "status"},
		{"informational", 103, nil, false, "status"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ok, reason := shareable(c.status, c.header, parseCacheControl(c.header))
			if ok != c.ok || reason != c.reason {
				t.Errorf("shareable(%d, %v) = (%v, %q), want (%v, %q)", c.status, c.header, ok, reason, c.ok, c.reason)
			}
		})
	}
}

// The documented list of statuses kept in the micro-cache.
func TestStorableStatuses(t *testing.T) {
	want := []int{200, 203, 204, 300, 301, 308, 404, 405, 410, 414}
	for status := 100; status < 600; status++ {
		ok, _, _ := storable(status, parseCacheControl(http.Header{}))
		if ok != slices.Contains(want, status) {
			t.Errorf("storable(%d) = %v", status, ok)
		}
	}
}

func TestStorableHonoursTheOrigin(t *testing.T) {
	cases := []struct {
		cc     []string
		ok     bool
		limit  time.Duration
		reason string
	}{
		{nil, true, 0, ""},
		{[]string{"public"}, true, 0, ""},
		{[]string{"max-age=60"}, true, 60 * time.Second, ""},
		{[]string{"no-store"}, false, 0, "no-store"},
		{[]string{"no-cache"}, false, 0, "no-cache"},
		{[]string{`no-cache="Set-Cookie"`}, false, 0, "no-cache"},
		{[]string{"max-age=0"}, false, 0, "max-age=0"},
		{[]string{"s-maxage=0"}, false, 0, "s-maxage=0"},
		{[]string{"s-maxage=0, max-age=60"}, false, 0, "s-maxage=0"},
		// s-maxage is for shared caches and wins over max-age.
		{[]string{"max-age=0, s-maxage=5"}, true, 5 * time.Second, ""},
		{[]string{"max-age=60, s-maxage=2"}, true, 2 * time.Second, ""},
		{[]string{"max-age=2"}, true, 2 * time.Second, ""},
		{[]string{"max-age=1"}, true, time.Second, ""},
		// RFC 9111 §4.2.1: an invalid lifetime is stale.
		{[]string{"max-age=soon"}, false, 0, "max-age=0"},
		{[]string{"max-age=-5"}, false, 0, "max-age=0"},
		{[]string{"max-age"}, false, 0, "max-age=0"},
		// Overflow is the largest lifetime, not an error.
		{[]string{"max-age=99999999999999999999999"}, true, (1<<31 - 1) * time.Second, ""},
		{[]string{"max-age=60", "no-store"}, false, 0, "no-store"},
	}
	for _, c := range cases {
		h := http.Header{"Cache-Control": c.cc}
		ok, limit, reason := storable(200, parseCacheControl(h))
		if ok != c.ok || limit != c.limit || reason != c.reason {
			t.Errorf("storable(200, Cache-Control %q) = (%v, %v, %q), want (%v, %v, %q)", c.cc, ok, limit, reason, c.ok, c.limit, c.reason)
		}
	}
}

func TestParseCacheControl(t *testing.T) {
	cases := []struct {
		lines []string
		want  cacheControl
	}{
		{nil, cacheControl{maxAge: -1, sMaxAge: -1}},
		{[]string{"NO-STORE"}, cacheControl{noStore: true, maxAge: -1, sMaxAge: -1}},
		{[]string{"  no-cache ,  Private  "}, cacheControl{noCache: true, private: true, maxAge: -1, sMaxAge: -1}},
		{[]string{"public", "max-age=30"}, cacheControl{public: true, maxAge: 30, sMaxAge: -1, sharesAuthorized: true}},
		{[]string{`max-age="30"`}, cacheControl{maxAge: 30, sMaxAge: -1}},
		{[]string{"max-age = 30"}, cacheControl{maxAge: 30, sMaxAge: -1}},
		{[]string{"Max-Age=30, S-MaxAge=7"}, cacheControl{maxAge: 30, sMaxAge: 7, mustRevalidate: true, sharesAuthorized: true}},
		{[]string{"max-age=4294967296"}, cacheControl{maxAge: 4294967296, sMaxAge: -1}},
		{[]string{"max-age=999999999999999999999"}, cacheControl{maxAge: 1<<31 - 1, sMaxAge: -1}},
		{[]string{"max-age=1x"}, cacheControl{maxAge: 0, sMaxAge: -1}},
		{[]string{"immutable, stale-while-revalidate=60, must-revalidate"}, cacheControl{maxAge: -1, sMaxAge: -1, mustRevalidate: true, sharesAuthorized: true}},
		{[]string{"Proxy-Revalidate"}, cacheControl{maxAge: -1, sMaxAge: -1, mustRevalidate: true}},
		{[]string{",,", ""}, cacheControl{maxAge: -1, sMaxAge: -1}},
		// A quoted list inside no-cache does not hide the directives after it.
		{[]string{`no-cache="Set-Cookie, X-Foo", max-age=5`}, cacheControl{noCache: true, maxAge: 5, sMaxAge: -1}},
	}
	for _, c := range cases {
		got := parseCacheControl(http.Header{"Cache-Control": c.lines})
		if got != c.want {
			t.Errorf("parseCacheControl(%q) = %+v, want %+v", c.lines, got, c.want)
		}
	}
}

func TestRequestPragmaNoCache(t *testing.T) {
	if !requestCacheControl(http.Header{"Pragma": {"no-cache"}}).noCache {
		t.Error("Pragma: no-cache without Cache-Control is not no-cache")
	}
	// RFC 9111 §5.4: Cache-Control wins when both are present.
	if requestCacheControl(http.Header{"Pragma": {"no-cache"}, "Cache-Control": {"max-age=5"}}).noCache {
		t.Error("Pragma: no-cache overrides Cache-Control")
	}
}

// A browser's reload (Cache-Control: max-age=0) asks for what no stored
// copy can be: it is treated as no-cache.
func TestRequestMaxAgeZeroIsNoCache(t *testing.T) {
	for _, v := range []string{"max-age=0", "Max-Age=0", "max-age=00", "max-age=5, max-age=0", "max-age=soon"} {
		if !requestCacheControl(http.Header{"Cache-Control": {v}}).noCache {
			t.Errorf("request Cache-Control %q is not no-cache", v)
		}
	}
	for _, v := range []string{"max-age=1", "max-stale=0", "min-fresh=0", "s-maxage=0"} {
		if requestCacheControl(http.Header{"Cache-Control": {v}}).noCache {
			t.Errorf("request Cache-Control %q is no-cache", v)
		}
	}
}

func TestStreamingResponseTypes(t *testing.T) {
	cases := map[string]bool{
		"text/event-stream":                       true,
		"Text/Event-Stream; charset=utf-8":        true,
		"application/x-ndjson":                    true,
		"multipart/x-mixed-replace; boundary=foo": true,
		"application/grpc":                        true,
		"application/grpc+proto":                  true,
		"text/event-stream; charset=":             true, // malformed parameters still name the type
		"application/json":                        false,
		"text/html; charset=utf-8":                false,
		"":                                        false,
	}
	for ct, want := range cases {
		h := http.Header{}
		if ct != "" {
			h.Set("Content-Type", ct)
		}
		if got := streamingResponse(h); got != want {
			t.Errorf("streamingResponse(Content-Type %q) = %v, want %v", ct, got, want)
		}
	}
	if !streamingResponse(http.Header{"Incremental": {"?1"}}) {
		t.Error("Incremental: ?1 is not streamed")
	}
	if streamingResponse(http.Header{"Incremental": {"?0"}}) {
		t.Error("Incremental: ?0 is streamed")
	}
}

func TestVaryFieldsAndValues(t *testing.T) {
	h := http.Header{"Vary": {"accept-language, , X-Client-Version", "Accept-Encoding"}}
	got := varyFields(h)
	want := []string{"Accept-Language", "X-Client-Version", "Accept-Encoding"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("varyFields = %q, want %q", got, want)
	}
	if varyFields(http.Header{}) != nil {
		t.Error("no Vary yields fields")
	}

	req := http.Header{"Accept-Language": {"en", "fr"}, "Accept-Encoding": {"gzip, br"}}
	if v := varyValue(req, "Accept-Language"); v != "en,fr" {
		t.Errorf("varyValue(Accept-Language) = %q, want %q", v, "en,fr")
	}
	if v := varyValue(req, "X-Client-Version"); v != "" {
		t.Errorf("varyValue of an absent field = %q, want empty", v)
	}
	// Accept-Encoding is compared by class, as the key is.
	other := http.Header{"Accept-Encoding": {"br;q=0.9, gzip"}}
	if varyValue(req, "Accept-Encoding") != varyValue(other, "Accept-Encoding") {
		t.Error("Accept-Encoding of the same class varies")
	}
}

// RFC 9111 §4.2: lifetime from s-maxage, else max-age, else Expires − Date;
// current age from Age, the request's round trip and the apparent age.
func TestResponseFreshness(t *testing.T) {
	received := time.Date(2026, 12, 3, 8, 0, 0, 400_000_000, time.UTC)
	requested := received.Add(-100 * time.Millisecond)
	date := func(d time.Duration) string { return received.Truncate(time.Second).Add(d).Format(http.TimeFormat) }
	cases := []struct {
		name     string
		header   http.Header
		explicit bool
		left     time.Duration
	}{
		{"no lifetime", http.Header{}, false, math.MaxInt64},
		{"max-age", http.Header{"Cache-Control": {"max-age=60"}}, true, 60*time.Second - 100*time.Millisecond},
		{"s-maxage wins", http.Header{"Cache-Control": {"max-age=60, s-maxage=5"}}, true, 5*time.Second - 100*time.Millisecond},
		{"max-age with Age", http.Header{"Cache-Control": {"max-age=60"}, "Age": {"120"}}, true, -60*time.Second - 100*time.Millisecond},
		{"s-maxage with Age", http.Header{"Cache-Control": {"s-maxage=60, must-revalidate"}, "Age": {"3600"}}, true, -3540*time.Second - 100*time.Millisecond},
		{"max-age with a little Age", http.Header{"Cache-Control": {"max-age=60"}, "Age": {"10"}}, true, 50*time.Second - 100*time.Millisecond},
		{"invalid Age ignored", http.Header{"Cache-Control": {"max-age=60"}, "Age": {"-5"}}, true, 60*time.Second - 100*time.Millisecond},
		{"Expires minus Date", http.Header{"Date": {date(0)}, "Expires": {date(30 * time.Second)}}, true, 30*time.Second - 100*time.Millisecond},
		{"Expires 0", http.Header{"Date": {date(0)}, "Expires": {"0"}}, true, 0},
		{"Expires invalid", http.Header{"Expires": {"tomorrow"}}, true, 0},
		{"Expires at Date", http.Header{"Date": {date(0)}, "Expires": {date(0)}}, true, -100 * time.Millisecond},
		{"Expires before Date", http.Header{"Date": {date(0)}, "Expires": {date(-time.Hour)}}, true, -100 * time.Millisecond},
		{"max-age wins over Expires", http.Header{"Cache-Control": {"max-age=60"}, "Expires": {"0"}}, true, 60*time.Second - 100*time.Millisecond},
		// Without Date, the time it arrived stands in for it.
		{"Expires without Date", http.Header{"Expires": {received.Add(20 * time.Second).Format(http.TimeFormat)}}, true, 20*time.Second - 400*time.Millisecond - 100*time.Millisecond},
		// The apparent age: a response dated 90 s ago is 90 s old.
		{"Date long ago", http.Header{"Cache-Control": {"max-age=60"}, "Date": {date(-90 * time.Second)}}, true, -30 * time.Second},
		// An origin clock ahead of ours makes nothing younger than its Age.
		{"Date in the future", http.Header{"Cache-Control": {"max-age=60"}, "Date": {date(time.Hour)}, "Age": {"5"}}, true, 55*time.Second - 100*time.Millisecond},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			f := responseFreshness(c.header, parseCacheControl(c.header), requested, received)
			if f.explicit != c.explicit || f.left != c.left {
				t.Errorf("freshness = %+v, want explicit %v, left %v", f, c.explicit, c.left)
			}
		})
	}
}

func TestCacheControlThatSharesAnAuthorizedResponse(t *testing.T) {
	for cc, want := range map[string]bool{
		"public":                     true,
		"public, max-age=60":         true,
		"s-maxage=60":                true,
		"must-revalidate":            true,
		"max-age=60":                 false,
		"proxy-revalidate":           false,
		"no-cache":                   false,
		"":                           false,
		"public, private, max-age=5": false, // private wins
	} {
		h := http.Header{}
		if cc != "" {
			h.Set("Cache-Control", cc)
		}
		if ok, reason := shareableAuthorized(200, h, parseCacheControl(h)); ok != want {
			t.Errorf("Cache-Control %q: shareable for an Authorization request %v (%s), want %v", cc, ok, reason, want)
		}
	}
	h := http.Header{"Cache-Control": {"public"}, "Set-Cookie": {"a=b"}}
	if ok, reason := shareableAuthorized(200, h, parseCacheControl(h)); ok || reason != "set-cookie" {
		t.Errorf("public with Set-Cookie: %v %q, want not shared for set-cookie", ok, reason)
	}
}
