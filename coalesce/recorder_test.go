package coalesce

import (
	"bytes"
	"net/http"
	"strings"
	"testing"
	"time"
)

// clientWriter is the leader's client as the recorder sees it. It logs what
// reaches it, in order, alongside the recorder's onStream calls.
type clientWriter struct {
	header  http.Header
	status  int
	body    bytes.Buffer
	flushes int
	log     []string
}

func newClientWriter() *clientWriter { return &clientWriter{header: http.Header{}} }

func (c *clientWriter) Header() http.Header { return c.header }
func (c *clientWriter) WriteHeader(s int) {
	if c.status == 0 {
		c.status = s
		c.log = append(c.log, "header")
	}
}
func (c *clientWriter) Write(p []byte) (int, error) {
	if c.status == 0 {
		c.WriteHeader(http.StatusOK)
	}
	c.log = append(c.log, "write")
	return c.body.Write(p)
}
func (c *clientWriter) Flush() { c.flushes++; c.log = append(c.log, "flush") }

// testWatcher logs the recorder's turn into a stream.
type testWatcher struct {
	c       *clientWriter
	reasons []string
}

func (tw *testWatcher) streaming(reason string) {
	tw.reasons = append(tw.reasons, reason)
	tw.c.log = append(tw.c.log, "onStream")
}

func (tw *testWatcher) streamStatus(reason string) string { return "test; detail=" + reason }

func (tw *testWatcher) passes(int) bool { return false }
func (tw *testWatcher) lends() bool     { return false }

func newTestRecorder(c *clientWriter, maxBody int64) (*recorder, *[]string) {
	tw := &testWatcher{c: c}
	return newRecorder(c, maxBody, tw), &tw.reasons
}

func chunks(total, size int) [][]byte {
	data := bytes.Repeat([]byte("0123456789abcdef"), total/16+1)[:total]
	var out [][]byte
	for len(data) > 0 {
		n := min(size, len(data))
		out = append(out, data[:n])
		data = data[n:]
	}
	return out
}

func TestRecorderBuffersUpToMaxBody(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1000)
	rec.Header().Set("Content-Type", "application/json")
	rec.WriteHeader(http.StatusOK)
	var want []byte
	for _, p := range chunks(1000, 64) {
		if n, err := rec.Write(p); n != len(p) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
		want = append(want, p...)
	}
	if rec.streaming || len(*reasons) != 0 {
		t.Fatalf("a body of exactly max_body streams (%q)", *reasons)
	}
	if len(c.log) != 0 || len(c.header) != 0 {
		t.Fatalf("the client saw %v %v while the response was being buffered", c.log, c.header)
	}
	if !bytes.Equal(rec.buf.Bytes(), want) || rec.status != 200 || !rec.complete() {
		t.Errorf("recorded status %d, %d bytes, complete=%v", rec.status, rec.buf.Len(), rec.complete())
	}
}

func TestRecorderLargeContentLengthStreamsAtOnce(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 100)
	rec.Header().Set("Content-Length", "101")
	rec.Header().Set("X-Upstream", "1")
	rec.WriteHeader(http.StatusOK)
	if !rec.streaming || strings.Join(*reasons, ",") != "too-large" {
		t.Fatalf("streaming=%v reasons=%q after a Content-Length over max_body", rec.streaming, *reasons)
	}
	if c.status != 200 || c.header.Get("X-Upstream") != "1" || c.header.Get("Content-Length") != "101" {
		t.Errorf("client got status %d header %v", c.status, c.header)
	}
	if cs := c.header.Get("Cache-Status"); cs != "test; detail=too-large" {
		t.Errorf("Cache-Status %q", cs)
	}
	for _, p := range chunks(101, 10) {
		rec.Write(p)
	}
	if c.body.Len() != 101 {
		t.Errorf("client got %d bytes, want 101", c.body.Len())
	}
	if c.log[0] != "onStream" || c.log[1] != "header" {
		t.Errorf("order %v: followers must be told before the client sees anything", c.log)
	}
}

func TestRecorderBodyGrowingPastMaxBodyStreamsIntact(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 100)
	rec.Header().Set("Content-Type", "application/json")
	var want []byte
	for _, p := range chunks(1000, 30) {
		rec.Write(p)
		want = append(want, p...)
	}
	if !rec.streaming || len(*reasons) != 1 || (*reasons)[0] != "too-large" {
		t.Fatalf("streaming=%v, onStream calls %q, want one too-large", rec.streaming, *reasons)
	}
	if !bytes.Equal(c.body.Bytes(), want) {
		t.Errorf("client body differs from what the upstream wrote (%d vs %d bytes)", c.body.Len(), len(want))
	}
	if c.log[0] != "onStream" {
		t.Errorf("first event %q, want onStream before any byte: %v", c.log[0], c.log)
	}
	if c.status != 200 || c.header.Get("Content-Type") != "application/json" {
		t.Errorf("client got status %d header %v", c.status, c.header)
	}
	// Headers set after the switch go straight to the client.
	rec.Header().Set("X-Late", "1")
	if c.header.Get("X-Late") != "1" {
		t.Error("Header() while streaming is not the client's")
	}
}

func TestRecorderEventStreamStreamsImmediately(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1<<20)
	rec.Header().Set("Content-Type", "text/event-stream")
	rec.WriteHeader(http.StatusOK)
	if !rec.streaming || strings.Join(*reasons, ",") != "stream" {
		t.Fatalf("an event stream is buffered (streaming=%v, reasons %q)", rec.streaming, *reasons)
	}
	if c.status != 200 {
		t.Fatal("the client has not received the event stream's header")
	}
	rec.Write([]byte("data: 1\n\n"))
	rec.Flush()
	rec.Write([]byte("data: 2\n\n"))
	rec.Flush()
	if c.body.String() != "data: 1\n\ndata: 2\n\n" || c.flushes != 2 {
		t.Errorf("client got %q with %d flushes", c.body.String(), c.flushes)
	}
	if len(*reasons) != 1 {
		t.Errorf("onStream called %d times", len(*reasons))
	}
}

func TestRecorderAnnouncedTrailersStream(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1<<20)
	rec.Header().Set("Trailer", "X-Checksum")
	rec.WriteHeader(http.StatusOK)
	if !rec.streaming || strings.Join(*reasons, ",") != "trailers" {
		t.Errorf("a response with trailers is buffered (reasons %q)", *reasons)
	}
}

func TestRecorderIgnoresFlushWhileBuffering(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1<<20)
	rec.Header().Set("Content-Length", "4")
	rec.Write([]byte("ab"))
	rec.Flush()
	rec.Write([]byte("cd"))
	rec.Flush()
	if rec.streaming || c.flushes != 0 || len(*reasons) != 0 {
		t.Errorf("a buffered response was flushed to the client (streaming=%v flushes=%d)", rec.streaming, c.flushes)
	}
	if !rec.complete() {
		t.Error("complete() = false for a full body")
	}
}

// A response of unknown length that keeps flushing after streamAfter is a
// stream (a long poll), not a body to share.
func TestRecorderTricklingResponseBecomesAStream(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1<<20)
	rec.Write([]byte("first "))
	rec.Flush()
	rec.mu.Lock() // the late flush may run from now on
	early := rec.streaming
	rec.mu.Unlock()
	if early {
		t.Fatal("streaming on the first quick flush")
	}
	time.Sleep(streamAfter + 10*time.Millisecond)
	rec.Write([]byte("second"))
	rec.Flush()
	rec.finish()
	if !rec.streaming || strings.Join(*reasons, ",") != "stream" {
		t.Fatalf("still buffering after %v of flushes", streamAfter)
	}
	if c.body.String() != "first second" {
		t.Errorf("client got %q", c.body.String())
	}
}

// What the upstream flushed reaches the client within streamAfter even when
// the upstream then goes quiet (a long poll that sent one event and waits
// for the next): it is not held until the next write.
func TestRecorderFlushedDataIsNotHeldBackByAQuietUpstream(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1<<20)
	rec.Write([]byte("data: 1\n\n"))
	rec.Flush()
	deadline := time.Now().Add(bound)
	for {
		rec.mu.Lock()
		got, flushes := c.body.String(), c.flushes
		rec.mu.Unlock()
		if got == "data: 1\n\n" && flushes == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %s the client has %q with %d flushes", bound, got, flushes)
		}
		time.Sleep(5 * time.Millisecond)
	}
	rec.finish()
	if strings.Join(*reasons, ",") != "stream" {
		t.Errorf("reasons %q", *reasons)
	}
}

// A body of unknown length that is complete before streamAfter stays
// buffered, and the late flush does nothing once the handler is done.
func TestRecorderQuickChunkedBodyStaysBufferedAfterFinish(t *testing.T) {
	c := newClientWriter()
	rec, reasons := newTestRecorder(c, 1<<20)
	rec.Write([]byte(`{"a":1}`))
	rec.Flush()
	rec.finish()
	time.Sleep(streamAfter + 20*time.Millisecond)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if rec.streaming || c.flushes != 0 || c.body.Len() != 0 || len(*reasons) != 0 {
		t.Errorf("a finished recorder streamed: streaming=%v flushes=%d body=%q", rec.streaming, c.flushes, c.body.String())
	}
}

func TestRecorderCompleteDetectsShortAndLongBodies(t *testing.T) {
	cases := []struct {
		cl   string
		body string
		want bool
	}{
		{"", "anything", true},
		{"5", "hello", true},
		{"10", "hello", false},
		{"3", "hello", false},
		{"x", "hello", false},
		{"0", "", true},
	}
	for _, tc := range cases {
		rec, _ := newTestRecorder(newClientWriter(), 1<<20)
		if tc.cl != "" {
			rec.Header().Set("Content-Length", tc.cl)
		}
		rec.Write([]byte(tc.body))
		if got := rec.complete(); got != tc.want {
			t.Errorf("Content-Length %q, body %q: complete() = %v, want %v", tc.cl, tc.body, got, tc.want)
		}
	}
}

func TestRecorderStatusDefaultsAndInformational(t *testing.T) {
	rec, _ := newTestRecorder(newClientWriter(), 100)
	rec.Write([]byte("x"))
	if rec.status != http.StatusOK {
		t.Errorf("status %d after a bare Write, want 200", rec.status)
	}

	rec, _ = newTestRecorder(newClientWriter(), 100)
	rec.WriteHeader(http.StatusEarlyHints)
	rec.WriteHeader(http.StatusNotFound)
	rec.WriteHeader(http.StatusInternalServerError)
	if rec.status != http.StatusNotFound {
		t.Errorf("status %d, want the first final status 404", rec.status)
	}
}

func TestRecorderUnwrapReachesTheClient(t *testing.T) {
	c := newClientWriter()
	rec, _ := newTestRecorder(c, 100)
	if rec.Unwrap() != http.ResponseWriter(c) {
		t.Error("Unwrap does not return the client's writer")
	}
}
