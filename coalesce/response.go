package coalesce

import (
	"bytes"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Response is a complete upstream response held in memory, written to any
// number of clients. It is never mutated once built.
type Response struct {
	Status int
	Header http.Header
	Body   []byte

	// varyFields are the request fields the response varies on, and
	// varyValues the values the leader's request had for them.
	varyFields []string
	varyValues []string
	// fromHead: the upstream answered a HEAD; the body is not the GET body.
	fromHead bool
	// upstreamAge is the upstream's own Age in seconds (0 when it sent none),
	// parsed once rather than on every write.
	upstreamAge int64
	// cc is the response's Cache-Control, parsed once for the sharing and
	// the storing decision.
	cc cacheControl
	// dropServer: the handler deleted the Server field Caddy gives every
	// response (reverse_proxy does): write deletes each client's.
	dropServer bool
}

func newResponse(status int, h http.Header, body []byte, req *http.Request) *Response {
	if cap(body)-len(body) > len(body)/8+4096 {
		// The cache's budget counts len(Body): do not keep the slack of a
		// buffer grown for a HEAD's Content-Length or doubled by a chunked body.
		body = bytes.Clone(body)
	}
	resp := &Response{Status: status, Header: h, Body: body, fromHead: req.Method == http.MethodHead, cc: parseCacheControl(h)}
	if !resp.fromHead && bodyAllowed(status) {
		// The body is complete: its length is known and sent as such, so the
		// header every client gets a copy of already says it.
		var digits [20]byte
		if cl := h["Content-Length"]; len(cl) != 1 || cl[0] != string(strconv.AppendInt(digits[:0], int64(len(body)), 10)) {
			h["Content-Length"] = []string{strconv.Itoa(len(body))}
		}
		delete(h, "Transfer-Encoding")
	}
	resp.upstreamAge = ageValue(h)
	resp.varyFields = varyFields(h)
	if len(resp.varyFields) > 0 {
		resp.varyValues = make([]string, len(resp.varyFields))
		for i, f := range resp.varyFields {
			resp.varyValues[i] = varyValue(req.Header, f)
		}
	}
	return resp
}

// size approximates the memory the response holds, for the cache budget.
func (resp *Response) size() int64 {
	n := int64(len(resp.Body)) + 200
	for k, vs := range resp.Header {
		n += int64(len(k)) + 16
		for _, v := range vs {
			n += int64(len(v)) + 16
		}
	}
	return n
}

// matchesVary reports whether r sent the same values for every field the
// response varies on as the request that produced it (RFC 9111 §4.1).
func (resp *Response) matchesVary(r *http.Request) bool {
	for i, f := range resp.varyFields {
		if varyValue(r.Header, f) != resp.varyValues[i] {
			return false
		}
	}
	return true
}

// write sends the response to one client: headers copied (never the shared
// map), the client's own conditional headers evaluated, no body for HEAD.
// age > 0 adds an Age header; member is appended to Cache-Status.
func (resp *Response) write(w http.ResponseWriter, r *http.Request, member cacheStatus, age time.Duration) {
	dst := w.Header()
	if resp.dropServer {
		delete(dst, "Server")
	}
	copyHeader(dst, resp.Header)
	status := resp.Status
	if status == http.StatusOK && notModified(r.Header, resp.Header) {
		status = http.StatusNotModified
		// As net/http's ServeContent does for a 304.
		dst.Del("Content-Type")
		dst.Del("Content-Length")
		dst.Del("Content-Encoding")
		dst.Del("Transfer-Encoding")
	}
	if age > 0 {
		secs := min(int64(age/time.Second), maxAge) + resp.upstreamAge
		dst.Set("Age", strconv.FormatInt(min(secs, maxAge), 10))
	}
	dst.Add("Cache-Status", member.String())
	w.WriteHeader(status)
	if r.Method != http.MethodHead && status != http.StatusNotModified && bodyAllowed(status) && len(resp.Body) > 0 {
		_, _ = w.Write(resp.Body)
	}
}

// maxAge is the largest Age sent: RFC 9111 §1.2.2 has a value that would
// overflow sent as 2^31, so an upstream's huge Age never wraps around to a
// negative one.
const maxAge = 1 << 31

func bodyAllowed(status int) bool {
	return status >= 200 && status != http.StatusNoContent && status != http.StatusNotModified
}

// copyHeader adds src's fields to dst, as reverse_proxy adds an upstream's
// header to the client's: a field that dst already holds (set by a handler
// before the module, a `header` directive's) keeps its values, and the
// response's follow them. Server is the exception: it is replaced, as Caddy
// sets it on every response and reverse_proxy drops it (see
// recorder.settleServer). The value slices are fresh, in one allocation for
// all of them, so that no client can change what another receives.
func copyHeader(dst, src http.Header) {
	var buf [4]headerField
	kept := buf[:0] // dst's own values of the fields src has too
	n := 0
	for k, vs := range dst {
		if k == "Server" || len(vs) == 0 {
			continue
		}
		if from, ok := src[k]; ok && !sameValues(vs, from) {
			kept = append(kept, headerField{k, vs})
			n += len(vs) + len(from)
		}
	}
	for _, vs := range src {
		n += len(vs)
	}
	all := make([]string, n)
	for k, vs := range src {
		m := copy(all, vs)
		dst[k] = all[:m:m]
		all = all[m:]
	}
	for _, f := range kept {
		m := copy(all, f.values)
		m += copy(all[m:], dst[f.name])
		dst[f.name] = all[:m:m]
		all = all[m:]
	}
}

// notModified evaluates a client's If-None-Match / If-Modified-Since against
// the shared response (RFC 9110 §13.1.2, §13.1.3, §13.2.2).
func notModified(req, resp http.Header) bool {
	if inm := req["If-None-Match"]; len(inm) > 0 {
		etag := fieldValue(resp, "Etag")
		if etag == "" {
			return false
		}
		for _, line := range inm {
			for tag := range strings.SplitSeq(line, ",") {
				tag = strings.TrimSpace(tag)
				if tag == "*" || weakETagMatch(tag, etag) {
					return true
				}
			}
		}
		return false
	}
	ims := fieldValue(req, "If-Modified-Since")
	lm := fieldValue(resp, "Last-Modified")
	if ims == "" || lm == "" {
		return false
	}
	since, err1 := http.ParseTime(ims)
	modified, err2 := http.ParseTime(lm)
	if err1 != nil || err2 != nil {
		return false
	}
	return !modified.After(since)
}

func weakETagMatch(a, b string) bool {
	a = strings.TrimPrefix(a, "W/")
	b = strings.TrimPrefix(b, "W/")
	return len(a) >= 2 && a[0] == '"' && a == b
}
