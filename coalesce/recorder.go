package coalesce

import (
	"bytes"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// streamAfter is how long an unknown-length response may keep arriving in
// pieces before a flush turns it into a stream. A body that arrives at once
// (chunked JSON, a compressed upstream) is shared; one that trickles (a long
// poll writing events) reaches its client without waiting for the end: what
// the upstream flushed goes out at the latest streamAfter after the header,
// even if the upstream then stays quiet for a long time.
const streamAfter = 100 * time.Millisecond

// recorder is the leader's ResponseWriter. It buffers a response for sharing
// as long as it may be shared: up to maxBody bytes, not a stream. Otherwise
// it turns into a pass-through to the leader's client ("streaming") and
// tells its watcher once, before the first byte goes out, so that followers
// can stop waiting.
//
// mu serialises the handler's calls with the late flush, a timer that may
// turn the recorder into a stream while the handler waits for the upstream.
// The caller reads the recorder's fields only after finish.
type recorder struct {
	mu        sync.Mutex
	lateFlush *time.Timer
	finished  bool

	w       http.ResponseWriter
	header  http.Header
	maxBody int64

	status      int
	wroteHeader bool
	// server is the client's own Server field, lent to the handler's
	// header (see init); dropServer: the handler dropped it.
	server     []string
	dropServer bool
	// lent: header is the client's own (see lend); before is what it held
	// then.
	lent        bool
	before      [4]headerField
	nBefore     int
	headerAt    time.Time // of an unknown-length response
	knownLength bool
	buf         bytes.Buffer

	// memory is the budget all flights buffer from (nil: none); reserved
	// is what this recorder holds of it.
	memory   *flightMemory
	reserved int64

	streaming    bool
	streamReason string
	watch        streamWatcher
}

// streamWatcher is told when a recorder turns into a stream.
type streamWatcher interface {
	// streaming is called once, with the recorder's lock held, before the
	// first byte goes to the client.
	streaming(reason string)
	// streamStatus is the Cache-Status member the streamed response carries
	// ("" for none).
	streamStatus(reason string) string
	// passes reports whether a response with status, which could be
	// buffered, goes to the client as it arrives all the same (nobody else
	// would use it); it is then streamed for detailLoneMiss. Asked once,
	// with the recorder's lock held, when the header is written.
	passes(status int) bool
	// lends reports, before the handler runs, whether passes is likely to
	// say yes: the handler then writes into the client's own header.
	lends() bool
}

// headerField is one field of a header, as it was.
type headerField struct {
	name   string
	values []string
}

// init readies a recorder that is part of a larger value (one allocation
// per flight); newRecorder allocates one of its own.
//
// The handler's header starts with the client's Server field, as the
// client's own header would: Caddy sets "Server: Caddy" on every response,
// and reverse_proxy deletes it from the header it is given (it sends Via
// instead), while a handler that answers itself keeps it. Through the
// module a client gets what it would get without it (settleServer).
func (rec *recorder) init(w http.ResponseWriter, maxBody int64, watch streamWatcher) {
	rec.w, rec.maxBody, rec.watch = w, maxBody, watch
	if watch.lends() && rec.lend(w.Header()) {
		return
	}
	rec.header = make(http.Header)
	if s, ok := w.Header()["Server"]; ok {
		rec.header["Server"], rec.server = s, s
	}
}

// lend gives the handler the client's own header, as it would have it
// without the module, when that holds no more than a few fields: a
// response that then passes to the client unbuffered (a lone miss, a
// stream) is written once, with no copy of its header. before keeps what
// the header held, for unlend.
func (rec *recorder) lend(h http.Header) bool {
	if len(h) > len(rec.before) {
		return false
	}
	n := 0
	for k, vs := range h {
		rec.before[n] = headerField{k, vs}
		n++
	}
	rec.header, rec.lent, rec.nBefore = h, true, n
	return true
}

// unlend is called when a lent header's response is buffered after all,
// or when the handler wrote no header (the breaker's timeout cut it): the
// client's header gets back what it held, and the response's header is
// what the handler made of it, by the Server rule of init for that field;
// a field the handler left as it was is the client's, not the response's.
func (rec *recorder) unlend() {
	if !rec.lent {
		return
	}
	h := rec.header
	rec.header, rec.lent = make(http.Header, len(h)), false
	maps.Copy(rec.header, h)
	clear(h)
	for _, f := range rec.before[:rec.nBefore] {
		h[f.name] = f.values
		vs, ok := rec.header[f.name]
		switch {
		case f.name == "Server":
			rec.server = f.values // settleServer decides
		case !ok:
		case slices.Equal(vs, f.values):
			// Left as it was (by value: a 1xx on the way, here and in
			// reverse_proxy, copies every field of the header).
			delete(rec.header, f.name)
		case len(vs) > len(f.values) && slices.Equal(vs[:len(f.values)], f.values):
			// The handler added to the client's field, as reverse_proxy
			// adds an upstream's: the response's values are the added ones
			// (copyHeader puts them after each client's own).
			rec.header[f.name] = slices.Clone(vs[len(f.values):])
		}
	}
	rec.before = [len(rec.before)]headerField{}
}

// sameValues reports whether a and b are the same slice.
func sameValues(a, b []string) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// settleServer is called when the header is final. A handler that deleted
// the client's Server field deleted it for every client of the response
// (dropServer); one that left it as it was leaves each client its own, so
// it is not part of the response; one that set its own sends that.
func (rec *recorder) settleServer() {
	if rec.server == nil {
		return
	}
	vs, ok := rec.header["Server"]
	switch {
	case !ok:
		rec.dropServer = true
	case sameValues(vs, rec.server):
		delete(rec.header, "Server")
	}
}

func newRecorder(w http.ResponseWriter, maxBody int64, watch streamWatcher) *recorder {
	rec := new(recorder)
	rec.init(w, maxBody, watch)
	return rec
}

func (rec *recorder) Header() http.Header {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.streaming {
		return rec.w.Header()
	}
	return rec.header
}

func (rec *recorder) WriteHeader(status int) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.writeHeader(status)
}

func (rec *recorder) writeHeader(status int) {
	if rec.wroteHeader {
		return
	}
	if status >= 100 && status < 200 && status != http.StatusSwitchingProtocols {
		rec.interim(status)
		return
	}
	rec.status = status
	rec.wroteHeader = true
	var cl int64
	if v := fieldValue(rec.header, "Content-Length"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		cl, rec.knownLength = n, err == nil && n >= 0
	}
	if !rec.knownLength {
		rec.headerAt = time.Now() // for Flush
	}
	var reason string // why the response is streamed: "" while it is buffered
	switch {
	case streamingResponse(rec.header):
		reason = "stream"
	case fieldValue(rec.header, "Trailer") != "":
		reason = "trailers"
	case rec.knownLength && cl > rec.maxBody:
		reason = "too-large"
	case rec.watch.passes(status):
		reason = detailLoneMiss
	case rec.knownLength && !rec.reserve(cl):
		reason = detailFlightMemory
	}
	if reason == "" {
		rec.unlend()
	}
	rec.settleServer()
	switch {
	case reason != "":
		rec.stream(reason)
	case rec.knownLength:
		rec.buf.Grow(int(cl))
	}
}

// interim forwards an informational response (103 Early Hints, 102) to the
// leader's client, as reverse_proxy does (RFC 9110 §15.2), with the header
// fields set so far; they stay out of the client's final header. Followers
// and later hits get the final response only.
func (rec *recorder) interim(status int) {
	dst := rec.w.Header()
	own := maps.Clone(dst) // its own value slices, which a lent header shares
	copyHeader(dst, rec.header)
	rec.w.WriteHeader(status)
	clear(dst)
	maps.Copy(dst, own)
}

func (rec *recorder) Write(p []byte) (int, error) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if !rec.wroteHeader {
		rec.writeHeader(http.StatusOK)
	}
	if rec.streaming {
		return rec.w.Write(p)
	}
	n := int64(rec.buf.Len() + len(p))
	if n > rec.maxBody {
		rec.stream("too-large")
		return rec.w.Write(p)
	}
	if !rec.reserve(n) {
		rec.stream(detailFlightMemory)
		return rec.w.Write(p)
	}
	return rec.buf.Write(p)
}

// reserve makes sure the recorder holds n bytes of the flights' memory
// budget; false when the budget cannot give what is missing.
func (rec *recorder) reserve(n int64) bool {
	if rec.memory == nil || n <= rec.reserved {
		return true
	}
	if !rec.memory.take(n - rec.reserved) {
		return false
	}
	rec.reserved = n
	return true
}

// releaseMemory gives back what the recorder holds of the budget: when its
// buffer has gone to the client (a stream), or when the flight's owner has
// written the buffered response. Calling it again is harmless.
func (rec *recorder) releaseMemory() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.releaseLocked()
}

func (rec *recorder) releaseLocked() {
	if rec.reserved > 0 {
		rec.memory.give(rec.reserved)
		rec.reserved = 0
	}
}

// Flush forwards flushes while streaming. While buffering it is held back,
// except that an unknown-length response not finished streamAfter after its
// header becomes a stream: at once if that time has passed, else when it
// passes (the late flush), so that a first event is not held back until
// the upstream writes the next one.
func (rec *recorder) Flush() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if !rec.streaming && rec.wroteHeader && !rec.knownLength {
		if wait := streamAfter - time.Since(rec.headerAt); wait <= 0 {
			rec.stream("stream")
		} else if rec.lateFlush == nil && !rec.finished {
			rec.lateFlush = time.AfterFunc(wait, rec.flushLate)
		}
	}
	if rec.streaming {
		_ = http.NewResponseController(rec.w).Flush()
	}
}

// flushLate runs on the timer Flush set: the response is still arriving, so
// it is a stream and what was flushed goes to the client now.
func (rec *recorder) flushLate() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.finished || rec.streaming {
		return
	}
	rec.stream("stream")
	_ = http.NewResponseController(rec.w).Flush()
}

// finish is called when the handler has returned: no late flush may touch
// the client's writer after it. Calling it again is harmless.
func (rec *recorder) finish() {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.finished = true
	if rec.lateFlush != nil {
		rec.lateFlush.Stop()
	}
	if !rec.wroteHeader {
		rec.unlend() // the client is answered otherwise
	}
}

// Unwrap lets http.ResponseController reach the client's writer (deadlines).
func (rec *recorder) Unwrap() http.ResponseWriter { return rec.w }

// stream switches to pass-through: followers are told first, then what was
// recorded so far goes to the client.
func (rec *recorder) stream(reason string) {
	if rec.streaming {
		return
	}
	rec.streaming = true
	rec.streamReason = reason
	rec.watch.streaming(reason)
	dst := rec.w.Header()
	if rec.dropServer {
		delete(dst, "Server")
	}
	if !rec.lent {
		copyHeader(dst, rec.header)
	}
	if cs := rec.watch.streamStatus(reason); cs != "" {
		dst.Add("Cache-Status", cs)
	}
	rec.w.WriteHeader(rec.status)
	if rec.buf.Len() > 0 {
		_, _ = rec.w.Write(rec.buf.Bytes())
	}
	rec.buf = bytes.Buffer{}
	rec.releaseLocked()
}

// complete reports whether the recorded body is what the headers promised.
func (rec *recorder) complete() bool {
	if cl := fieldValue(rec.header, "Content-Length"); cl != "" {
		n, err := strconv.ParseInt(cl, 10, 64)
		return err == nil && n == int64(rec.buf.Len())
	}
	return true
}

// flightMemory is the budget of bytes all flights of an engine may buffer
// at once (max_flight_memory). Past it a new leader streams its response to
// its own client instead of buffering it, and its followers go upstream on
// their own: a thousand slow clients of distinct large responses hold at
// most the budget, not a body each.
type flightMemory struct {
	max  int64
	used atomic.Int64
}

// take reserves n bytes; false when that would go past the budget.
func (m *flightMemory) take(n int64) bool {
	for {
		used := m.used.Load()
		if used+n > m.max {
			return false
		}
		if m.used.CompareAndSwap(used, used+n) {
			return true
		}
	}
}

func (m *flightMemory) give(n int64) { m.used.Add(-n) }
