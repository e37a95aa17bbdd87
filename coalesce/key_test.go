package coalesce

import (
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strings"
	"testing"
)

func keyOf(d *keyDeriver, r *http.Request) Key { return d.derive(r, r.Method) }

func getReq(target string, headers ...string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, target, nil)
	for i := 0; i+1 < len(headers); i += 2 {
		r.Header.Add(headers[i], headers[i+1])
	}
	return r
}

func TestSameRequestSameKey(t *testing.T) {
	d := newKeyDeriver(nil, false, []string{"X-Tenant"})
	a := getReq("http://api.example/v1/sessions?user=7", "Authorization", "Bearer abc", "X-Tenant", "t1", "Accept-Encoding", "gzip")
	b := getReq("http://api.example/v1/sessions?user=7", "Authorization", "Bearer abc", "X-Tenant", "t1", "Accept-Encoding", "gzip")
	if keyOf(d, a) != keyOf(d, b) {
		t.Fatal("two identical requests have different keys")
	}
	if keyOf(d, a) != keyOf(d, a) {
		t.Fatal("a request's key is not stable")
	}
}

func TestRequestsThatMayDifferHaveDifferentKeys(t *testing.T) {
	d := newKeyDeriver([]string{"X-Api-Key"}, false, []string{"X-Tenant"})
	base := func() *http.Request {
		return getReq("http://api.example/v1/sessions?user=7",
			"Authorization", "Bearer abc", "Cookie", "sid=1", "X-Api-Key", "k1", "X-Tenant", "t1")
	}
	baseKey := keyOf(d, base())
	cases := []struct {
		name   string
		change func(r *http.Request)
	}{
		{"authorization", func(r *http.Request) { r.Header.Set("Authorization", "Bearer xyz") }},
		{"no authorization", func(r *http.Request) { r.Header.Del("Authorization") }},
		{"cookie", func(r *http.Request) { r.Header.Set("Cookie", "sid=2") }},
		{"identity header", func(r *http.Request) { r.Header.Set("X-Api-Key", "k2") }},
		{"key header", func(r *http.Request) { r.Header.Set("X-Tenant", "t2") }},
		{"key header absent", func(r *http.Request) { r.Header.Del("X-Tenant") }},
		{"query", func(r *http.Request) { r.URL.RawQuery = "user=8" }},
		{"query order", func(r *http.Request) { r.URL.RawQuery = "user=7&a=1" }},
		{"path", func(r *http.Request) { r.URL.Path = "/v1/session" }},
		{"host", func(r *http.Request) { r.Host = "other.example" }},
		{"port", func(r *http.Request) { r.Host = "api.example:8080" }},
		{"scheme", func(r *http.Request) { r.TLS = &tls.ConnectionState{} }},
		{"method", func(r *http.Request) { r.Method = http.MethodHead }},
		{"accept-encoding class", func(r *http.Request) { r.Header.Set("Accept-Encoding", "gzip") }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := base()
			c.change(r)
			if keyOf(d, r) == baseKey {
				t.Errorf("changing the %s does not change the key", c.name)
			}
		})
	}
}

func TestHostIsCaseInsensitive(t *testing.T) {
	d := newKeyDeriver(nil, false, nil)
	a := getReq("http://API.Example/x")
	b := getReq("http://api.example/x")
	if keyOf(d, a) != keyOf(d, b) {
		t.Error("hosts differing only in case have different keys")
	}
}

func TestAcceptEncodingOrderAndWeightsShareAKey(t *testing.T) {
	d := newKeyDeriver(nil, false, nil)
	same := [][]string{
		{"gzip, br"},
		{"br, gzip"},
		{"br;q=0.5, gzip;q=1.0"},
		{"br", "gzip"},
		{"GZIP, Br, identity"},
		{"gzip, br, zstd;q=0"},
	}
	want := keyOf(d, getReq("http://a/x", "Accept-Encoding", "gzip, br"))
	for _, vs := range same {
		r := getReq("http://a/x")
		r.Header["Accept-Encoding"] = vs
		if keyOf(d, r) != want {
			t.Errorf("Accept-Encoding %q: key differs from %q", vs, "gzip, br")
		}
	}
	differ := []string{"gzip", "br", "gzip, br, zstd", "gzip, br, compress", ""}
	for _, v := range differ {
		r := getReq("http://a/x", "Accept-Encoding", v)
		if keyOf(d, r) == want {
			t.Errorf("Accept-Encoding %q shares the key of %q", v, "gzip, br")
		}
	}
}

func TestPublicLeavesIdentityOutOfTheKey(t *testing.T) {
	d := newKeyDeriver([]string{"X-Api-Key"}, true, nil)
	a := getReq("http://a/x", "Authorization", "Bearer 1", "Cookie", "sid=1", "X-Api-Key", "k1")
	b := getReq("http://a/x", "Authorization", "Bearer 2", "Cookie", "sid=2", "X-Api-Key", "k2")
	if keyOf(d, a) != keyOf(d, b) {
		t.Error("a public key still depends on the requester's identity")
	}
	if d.hasIdentity(a) {
		t.Error("a public deriver reports identity")
	}
	private := newKeyDeriver([]string{"X-Api-Key"}, false, nil)
	if !private.hasIdentity(getReq("http://a/x", "X-Api-Key", "k1")) {
		t.Error("a configured identity header is not seen as identity")
	}
	if private.hasIdentity(getReq("http://a/x")) {
		t.Error("a request without identity headers reports identity")
	}
}

func TestOverrideHeadersAreAlwaysKeyed(t *testing.T) {
	// Even on a public endpoint with no configured key headers.
	d := newKeyDeriver(nil, true, nil)
	base := keyOf(d, getReq("http://a/x"))
	for _, name := range []string{
		"X-HTTP-Method-Override", "X-Http-Method", "X-Method-Override",
		"X-Original-URL", "X-Rewrite-URL",
		"X-Forwarded-Host", "X-Forwarded-Proto", "X-Forwarded-Scheme", "Forwarded",
	} {
		r := getReq("http://a/x")
		r.Header.Set(name, "evil")
		if keyOf(d, r) == base {
			t.Errorf("%s does not change the key", name)
		}
	}
}

// Header values are length-prefixed: moving bytes from one field to the next
// never yields the same encoding.
func TestKeyFieldsDoNotRunTogether(t *testing.T) {
	d := newKeyDeriver(nil, false, []string{"X-A", "X-B"})
	a := getReq("http://a/x", "X-A", "ab", "X-B", "c")
	b := getReq("http://a/x", "X-A", "a", "X-B", "bc")
	if keyOf(d, a) == keyOf(d, b) {
		t.Error("X-A=ab,X-B=c and X-A=a,X-B=bc share a key")
	}
	c := getReq("http://a/x", "X-A", "a,b")
	e := getReq("http://a/x", "X-A", "a", "X-A", "b")
	if keyOf(d, c) == keyOf(d, e) {
		t.Error("one field line and two field lines share a key")
	}
}

func TestKeyStringIsShortHexWithoutSecrets(t *testing.T) {
	d := newKeyDeriver(nil, false, nil)
	secret := "Bearer sk_live_0123456789abcdef"
	k := keyOf(d, getReq("http://a/x", "Authorization", secret))
	s := k.String()
	if !regexp.MustCompile(`^[0-9a-f]{16}$`).MatchString(s) {
		t.Fatalf("Key.String() = %q, want 16 lower-case hex characters", s)
	}
	if strings.Contains(s, "0123456789abcdef") || strings.Contains(string(k[:]), "sk_live") {
		t.Errorf("key %q carries the secret", s)
	}
}

func TestEncodingClass(t *testing.T) {
	cases := map[string]string{
		"":                          "",
		"identity":                  "",
		"gzip":                      "gzip ",
		"x-gzip":                    "gzip ",
		"br;q=0, gzip":              "gzip ",
		"br;q=0.0, gzip;q=0.001":    "gzip ",
		"zstd, deflate, br, gzip":   "br deflate gzip zstd ",
		" gzip ;q=0.8 , br ; q=0.9": "br gzip ",
		// Codings this package does not know key by their own names,
		// lower-cased, sorted, once each, after the known ones.
		"gzip, compress":             "gzip ; compress",
		"x-compress, GZIP":           "gzip ; compress",
		"compress":                   "; compress",
		"*":                          "; *",
		"exi, compress, Exi;q=0.5":   "; compress exi",
		"exi;q=0, gzip":              "gzip ",
		"identity, *;q=0":            "",
		"br, *":                      "br ; *",
		"compress, gzip, *, exi, br": "br gzip ; * compress exi",
	}
	for in, want := range cases {
		h := http.Header{}
		if in != "" {
			h.Set("Accept-Encoding", in)
		}
		if got := encodingClass(h); got != want {
			t.Errorf("encodingClass(%q) = %q, want %q", in, got, want)
		}
	}
}

// A client can decode only the codings it names: requests naming different
// codings this package does not know never share a key or a Vary match, or
// one would receive a coding it cannot decode.
func TestUnknownCodingsNeverShareAKeyOrAVaryMatch(t *testing.T) {
	d := newKeyDeriver(nil, false, nil)
	distinct := []string{"compress", "*", "exi", "compress, exi", "gzip, compress", "gzip, *", "gzip"}
	keys := map[Key]string{}
	for _, v := range distinct {
		r := getReq("http://a/x", "Accept-Encoding", v)
		k := keyOf(d, r)
		if other, ok := keys[k]; ok {
			t.Errorf("Accept-Encoding %q shares its key with %q", v, other)
		}
		keys[k] = v
	}
	stored := newResponse(200, http.Header{"Vary": {"Accept-Encoding"}, "Content-Encoding": {"compress"}}, []byte("x"),
		getReq("http://a/x", "Accept-Encoding", "compress"))
	for _, v := range []string{"*", "exi", "gzip, exi"} {
		if stored.matchesVary(getReq("http://a/x", "Accept-Encoding", v)) {
			t.Errorf("a response for Accept-Encoding: compress matches the Vary of Accept-Encoding: %s", v)
		}
	}
	if !stored.matchesVary(getReq("http://a/x", "Accept-Encoding", "x-compress;q=0.5")) {
		t.Error("x-compress does not match compress (RFC 9110 §8.4.1.1: equivalent)")
	}
}

// The URL of a request, whoever asks and however: scheme, host (any case)
// and path; the query is left out (a write drops every query of a path).
func TestRequestURLIgnoresIdentityCodingsAndQuery(t *testing.T) {
	a := requestURL(getReq("http://API.example/list?x=1", "Authorization", "Bearer a", "Accept-Encoding", "gzip"))
	for _, same := range []*http.Request{getReq("http://api.example/list?x=1", "Cookie", "sid=b"), getReq("http://api.example/list"), getReq("http://api.example/list?y=2")} {
		if requestURL(same) != a {
			t.Errorf("%s: not the urlHash of http://api.example/list?x=1", same.URL)
		}
	}
	for _, other := range []string{"https://api.example/list", "http://api.example:8080/list", "http://api.example/list/", "http://api.example/List", "http://other.example/list"} {
		if requestURL(getReq(other)) == a {
			t.Errorf("%s has the urlHash of http://api.example/list", other)
		}
	}
}

func TestSameOriginURL(t *testing.T) {
	r := httptest.NewRequest(http.MethodPost, "http://api.example/items?x=1", nil)
	want := requestURL(getReq("http://api.example/items/7"))
	for _, ref := range []string{"/items/7", "items/7", "http://api.example/items/7", "HTTP://API.EXAMPLE/items/7", "//api.example/items/7", "/items/7?y=1"} {
		if u, ok := sameOriginURL(r, ref); !ok || u != want {
			t.Errorf("Location %q: %v %v, want the urlHash of http://api.example/items/7", ref, u, ok)
		}
	}
	for _, ref := range []string{"", "https://api.example/items/7", "http://evil.example/items/7", "http://api.example:81/items/7", "http://[::1", "mailto:a@b"} {
		if _, ok := sameOriginURL(r, ref); ok {
			t.Errorf("Location %q counts as same-origin", ref)
		}
	}
}

func TestWriteTargets(t *testing.T) {
	url := func(target string) urlHash { return requestURL(getReq(target)) }
	r := httptest.NewRequest(http.MethodDelete, "http://api.example/api/items/7?force=1", nil)
	h := http.Header{"Location": {"/api/archive/7"}, "Content-Location": {"http://elsewhere.example/x"}}
	got := writeTargets(r, h)
	for _, want := range []string{"http://api.example/api/items/7", "http://api.example/api/items", "http://api.example/api/items/?page=2", "http://api.example/api/archive/7"} {
		if !slices.Contains(got, url(want)) {
			t.Errorf("a DELETE of /api/items/7 does not invalidate %s", want)
		}
	}
	for _, not := range []string{"http://api.example/api", "http://api.example/api/items/8", "http://elsewhere.example/x"} {
		if slices.Contains(got, url(not)) {
			t.Errorf("a DELETE of /api/items/7 invalidates %s", not)
		}
	}
	for path, want := range map[string]string{"/items/7": "/items", "/items/7/": "/items", "/items": "", "/": "", "/a/b/c": "/a/b"} {
		if got := collectionOf(path); got != want {
			t.Errorf("collectionOf(%q) = %q, want %q", path, got, want)
		}
	}
}
