package coalesce

import (
	"bufio"
	"bytes"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Fuzz targets for what an attacker controls: request fields that make the
// key, response fields that decide sharing and storing, and the conditions
// evaluated against a shared response. Seed corpora live in
// testdata/fuzz/<target>; CI runs each target for a few seconds
// (.ci/run).

// fuzzRequest builds a GET request from fuzzed parts, as a server would hand
// it to a handler (canonical header names).
func fuzzRequest(host, path, query string, headers ...string) *http.Request {
	r := &http.Request{
		Method: http.MethodGet,
		Host:   host,
		URL:    &url.URL{Path: path, RawQuery: query},
		Header: http.Header{},
	}
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header[http.CanonicalHeaderKey(headers[i])] = append(r.Header[http.CanonicalHeaderKey(headers[i])], headers[i+1])
	}
	return r
}

// FuzzKeyIdentity: requests that differ in who sends them never share a
// key; the same request always gets the same key; public ignores identity.
func FuzzKeyIdentity(f *testing.F) {
	f.Add("api.example", "/v1/sessions", "user=7", "Bearer a", "Bearer b", "sid=1", "sid=1", "k1", "gzip, br")
	f.Add("API.example:8443", "/a%2Fb", "a=1&b=2", "", "Bearer x", "", "", "", "")
	f.Add("h", "/", "", "sid=1", "", "", "sid=1", "x", "br;q=0")
	f.Add("h", "/x", "", "Basic Zm9vOmJhcg==", "Basic Zm9vOmJhcg==", "a=1; b=2", "a=1;b=2", "", "*")
	f.Fuzz(func(t *testing.T, host, path, query, authA, authB, cookieA, cookieB, apiKey, acceptEncoding string) {
		d := newKeyDeriver([]string{"X-Api-Key"}, false, []string{"X-Tenant"})
		pub := newKeyDeriver([]string{"X-Api-Key"}, true, []string{"X-Tenant"})
		mk := func(auth, cookie string) *http.Request {
			return fuzzRequest(host, path, query,
				"Authorization", auth, "Cookie", cookie, "X-Api-Key", apiKey, "Accept-Encoding", acceptEncoding)
		}
		a, b := mk(authA, cookieA), mk(authB, cookieB)
		ka := d.derive(a, http.MethodGet)

		if d.derive(mk(authA, cookieA), http.MethodGet) != ka || d.derive(a, http.MethodGet) != ka {
			t.Fatal("the same request has two keys")
		}
		sameIdentity := authA == authB && cookieA == cookieB
		if (d.derive(b, http.MethodGet) == ka) != sameIdentity {
			t.Fatalf("Authorization %q / %q, Cookie %q / %q: keys equal = %v", authA, authB, cookieA, cookieB, !sameIdentity)
		}
		// Swapping the two identity fields is another identity.
		if authA != cookieA && d.derive(mk(cookieA, authA), http.MethodGet) == ka {
			t.Fatal("Authorization and Cookie values swapped give the same key")
		}
		// A request without an identity header never shares with one that
		// has it, whatever its value (empty included).
		for _, name := range []string{"Authorization", "Cookie", "X-Api-Key"} {
			anon := mk(authA, cookieA)
			delete(anon.Header, name)
			if d.derive(anon, http.MethodGet) == ka {
				t.Fatalf("removing %s does not change the key", name)
			}
			if pub.derive(anon, http.MethodGet) != pub.derive(a, http.MethodGet) {
				t.Fatalf("public: removing %s changes the key", name)
			}
		}
		if !d.hasIdentity(a) || d.hasIdentity(fuzzRequest(host, path, query)) {
			t.Fatal("hasIdentity is wrong")
		}
		if pub.derive(b, http.MethodGet) != pub.derive(a, http.MethodGet) {
			t.Fatal("public: identity changes the key")
		}
		// Headers that rewrite a request elsewhere are keyed, public or not.
		for _, kd := range []*keyDeriver{d, pub} {
			base := kd.derive(a, http.MethodGet)
			for _, name := range append([]string{"X-Tenant"}, alwaysKeyed...) {
				r := mk(authA, cookieA)
				r.Header[name] = []string{apiKey}
				if kd.derive(r, http.MethodGet) == base {
					t.Fatalf("%s: %q does not change the key", name, apiKey)
				}
			}
		}
		if d.derive(a, http.MethodHead) == ka {
			t.Fatal("HEAD and GET share a key")
		}
		// Host case (ASCII, as in DNS) does not matter; anything else
		// about the host does.
		up := mk(authA, cookieA)
		upper := []byte(host)
		for i, c := range upper {
			if 'a' <= c && c <= 'z' {
				upper[i] = c - 'a' + 'A'
			}
		}
		up.Host = string(upper)
		if d.derive(up, http.MethodGet) != ka {
			t.Fatal("host case changes the key")
		}
		port := mk(authA, cookieA)
		port.Host = host + ":1"
		if d.derive(port, http.MethodGet) == ka {
			t.Fatal("a port in Host does not change the key")
		}
		// Path and query are compared as sent.
		q := mk(authA, cookieA)
		q.URL.RawQuery = query + "&"
		if d.derive(q, http.MethodGet) == ka {
			t.Fatal("a longer query gives the same key")
		}
		// "/p?" is another request target than "/p"; "/p?a" is "/p?a".
		fq := mk(authA, cookieA)
		fq.URL.ForceQuery = true
		if (d.derive(fq, http.MethodGet) == ka) != (query != "") {
			t.Fatalf("query %q with and without a forced '?': keys equal = %v", query, query == "")
		}
	})
}

// FuzzKeyWire parses raw requests as net/http does and runs everything the
// engine computes before it decides: no panic, and the identity a request
// carries is always part of its key.
func FuzzKeyWire(f *testing.F) {
	f.Add([]byte("GET /api/sessions?x=1 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer t\r\nCookie: sid=1\r\nAccept-Encoding: gzip\r\n\r\n"))
	f.Add([]byte("HEAD http://other/p HTTP/1.1\r\nHost: a\r\nX-Forwarded-Host: evil\r\nIf-None-Match: \"x\"\r\n\r\n"))
	f.Add([]byte("GET /x HTTP/1.1\r\nHost: A:80\r\nRange: bytes=0-1\r\nCache-Control: no-store\r\nAccept: text/event-stream\r\n\r\n"))
	f.Add([]byte("GET /%2e%2e/a;b?%00 HTTP/1.0\r\ncookie: a\r\ncookie: b\r\nPragma: no-cache\r\n\r\n"))
	f.Fuzz(func(t *testing.T, raw []byte) {
		r, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(raw)))
		if err != nil {
			return
		}
		d := newKeyDeriver([]string{"X-Api-Key"}, false, []string{"Accept-Language"})
		bypassReason(r)
		requestCacheControl(r.Header)
		k := d.derive(r, r.Method)
		d.derive(r, http.MethodGet)
		if d.derive(r, r.Method) != k {
			t.Fatal("the same request has two keys")
		}
		if d.hasIdentity(r) {
			anon := r.Clone(r.Context())
			for _, name := range d.identity {
				anon.Header.Del(name)
			}
			if d.derive(anon, r.Method) == k {
				t.Fatal("a request with identity shares a key with the same request without it")
			}
		}
	})
}

// isDeltaSeconds reports whether s is RFC 9111 delta-seconds (1*DIGIT).
func isDeltaSeconds(s string) bool {
	return s != "" && strings.Trim(s, "0123456789") == ""
}

// FuzzCacheControl: parsing never panics, lifetimes are never negative, and
// a directive that forbids storing or sharing always wins, wherever it is.
func FuzzCacheControl(f *testing.F) {
	for _, s := range [][2]string{
		{"max-age=60", ""},
		{"public, max-age=5, s-maxage=2", "must-revalidate"},
		{"max-age=0", "max-age=60"},
		{`no-cache="Set-Cookie, X-Foo", max-age=5`, ""},
		{"max-age=99999999999999999999999", "s-maxage=-1"},
		{"max-age=+5", "private"},
		{`max-age="30"`, "NO-STORE"},
		{"s-maxage=0, max-age=60", "immutable"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, line1, line2 string) {
		h := http.Header{"Cache-Control": {line1, line2}}
		cc := parseCacheControl(h)
		if cc.maxAge < -1 || cc.sMaxAge < -1 {
			t.Fatalf("negative lifetime: %+v", cc)
		}
		requestCacheControl(h)
		ok, limit, _ := storable(http.StatusOK, parseCacheControl(h))
		if limit < 0 || limit > (1<<31)*time.Second {
			t.Fatalf("lifetime %v out of range", limit)
		}
		if ok && (cc.noStore || cc.noCache) {
			t.Fatal("stored despite no-store / no-cache")
		}
		if !ok && !cc.noStore && !cc.noCache && cc.maxAge != 0 && cc.sMaxAge != 0 {
			t.Fatalf("not stored without a reason: %+v", cc)
		}
		if share, _ := shareable(http.StatusOK, h, parseCacheControl(h)); share == cc.private {
			t.Fatalf("shareable = %v with private = %v", share, cc.private)
		}
		// A lifetime that is zero, invalid or duplicated anywhere makes the
		// response stale (RFC 9111 §4.2.1), unless s-maxage, which a shared
		// cache uses first, allows it.
		for _, name := range []string{"max-age", "s-maxage"} {
			for _, extra := range []string{name + "=0", name + "=+5", name + "=-1", name + "=1x", name} {
				for _, lines := range [][]string{{extra, line1, line2}, {line1, line2, extra}, {line1 + "," + extra}} {
					h := http.Header{"Cache-Control": lines}
					ok, _, _ := storable(http.StatusOK, parseCacheControl(h))
					cc := parseCacheControl(h)
					if ok && (name == "s-maxage" || cc.sMaxAge <= 0) {
						t.Fatalf("Cache-Control %q is stored (%+v)", lines, cc)
					}
				}
			}
		}
		// A valid lifetime is read as written.
		if isDeltaSeconds(line2) && len(line2) < 10 {
			want, _ := strconv.Atoi(line2)
			if got := parseCacheControl(http.Header{"Cache-Control": {"max-age=" + line2}}).maxAge; got != want {
				t.Fatalf("max-age=%s read as %d", line2, got)
			}
		}
		for _, extra := range []string{"no-store", "NO-STORE", " no-cache ", "private"} {
			h := http.Header{"Cache-Control": {line1 + "," + extra, line2}}
			if ok, _, _ := storable(http.StatusOK, parseCacheControl(h)); ok && extra != "private" {
				t.Fatalf("%q then %q is stored", line1, extra)
			}
			if share, _ := shareable(http.StatusOK, h, parseCacheControl(h)); share && extra == "private" {
				t.Fatalf("%q then private is shared", line1)
			}
		}
	})
}

// FuzzVary: Vary parsing never panics or yields empty fields, a response
// always fits the request that produced it, a request that differs in a
// field the response varies on does not fit it, and `*` is never shared.
func FuzzVary(f *testing.F) {
	f.Add("Accept-Encoding", "accept-language, X-Client", "gzip", "en")
	f.Add("*", "", "", "")
	f.Add("Origin, *", ",,", "br;q=0, gzip", "fr")
	f.Add(" , cookie ", "Authorization", "x", "y")
	f.Fuzz(func(t *testing.T, vary1, vary2, v1, v2 string) {
		h := http.Header{"Vary": {vary1, vary2}}
		fields := varyFields(h)
		for _, fl := range fields {
			if fl == "" || strings.Contains(fl, ",") || fl != strings.TrimSpace(fl) {
				t.Fatalf("Vary %q %q gives field %q", vary1, vary2, fl)
			}
		}
		star := false
		for _, fl := range fields {
			star = star || fl == "*"
		}
		if share, _ := shareable(http.StatusOK, h, parseCacheControl(h)); share == star {
			t.Fatalf("Vary %q %q: shareable = %v", vary1, vary2, share)
		}
		req := fuzzRequest("h", "/", "")
		for _, fl := range fields {
			req.Header.Add(fl, v1)
			req.Header.Add(fl, v2)
		}
		resp := newResponse(http.StatusOK, h, nil, req)
		if !resp.matchesVary(req) || !resp.matchesVary(req.Clone(req.Context())) {
			t.Fatal("a response does not fit the request that produced it")
		}
		for _, fl := range fields {
			other := req.Clone(req.Context())
			other.Header.Set(fl, v1+"\x00other")
			if fl == "Accept-Encoding" {
				continue // compared by class: different bytes may be the same class
			}
			if resp.matchesVary(other) {
				t.Fatalf("a request with another %s fits a response that varies on it", fl)
			}
		}
	})
}

// FuzzConditional: a shared response written to one client. The client's
// conditions give 304 only when they match; a 304 and a HEAD have no body;
// otherwise the body is exactly the shared one with a matching
// Content-Length; Age is always a non-negative integer.
func FuzzConditional(f *testing.F) {
	f.Add(`"v1"`, "", `"v1"`, "", false, 200, []byte("body"), "", int64(3))
	f.Add(`W/"v1", "v2"`, "Mon, 02 Jan 2006 15:04:05 GMT", `W/"v2"`, "Mon, 02 Jan 2006 15:04:05 GMT", true, 200, []byte{}, "7", int64(0))
	f.Add("", "Mon, 02 Jan 2006 15:04:05 GMT", "", "Sun, 01 Jan 2006 15:04:05 GMT", false, 404, []byte("gone"), "x", int64(1))
	f.Add("*", "", `"a"`, "", false, 200, []byte("a"), "9223372036854775807", int64(5))
	f.Add(`"`, "garbage", `"`, "garbage", false, 204, []byte("no"), "-4", int64(2))
	f.Fuzz(func(t *testing.T, inm, ims, etag, lastModified string, head bool, status int, body []byte, upstreamAge string, ageSecs int64) {
		status = 200 + int(uint(status)%400) // a final status, as a response in hand has
		hdr := http.Header{"Content-Type": {"text/plain"}}
		if etag != "" {
			hdr.Set("Etag", etag)
		}
		if lastModified != "" {
			hdr.Set("Last-Modified", lastModified)
		}
		if upstreamAge != "" {
			hdr.Set("Age", upstreamAge)
		}
		req := fuzzRequest("h", "/", "")
		if head {
			req.Method = http.MethodHead
		}
		if inm != "" {
			req.Header.Set("If-None-Match", inm)
		}
		if ims != "" {
			req.Header.Set("If-Modified-Since", ims)
		}
		resp := newResponse(status, hdr, body, fuzzRequest("h", "/", ""))
		age := time.Duration(ageSecs%(1<<40)) * time.Second
		w := httptest.NewRecorder()
		resp.write(w, req, cacheStatus{hit: true}, age)
		got := w.Result()

		nm := notModified(req.Header, hdr)
		if got.StatusCode == http.StatusNotModified && status != http.StatusNotModified {
			if status != http.StatusOK || !nm || (inm == "" && ims == "") {
				t.Fatalf("304 for a %d response, notModified = %v", status, nm)
			}
			if w.Body.Len() != 0 || got.Header.Get("Content-Length") != "" {
				t.Fatal("a 304 with a body or a Content-Length")
			}
		} else if got.StatusCode != status {
			t.Fatalf("status %d written as %d", status, got.StatusCode)
		}
		if nm && inm != "" {
			if etag == "" {
				t.Fatal("If-None-Match matched a response without an ETag")
			}
			matched := false
			for _, tag := range strings.Split(inm, ",") {
				tag = strings.TrimSpace(tag)
				matched = matched || tag == "*" || strings.TrimPrefix(tag, "W/") == strings.TrimPrefix(etag, "W/")
			}
			if !matched {
				t.Fatalf("If-None-Match %q matched ETag %q", inm, etag)
			}
			if notModified(http.Header{"If-None-Match": {inm}}, hdr) != nm {
				t.Fatal("If-Modified-Since counted beside If-None-Match")
			}
		}
		switch {
		case head || got.StatusCode == http.StatusNotModified || !bodyAllowed(got.StatusCode):
			if w.Body.Len() != 0 {
				t.Fatalf("%d to a %s has a body", got.StatusCode, req.Method)
			}
		default:
			if !bytes.Equal(w.Body.Bytes(), body) {
				t.Fatal("the body written differs from the shared body")
			}
		}
		if cl := got.Header.Get("Content-Length"); cl != "" && bodyAllowed(got.StatusCode) && cl != strconv.Itoa(len(body)) {
			t.Fatalf("Content-Length %s for a body of %d", cl, len(body))
		}
		if a := got.Header.Get("Age"); age > 0 {
			if n, err := strconv.ParseInt(a, 10, 64); err != nil || n < 0 {
				t.Fatalf("Age %q (upstream %q, age %v) is not a non-negative integer", a, upstreamAge, age)
			}
		}
		if resp.Header.Get("Age") != upstreamAge || len(resp.Header["Cache-Status"]) != 0 {
			t.Fatal("writing to one client changed the shared response")
		}
	})
}
