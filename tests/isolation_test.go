package tests

import (
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Isolation under load and cache poisoning: every response a client gets
// must be one the upstream would have given to that very request.

// trustingGlobalOptions are the harness's global options with 127.0.0.1
// trusted as a proxy, so that reverse_proxy passes a client's
// X-Forwarded-Host on instead of replacing it: the setup of a Caddy behind
// a CDN, where that header can poison a cache that does not key it.
func trustingGlobalOptions(t *testing.T) string {
	t.Helper()
	const anchor = "skip_install_trust\n"
	if !strings.Contains(globalOptions, anchor) {
		t.Fatalf("the harness's global options changed; cannot add trusted_proxies:\n%s", globalOptions)
	}
	return strings.Replace(globalOptions, anchor, anchor+"\tservers {\n\t\ttrusted_proxies static 127.0.0.1/32 ::1\n\t}\n", 1)
}

// startTrustingCaddy is startCaddy with trustingGlobalOptions.
func startTrustingCaddy(t *testing.T, site string, ups ...*upstream) {
	t.Helper()
	loadFirst(t, trustingGlobalOptions(t)+withUpstreams(site, ups), "caddyfile")
}

// fingerprint is what the echoing upstream says it was asked: the request
// as an origin framework would see it, honouring the override headers
// that frameworks honour, and the requester's identity.
func fingerprint(r *http.Request) string {
	method := r.Method
	if v := r.Header.Get("X-Http-Method-Override"); v != "" {
		method = "override:" + v
	}
	uri := r.URL.RequestURI()
	if v := r.Header.Get("X-Original-Url"); v != "" {
		uri = "original:" + v
	}
	host := r.Host
	if v := r.Header.Get("X-Forwarded-Host"); v != "" {
		host = v // reverse_proxy always sets it: the client's own Host, or a trusted client's value
	}
	if v := r.Header.Get("Forwarded"); v != "" {
		host = "forwarded:" + v
	}
	return fmt.Sprintf("m=%s h=%s u=%s a=%q c=%q v=%q",
		method, strings.ToLower(host), uri, r.Header.Values("Authorization"), r.Header.Values("Cookie"), r.Header.Get("X-Variant"))
}

// isolationUpstream answers by path:
//
//	/<prefix>/echo/N         the fingerprint (storable)
//	/<prefix>/vary/N         the fingerprint, Vary: X-Variant
//	/<prefix>/enc/N          the fingerprint, gzip-encoded when asked, Vary: Accept-Encoding
//	/<prefix>/cookie/N       the fingerprint and a Set-Cookie with a serial number
//	/<prefix>/private/N      the fingerprint, Cache-Control: private, a serial number
//	/<prefix>-pub/echo/N     the same public answer for everybody
//	/<prefix>-pub/cookie/N   a public answer with a Set-Cookie serial
//	/<prefix>-pub/private/N  a public answer, Cache-Control: private, a serial
//
// after a random delay of 0-9 ms. X-Fingerprint carries the fingerprint
// (or public answer), X-Serial the serial, for HEAD requests.
func isolationUpstream(t *testing.T) *upstream {
	var serial atomic.Int64
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(time.Duration(rand.IntN(10)) * time.Millisecond)
		parts := strings.Split(strings.TrimPrefix(r.URL.Path, "/"), "/")
		public := strings.HasSuffix(parts[0], "-pub")
		if len(parts) > 1 {
			parts = parts[1:]
		}
		body := fingerprint(r)
		if public {
			body = "public " + r.URL.RequestURI()
		}
		h := w.Header()
		h.Set("Content-Type", "text/plain")
		switch parts[0] {
		case "vary":
			h.Set("Vary", "X-Variant")
		case "enc":
			h.Set("Vary", "Accept-Encoding")
		case "cookie":
			n := strconv.FormatInt(serial.Add(1), 10)
			h.Set("Set-Cookie", "sid="+n+"; Path=/; HttpOnly")
			h.Set("X-Serial", n)
			body += " serial=" + n
		case "private":
			n := strconv.FormatInt(serial.Add(1), 10)
			h.Set("Cache-Control", "private")
			h.Set("X-Serial", n)
			body += " serial=" + n
		}
		h.Set("X-Fingerprint", body)
		out := []byte(body)
		if parts[0] == "enc" && strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
			var b bytes.Buffer
			zw := gzip.NewWriter(&b)
			_, _ = zw.Write(out)
			_ = zw.Close()
			out = b.Bytes()
			h.Set("Content-Encoding", "gzip")
		}
		h.Set("Content-Length", strconv.Itoa(len(out)))
		_, _ = w.Write(out)
	})
}

// isolationSite: a public zone for <prefix>-pub/, the default
// (identity-keyed) zone for everything else.
func isolationSite(prefix string) string {
	return fmt.Sprintf(`:%d {
	handle /warm {
		respond "warm" 200
	}
	handle %s-pub/* {
		coalesce {
			public
			ttl 1s
		}
		reverse_proxy {up}
	}
	handle {
		coalesce {
			ttl 1s
		}
		reverse_proxy {up}
	}
}
`, httpPort, prefix)
}

// identity is one requester of the isolation test: 0 is anonymous; the
// others send an Authorization, a Cookie or both, including values that
// another identity sends in the other field or shares in one field.
type identity struct{ auth, cookie string }

func identities(n int) []identity {
	ids := make([]identity, n)
	for i := 1; i < n; i++ {
		switch i % 8 {
		case 1, 5:
			ids[i].auth = fmt.Sprintf("Bearer tok-%d", i)
		case 2, 6:
			ids[i].cookie = fmt.Sprintf("sid=%d", i)
		case 3, 7:
			ids[i] = identity{auth: fmt.Sprintf("Bearer tok-%d", i), cookie: fmt.Sprintf("sid=%d", i)}
		case 0:
			ids[i].auth = fmt.Sprintf("sid=%d", i-6) // identity i-6's Cookie, as an Authorization
		case 4:
			ids[i] = identity{auth: fmt.Sprintf("Bearer tok-%d", i-3), cookie: "theme=dark"} // identity i-3's token, and a cookie
		}
	}
	return ids
}

func (id identity) headers() []string {
	var h []string
	if id.auth != "" {
		h = append(h, "Authorization: "+id.auth)
	}
	if id.cookie != "" {
		h = append(h, "Cookie: "+id.cookie)
	}
	return h
}

func (id identity) values() (auth, cookie []string) {
	if id.auth != "" {
		auth = []string{id.auth}
	}
	if id.cookie != "" {
		cookie = []string{id.cookie}
	}
	return auth, cookie
}

// isolationRequests is how many requests TestIsolationUnderLoad sends:
// COALESCE_ISOLATION_REQUESTS, or 100 000 (10 000 with -short).
func isolationRequests(t *testing.T) int {
	if v := os.Getenv("COALESCE_ISOLATION_REQUESTS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("COALESCE_ISOLATION_REQUESTS=%q is not a positive number", v)
		}
		return n
	}
	if testing.Short() {
		return 10_000
	}
	return 100_000
}

// isolationTally counts what the clients of the isolation test saw.
type isolationTally struct {
	mu        sync.Mutex
	requests  int
	failed    int
	leaks     int
	cookies   map[string]int // Set-Cookie value -> responses that carried it
	serials   map[string]int // X-Serial of private/cookie responses -> responses
	outcomes  map[string]int
	examples  []string
	maxFailed []string
}

func (t *isolationTally) leak(format string, args ...any) {
	t.leaks++
	if len(t.examples) < 10 {
		t.examples = append(t.examples, fmt.Sprintf(format, args...))
	}
}

func TestIsolationUnderLoad(t *testing.T) {
	total := isolationRequests(t)
	const workers, paths = 64, 4
	up := isolationUpstream(t)
	prefix := pathFor(t, "")
	startCaddy(t, isolationSite(prefix), up, up)
	client := newClient(t)
	warm(t, client, workers)
	ids := identities(50)

	endpoints := []struct {
		path   string
		weight int
	}{
		{"/echo/", 40}, {"/vary/", 10}, {"/enc/", 10}, {"/cookie/", 12}, {"/private/", 10},
		{"-pub/echo/", 8}, {"-pub/cookie/", 5}, {"-pub/private/", 5},
	}
	weights := 0
	for _, e := range endpoints {
		weights += e.weight
	}
	pick := func(rng *rand.Rand) string {
		n := rng.IntN(weights)
		for _, e := range endpoints {
			if n < e.weight {
				return e.path
			}
			n -= e.weight
		}
		panic("unreachable")
	}

	tally := &isolationTally{cookies: map[string]int{}, serials: map[string]int{}, outcomes: map[string]int{}}
	var next atomic.Int64
	start := time.Now()
	deadline := start.Add(8 * time.Minute) // a hard bound, far above what the run needs
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 42))
			for next.Add(1) <= int64(total) && time.Now().Before(deadline) {
				// Some identities are much busier than others, as in life:
				// their requests meet in flight and in the cache.
				id := ids[rng.IntN(1+rng.IntN(len(ids)))]
				ep := pick(rng)
				path := prefix + ep + strconv.Itoa(rng.IntN(paths))
				method := "GET"
				if rng.IntN(10) == 0 {
					method = "HEAD"
				}
				headers := id.headers()
				variant := ""
				if ep == "/vary/" {
					variant = strconv.Itoa(rng.IntN(3))
					headers = append(headers, "X-Variant: "+variant)
				}
				gz := ep == "/enc/" && rng.IntN(2) == 0
				if gz {
					headers = append(headers, "Accept-Encoding: gzip")
				}
				if rng.IntN(20) == 0 {
					time.Sleep(time.Duration(rng.IntN(2000)) * time.Microsecond)
				}
				f := get(client, method, baseURL+path, headers...)
				tally.check(id, method, path, strings.HasPrefix(ep, "-pub/"), variant, gz, f)
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)

	tally.mu.Lock()
	defer tally.mu.Unlock()
	sharedCookies, sharedSerials := 0, 0
	for _, n := range tally.cookies {
		if n > 1 {
			sharedCookies++
		}
	}
	for _, n := range tally.serials {
		if n > 1 {
			sharedSerials++
		}
	}
	t.Logf("isolation: %d requests from %d identities by %d workers in %s (%.0f req/s); %d upstream calls; outcomes %v",
		tally.requests, len(ids), workers, took.Round(time.Millisecond), float64(tally.requests)/took.Seconds(), up.Calls(), tally.outcomes)
	t.Logf("isolation: %d responses to the wrong request, %d Set-Cookie values seen by more than one client (of %d), %d private/cookie responses seen twice, %d failed requests",
		tally.leaks, sharedCookies, len(tally.cookies), sharedSerials, tally.failed)
	for _, e := range tally.examples {
		t.Error(e)
	}
	for _, e := range tally.maxFailed {
		t.Error(e)
	}
	if tally.requests < total {
		t.Errorf("only %d of %d requests were sent within the time bound", tally.requests, total)
	}
	if tally.leaks != 0 || sharedCookies != 0 || sharedSerials != 0 || tally.failed != 0 {
		t.Errorf("want no leak, no shared Set-Cookie, no shared private response, no failure")
	}
	if tally.outcomes["hit"]+tally.outcomes["collapsed"] == 0 {
		t.Error("nothing was shared at all: the test did not exercise collapsing")
	}
}

// check compares one response with what the upstream gives to that request.
func (t *isolationTally) check(id identity, method, path string, public bool, variant string, gz bool, f fetched) {
	auth, cookie := id.values()
	var wantFP string
	if public {
		wantFP = "public " + path
	} else {
		req := &http.Request{Method: method, Host: fmt.Sprintf("localhost:%d", httpPort), Header: http.Header{}}
		req.URL, _ = url.Parse(path)
		if len(auth) > 0 {
			req.Header["Authorization"] = auth
		}
		if len(cookie) > 0 {
			req.Header["Cookie"] = cookie
		}
		if variant != "" {
			req.Header.Set("X-Variant", variant)
		}
		wantFP = fingerprint(req)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	t.requests++
	if f.err != nil || f.status != http.StatusOK {
		t.failed++
		if len(t.maxFailed) < 5 {
			t.maxFailed = append(t.maxFailed, fmt.Sprintf("%s %s (%v): %d, err %v, Cache-Status %q", method, path, id, f.status, f.err, f.cacheStatus()))
		}
		return
	}
	for _, member := range []string{"hit", "collapsed", "stored", "uncollapsible", "set-cookie", "private", "vary-miss"} {
		if strings.Contains(f.cacheStatus(), member) {
			t.outcomes[member]++
		}
	}
	// The header fingerprint: a HEAD may be answered from the GET's response.
	gotFP := f.header.Get("X-Fingerprint")
	if serial := f.header.Get("X-Serial"); serial != "" {
		t.serials[serial]++
		gotFP = strings.TrimSuffix(gotFP, " serial="+serial)
	}
	fits := gotFP == wantFP
	if method == "HEAD" && !fits && !public {
		fits = gotFP == strings.Replace(wantFP, "m=HEAD ", "m=GET ", 1)
	}
	if !fits {
		t.leak("%s %s (%v): X-Fingerprint %q, want %q (Cache-Status %q)", method, path, id, gotFP, wantFP, f.cacheStatus())
		return
	}
	for _, c := range f.header.Values("Set-Cookie") {
		t.cookies[c]++
	}
	// The body.
	body := f.body
	enc := f.header.Get("Content-Encoding")
	if enc == "gzip" {
		if !gz {
			t.leak("%s %s (%v): gzip body for a client that did not accept it", method, path, id)
			return
		}
		if method != "HEAD" {
			zr, err := gzip.NewReader(strings.NewReader(body))
			if err != nil {
				t.leak("%s %s: undecodable gzip body: %v", method, path, err)
				return
			}
			b, err := io.ReadAll(zr)
			if err != nil {
				t.leak("%s %s: undecodable gzip body: %v", method, path, err)
				return
			}
			body = string(b)
		}
	} else if gz && strings.Contains(path, "/enc/") {
		t.leak("%s %s (%v): identity body for a gzip client (Content-Encoding %q)", method, path, id, enc)
		return
	}
	wantBody := f.header.Get("X-Fingerprint")
	if method == "HEAD" {
		wantBody = ""
	}
	if body != wantBody {
		t.leak("%s %s (%v): body %q, want %q (Cache-Status %q)", method, path, id, clip(body), clip(wantBody), f.cacheStatus())
	}
}

// echoRequest is what the poisoning tests' upstream answers: the request as
// it arrived, every header included (but Cache-Control, which the
// baselines use to bypass), host names in lower case (they are
// case-insensitive), so that two requests get the same answer exactly when
// the upstream cannot tell them apart.
func echoRequest(r *http.Request) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s host=%s", r.Method, r.RequestURI, strings.ToLower(r.Host))
	names := make([]string, 0, len(r.Header))
	for name := range r.Header {
		if name != "Cache-Control" {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	for _, name := range names {
		vs := r.Header[name]
		if name == "X-Forwarded-Host" {
			vs = []string{strings.ToLower(strings.Join(vs, ","))}
		}
		fmt.Fprintf(&b, "\n%s: %q", name, vs)
	}
	return b.String()
}

// echoUpstream answers every GET with echoRequest (also in X-Echo, for
// HEAD) after delay, storable.
func echoUpstream(t *testing.T, delay time.Duration) *upstream {
	return newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(delay)
		body := echoRequest(r)
		w.Header().Set("X-Echo", strconv.Quote(body))
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	})
}

// variant is one way of asking for a resource: its URL, Host and headers.
type variant struct {
	name    string
	url     string
	host    string // "" for the URL's
	headers []string
}

func (v variant) send(client *http.Client, method string, extra ...string) fetched {
	req, err := http.NewRequest(method, v.url, nil)
	if err != nil {
		return fetched{err: err}
	}
	if v.host != "" {
		req.Host = v.host
	}
	for _, h := range append(append([]string{}, v.headers...), extra...) {
		k, val, _ := strings.Cut(h, ":")
		req.Header.Add(strings.TrimSpace(k), strings.TrimSpace(val))
	}
	resp, err := client.Do(req)
	if err != nil {
		return fetched{err: err}
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return fetched{status: resp.StatusCode, header: resp.Header, body: string(b), err: err}
}

// expectNoPoisoning asks for resources in every way variants(path) lists:
// each way alone in turn (the cold entry is the attacker's or the
// victim's), all ways at once in herds (leader and followers mixed), then
// again from the micro-cache. It fails t for any response that differs
// from what the upstream answers that way of asking when nothing is shared
// (a baseline taken with Cache-Control: no-store, which bypasses).
func expectNoPoisoning(t *testing.T, client *http.Client, variants func(path string) []variant) {
	t.Helper()
	checked, bad := 0, 0
	phase := func(name, path string, herdSize int) {
		t.Helper()
		vs := variants(path)
		baseline := make([]string, len(vs))
		for i, v := range vs {
			f := v.send(client, "GET", "Cache-Control: no-store")
			if f.err != nil || f.status != http.StatusOK {
				t.Fatalf("baseline of %s: %d, err %v", v.name, f.status, f.err)
			}
			baseline[i] = f.body
		}
		var got []fetched
		if herdSize == 0 {
			for _, v := range vs {
				got = append(got, v.send(client, "GET"))
			}
		} else {
			got = together(herdSize*len(vs), func(j int) fetched { return vs[j%len(vs)].send(client, "GET") })
		}
		for j, f := range got {
			i := j % len(vs)
			checked++
			if f.err != nil || f.status != http.StatusOK || f.body != baseline[i] {
				if bad++; bad <= 8 {
					t.Errorf("%s, %s: got %d (err %v, Cache-Status %q)\n%s\nwant\n%s", name, vs[i].name, f.status, f.err, f.cacheStatus(), f.body, baseline[i])
				}
			}
		}
	}
	phase("one after another", pathFor(t, "/alone"), 0)
	phase("again, from the micro-cache", pathFor(t, "/alone"), 0)
	for round := range 3 {
		herdPath := pathFor(t, "/herd"+strconv.Itoa(round))
		phase("herd "+strconv.Itoa(round), herdPath, 4)
		phase("after herd "+strconv.Itoa(round)+", from the micro-cache", herdPath, 0)
	}
	t.Logf("%d responses checked, %d did not fit their request", checked, bad)
}

func TestPoisonUnkeyedHeadersNeverReachOtherRequests(t *testing.T) {
	up := echoUpstream(t, 50*time.Millisecond)
	// Behind a trusted proxy reverse_proxy passes the client's X-Forwarded-*
	// on, as a CDN in front of Caddy would make it.
	startTrustingCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 48)
	// Headers that origin frameworks honour to rewrite the request, and
	// that a cache which does not key them lets an attacker use to poison
	// the answer for everybody (the well-known unkeyed inputs).
	attacks := []string{
		"X-Forwarded-Host: evil.example",
		"X-Forwarded-Host: EVIL.example:443",
		"X-Host: evil.example",
		"X-Forwarded-Server: evil.example",
		"Forwarded: host=evil.example;proto=https",
		"X-Forwarded-Proto: https",
		"X-Forwarded-Scheme: https",
		"X-Forwarded-Port: 8443",
		"X-Forwarded-Prefix: /evil",
		"X-Original-URL: /admin",
		"X-Rewrite-URL: /admin",
		"X-HTTP-Method-Override: DELETE",
		"X-HTTP-Method: PUT",
		"X-Method-Override: PATCH",
	}
	expectNoPoisoning(t, client, func(path string) []variant {
		vs := []variant{{name: "clean", url: baseURL + path}}
		for _, a := range attacks {
			vs = append(vs, variant{name: a, url: baseURL + path, headers: []string{a}})
		}
		return vs
	})
}

func TestPoisonHostVariantsNeverShareAcrossHosts(t *testing.T) {
	up := echoUpstream(t, 50*time.Millisecond)
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 40)
	hosts := []string{
		"localhost:9080", "LOCALHOST:9080", "LocalHost:9080", "localhost",
		"127.0.0.1:9080", "127.0.0.1", "evil.example", "evil.example:9080", "EVIL.EXAMPLE:9080", "localhost:80",
	}
	expectNoPoisoning(t, client, func(path string) []variant {
		var vs []variant
		for _, h := range hosts {
			vs = append(vs, variant{name: "Host " + h, url: baseURL + path, host: h})
		}
		return vs
	})
}

func TestPoisonURLTricksNeverShareAcrossURLs(t *testing.T) {
	up := echoUpstream(t, 50*time.Millisecond)
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 64)
	suffixes := []string{
		"", "/", "?", "?a=1&b=2", "?b=2&a=1", "?a=1&a=2", "?a=1", "?a=1%26b=2", "?a=1;b=2", "?a=%31", "?A=1",
		"?a=1&utm_source=x", "?a=1#fragment", "?a=1&", "?&a=1", "?a", "?a=", "?%61=1", "/x", "/X", "/%78", "/x/", "/x/.", "/x/../x",
		"/x%2Fy", "/x/y", "/x%2fy",
	}
	expectNoPoisoning(t, client, func(path string) []variant {
		var vs []variant
		for _, s := range suffixes {
			vs = append(vs, variant{name: "URL " + path + s, url: baseURL + path + s})
		}
		// The same path with a doubled slash in front.
		vs = append(vs, variant{name: "URL /" + path, url: baseURL + "/" + path})
		return vs
	})
}

func TestPoisonHEADNeverAnswersAGETWithoutItsBody(t *testing.T) {
	// An upstream that answers HEAD on its own terms: no Content-Length, a
	// header of its own. Stored where a GET looks, it would be an empty
	// body for every GET.
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(50 * time.Millisecond)
		if r.Method == http.MethodHead {
			w.Header().Set("X-Answered", "HEAD for "+r.Header.Get("Authorization"))
			return
		}
		body := "GET for " + r.Header.Get("Authorization")
		w.Header().Set("X-Answered", body)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	})
	startCaddy(t, site("ttl 1s"), up)
	client := newClient(t)
	warm(t, client, 40)
	users := []string{"", "Bearer alice", "Bearer bob"}
	as := func(user string) []string { // no header at all for anonymous
		if user == "" {
			return nil
		}
		return []string{"Authorization: " + user}
	}
	bad := 0
	checkOne := func(round string, method, user string, f fetched) {
		t.Helper()
		wantGET, wantHEAD := strings.TrimSpace("GET for "+user), strings.TrimSpace("HEAD for "+user)
		ok := f.err == nil && f.status == http.StatusOK
		if method == "GET" {
			ok = ok && strings.TrimSpace(f.body) == wantGET && f.header.Get("X-Answered") == wantGET
		} else {
			ok = ok && f.body == "" && (f.header.Get("X-Answered") == wantGET || f.header.Get("X-Answered") == wantHEAD)
		}
		if !ok {
			if bad++; bad <= 8 {
				t.Errorf("%s: %s as %q: %d %q X-Answered %q (err %v, Cache-Status %q)", round, method, user, f.status, f.body, f.header.Get("X-Answered"), f.err, f.cacheStatus())
			}
		}
	}
	for round := range 4 {
		url := baseURL + pathFor(t, "/"+strconv.Itoa(round))
		name := "round " + strconv.Itoa(round)
		if round%2 == 0 {
			// A HEAD first fills what it may.
			for _, u := range users {
				checkOne(name+", HEAD first", "HEAD", u, get(client, "HEAD", url, as(u)...))
			}
		}
		got := together(30, func(i int) fetched {
			return get(client, []string{"HEAD", "GET"}[i%2], url, as(users[i/2%len(users)])...)
		})
		for i, f := range got {
			checkOne(name+", herd", []string{"HEAD", "GET"}[i%2], users[i/2%len(users)], f)
		}
		for _, m := range []string{"GET", "HEAD", "GET"} {
			for _, u := range users {
				checkOne(name+", after the herd", m, u, get(client, m, url, as(u)...))
			}
		}
	}
	if bad > 0 {
		t.Errorf("%d responses did not fit their request", bad)
	}
}
