package coalesce

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"hash/maphash"
	"net/http"
	"net/textproto"
	"net/url"
	"slices"
	"strings"
	"sync"
)

// Key identifies requests that may share one response: a SHA-256 over the
// request's method, scheme, host, path, query, the requester's identity, the
// Accept-Encoding class and the configured headers. Hashing keeps
// credentials out of memory dumps and makes every key the same small size.
type Key [sha256.Size]byte

// authorized is the key under which requests for k that carry
// Authorization under public are marked to go upstream alone (see
// shareableAuthorized): k with its last byte inverted, as unlikely to meet
// another key as any two hashes.
func (k Key) authorized() Key {
	k[len(k)-1] ^= 0xff
	return k
}

// String is a short hex form, safe to log and to show in the admin API.
func (k Key) String() string { return hex.EncodeToString(k[:8]) }

// DefaultIdentityHeaders identify the requester: responses to requests with
// different values are never shared.
var DefaultIdentityHeaders = []string{"Authorization", "Cookie"}

// alwaysKeyed are request headers some origins or frameworks honour to
// rewrite the request (method overrides, rewritten URLs, forwarded hosts).
// They are always part of the key, so a request that carries one can never
// be answered with, or poison, the response to a request without it.
var alwaysKeyed = []string{
	"Forwarded",
	"X-Forwarded-Host",
	"X-Forwarded-Proto",
	"X-Forwarded-Scheme",
	"X-Original-Url",
	"X-Rewrite-Url",
	"X-Http-Method-Override",
	"X-Http-Method",
	"X-Method-Override",
	// Honoured for absolute URLs and redirects (Symfony, Spring, Express
	// behind proxies); Caddy passes them on untouched.
	"X-Forwarded-Port",
	"X-Forwarded-Prefix",
	"X-Forwarded-Server",
	"X-Host",
}

// keyDeriver derives keys; it is immutable after construction.
type keyDeriver struct {
	identity []string // canonical header names; empty when public
	headers  []string // canonical names of other keyed headers
	public   bool
}

func newKeyDeriver(identity []string, public bool, extra []string) *keyDeriver {
	k := &keyDeriver{public: public}
	seen := map[string]bool{}
	add := func(dst *[]string, names []string) {
		for _, n := range names {
			c := textproto.CanonicalMIMEHeaderKey(strings.TrimSpace(n))
			if c != "" && !seen[c] {
				seen[c] = true
				*dst = append(*dst, c)
			}
		}
	}
	if !public {
		add(&k.identity, DefaultIdentityHeaders)
		add(&k.identity, identity)
	}
	add(&k.headers, extra)
	add(&k.headers, alwaysKeyed)
	return k
}

var keyBufPool = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

// derive computes the key of r as if its method were method (HEAD requests
// also look up the GET key).
func (k *keyDeriver) derive(r *http.Request, method string) Key {
	bp := keyBufPool.Get().(*[]byte)
	b := (*bp)[:0]
	field := func(s string) {
		// Length-prefixed, so no two different field lists encode alike.
		b = binary.AppendUvarint(b, uint64(len(s)))
		b = append(b, s...)
	}
	field(method)
	if r.TLS != nil {
		field("https")
	} else {
		field("http")
	}
	field(lowerASCII(r.Host))
	field(r.URL.EscapedPath())
	// "/p?" and "/p" reach the upstream as different request targets.
	if r.URL.ForceQuery || r.URL.RawQuery != "" {
		field("?" + r.URL.RawQuery)
	} else {
		field("")
	}
	field(encodingClass(r.Header))
	for _, group := range [2][]string{k.identity, k.headers} {
		for _, name := range group {
			vs := r.Header[name]
			b = binary.AppendUvarint(b, uint64(len(vs)))
			for _, v := range vs {
				field(v)
			}
		}
	}
	sum := sha256.Sum256(b)
	*bp = b
	keyBufPool.Put(bp)
	return sum
}

// urlHash identifies the resource a URL names — scheme, host and path —
// whatever the query, the identity, the codings or the method of the
// requests for it. The cache indexes its keys by it, so that a write can
// drop every stored response for its target.
type urlHash uint64

// lowerASCII lower-cases the ASCII letters of s alone: host names compare
// case-insensitively in ASCII only (RFC 4343), and Unicode case mappings
// do not round-trip (ς, Σ, σ), so a Host in another case would key apart.
func lowerASCII(s string) string {
	for i := 0; i < len(s); i++ {
		if 'A' <= s[i] && s[i] <= 'Z' {
			b := []byte(s)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return s
}

// urlSeed is process-wide: hashes are compared only within one process.
var urlSeed = maphash.MakeSeed()

// hashURL hashes a URL's scheme, host (lower-cased) and escaped path.
func hashURL(https bool, host, escapedPath string) urlHash {
	var h maphash.Hash
	h.SetSeed(urlSeed)
	if https {
		h.WriteByte('s')
	} else {
		h.WriteByte('p')
	}
	for i := 0; i < len(host); i++ {
		c := host[i]
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		h.WriteByte(c)
	}
	h.WriteByte(0)
	h.WriteString(escapedPath)
	return urlHash(h.Sum64())
}

// requestURL is the urlHash of r's target.
func requestURL(r *http.Request) urlHash {
	return hashURL(r.TLS != nil, r.Host, r.URL.EscapedPath())
}

// writeTargets are the URLs whose stored responses a successful write r
// (answered with header h) makes out of date: its target (RFC 9111 §4.4),
// the same-origin targets of the answer's Location and Content-Location,
// and the collection the target belongs to (the path without its last
// segment: /items for /items/7, the list a client reads again after it
// changed an item). Each is a path, so every query of it goes too.
func writeTargets(r *http.Request, h http.Header) []urlHash {
	https := r.TLS != nil
	path := r.URL.EscapedPath()
	targets := make([]urlHash, 0, 5)
	targets = append(targets, hashURL(https, r.Host, path))
	if parent := collectionOf(path); parent != "" {
		targets = append(targets, hashURL(https, r.Host, parent), hashURL(https, r.Host, parent+"/"))
	}
	for _, name := range [2]string{"Location", "Content-Location"} {
		if u, ok := sameOriginURL(r, h.Get(name)); ok {
			targets = append(targets, u)
		}
	}
	return targets
}

// collectionOf is the path of the collection an item path belongs to, or
// "" for the root: /items for /items/7 and /items/7/.
func collectionOf(path string) string {
	p := strings.TrimSuffix(path, "/")
	i := strings.LastIndexByte(p, '/')
	if i <= 0 {
		return ""
	}
	return p[:i]
}

// sameOriginURL is the urlHash of ref (a Location or Content-Location
// value, absolute or relative) resolved against r's target, when it has r's
// scheme and host; RFC 9111 §4.4 invalidates only same-origin targets.
func sameOriginURL(r *http.Request, ref string) (urlHash, bool) {
	if ref == "" {
		return 0, false
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	base := &url.URL{Scheme: scheme, Host: r.Host, Path: r.URL.Path, RawPath: r.URL.RawPath}
	u, err := base.Parse(ref)
	if err != nil || !strings.EqualFold(u.Scheme, scheme) || !strings.EqualFold(u.Host, r.Host) {
		return 0, false
	}
	return hashURL(r.TLS != nil, r.Host, u.EscapedPath()), true
}

// authorizedUnderPublic reports whether r carries Authorization that its
// key leaves out (public): its response may answer other requests only
// when it says so (RFC 9111 §3.5, see shareableAuthorized).
func (k *keyDeriver) authorizedUnderPublic(r *http.Request) bool {
	return k.public && len(r.Header["Authorization"]) > 0
}

// hasIdentity reports whether r carries any identity header.
func (k *keyDeriver) hasIdentity(r *http.Request) bool {
	for _, name := range k.identity {
		if len(r.Header[name]) > 0 {
			return true
		}
	}
	return false
}

// encodingClass reduces Accept-Encoding to the set of content codings an
// upstream may choose from, so that clients listing the same codings in a
// different order or with different weights share one response. Only the
// codings named in encodingClasses are reduced to a class; any other coding
// (compress, exi, the wildcard *) is kept by its own lower-cased name after
// them, so that two clients share only if every coding they name is the
// same: a client never receives a coding it did not name.
func encodingClass(h http.Header) string {
	vs := h["Accept-Encoding"]
	if len(vs) == 0 {
		return ""
	}
	var class int
	var others []string
	for _, v := range vs {
		for part := range strings.SplitSeq(v, ",") {
			name, params, _ := strings.Cut(part, ";")
			if q := strings.TrimSpace(params); strings.HasPrefix(q, "q=0") && strings.Trim(q[3:], ".0") == "" {
				continue // q=0 means "not acceptable"
			}
			name = strings.TrimSpace(name)
			switch {
			case name == "" || strings.EqualFold(name, "identity"):
			case strings.EqualFold(name, "br"):
				class |= 1 << 0
			case strings.EqualFold(name, "deflate"):
				class |= 1 << 1
			case strings.EqualFold(name, "gzip") || strings.EqualFold(name, "x-gzip"):
				class |= 1 << 2
			case strings.EqualFold(name, "zstd"):
				class |= 1 << 3
			case strings.EqualFold(name, "compress") || strings.EqualFold(name, "x-compress"):
				// RFC 9110 §8.4.1.1: x-compress is compress.
				others = append(others, "compress")
			default:
				others = append(others, strings.ToLower(name))
			}
		}
	}
	if len(others) == 0 {
		return encodingClasses[class]
	}
	slices.Sort(others)
	others = slices.Compact(others)
	return encodingClasses[class] + "; " + strings.Join(others, " ")
}

// encodingClasses names every set of known codings once, so that computing
// a class on the hot path allocates nothing.
var encodingClasses = func() (names [16]string) {
	codings := [4]string{"br", "deflate", "gzip", "zstd"}
	for class := range names {
		for bit, name := range codings {
			if class&(1<<bit) != 0 {
				names[class] += name + " "
			}
		}
	}
	return names
}()
