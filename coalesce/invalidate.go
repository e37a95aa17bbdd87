package coalesce

import (
	"net/http"
	"time"
)

// Writes invalidate (RFC 9111 §4.4): a non-error answer to a request with
// an unsafe method makes the responses stored for its target out of date,
// for every identity and variant. The cache finds them through its URL
// index (cache.go); a GET flight that went upstream before the write was
// answered is not stored either (microCache.put checks the time).

// safeMethod: RFC 9110 §9.2.1. Any other method may change its target.
func safeMethod(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return false
}

// writeInvalidator is the ResponseWriter of a request with an unsafe
// method. When the answer's status is known and before it goes out to the
// client, a 2xx or 3xx drops what is stored for the request's writeTargets:
// a client that reads again after it saw the answer never gets the old copy.
type writeInvalidator struct {
	http.ResponseWriter
	r       *http.Request
	cache   *microCache
	decided bool
}

func (e *Engine) invalidating(w http.ResponseWriter, r *http.Request) http.ResponseWriter {
	if safeMethod(r.Method) {
		return w
	}
	return &writeInvalidator{ResponseWriter: w, r: r, cache: e.cache}
}

func (w *writeInvalidator) decide(status int) {
	if w.decided || status < 200 {
		return // an interim response: the final one decides
	}
	w.decided = true
	if status >= 400 {
		return
	}
	now := time.Now()
	for _, u := range writeTargets(w.r, w.ResponseWriter.Header()) {
		w.cache.invalidate(u, now)
	}
}

func (w *writeInvalidator) WriteHeader(status int) {
	w.decide(status)
	w.ResponseWriter.WriteHeader(status)
}

func (w *writeInvalidator) Write(p []byte) (int, error) {
	w.decide(http.StatusOK)
	return w.ResponseWriter.Write(p)
}

func (w *writeInvalidator) Flush() {
	w.decide(http.StatusOK)
	_ = http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *writeInvalidator) Unwrap() http.ResponseWriter { return w.ResponseWriter }
