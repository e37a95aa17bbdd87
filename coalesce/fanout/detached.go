package fanout

import (
	"context"
	"net"
	"net/http"
	"syscall"
	"time"
)

// A detached subscriber is one whose connection the stream writes to itself.
//
// A subscriber served through net/http costs a goroutine for as long as it
// stays, with the stack of every handler in front of the fan-out, and
// net/http's buffers and request; most of an open stream's memory is that.
// Once the header and the replayed events are out, an HTTP/1 response whose
// body goes out as written is taken over from net/http (Hijack): the
// handler returns, and what is left of the subscriber is its connection,
// a small goroutine that notices the client leaving (watch), and this.
//
// The stream writes each event to the connection at once, without
// blocking: one non-blocking write from the goroutine that reads the
// upstream. Only a subscriber that cannot take a whole event gets a drain:
// a goroutine that writes its queue with blocking writes and ends once the
// queue is empty. While it drains, events queue as for any subscriber, and
// one more than Buffer drops it. On a platform without non-blocking writes
// (or a connection that is not a socket, such as TLS) every event goes
// through a drain.
//
// What a detached subscriber gives up: the handlers in front of the
// fan-out see their response end when it is detached (an access log
// records it then, with the header's size), and nothing between net/http
// and the fan-out sees the events (a body-rewriting handler; encode is
// seen, by its Content-Encoding, and keeps the subscriber attached).

// conn is a detached subscriber's connection and its state, guarded by the
// subscriber's mu (c, raw and chunked are set once, before any use).
type conn struct {
	c       net.Conn        // nil: the subscriber is not detached
	raw     syscall.RawConn // nil: every write goes through a drain
	chunked bool            // the response is in chunked transfer coding
	// draining: a drain goroutine writes the queue; the stream does not
	// write to c. offset is how much of queue[0] it has written already.
	draining bool
	offset   int
	dead     bool // c failed or is being closed: nothing more is written
	closed   bool // closeConn ran (once: the first one closes c)
}

func (c *conn) payload(ev *event) []byte {
	if c.chunked {
		return ev.chunk
	}
	return ev.raw
}

// lastChunk ends a response in chunked transfer coding.
var lastChunk = []byte("0\r\n\r\n")

// detachable reports whether the response w to r, its header and replay
// flushed, may be detached: HTTP/1 (HTTP/2 and 3 multiplex one connection),
// a body that goes out as written, and nothing held back by a writer that
// buffers the response (Caddy's recorder for a log of the body, templates):
// what it holds would never reach the client.
func detachable(r *http.Request, w http.ResponseWriter) bool {
	h := w.Header()
	if r.ProtoMajor != 1 || h.Get("Content-Encoding") != "" ||
		h.Get("Content-Length") != "" || h.Get("Transfer-Encoding") != "" {
		return false
	}
	for {
		if b, ok := w.(interface{ Buffered() bool }); ok && b.Buffered() {
			return false
		}
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return true
		}
		w = u.Unwrap()
	}
}

// innermost is the writer at the bottom of w's Unwrap chain.
func innermost(w http.ResponseWriter) http.ResponseWriter {
	for {
		u, ok := w.(interface{ Unwrap() http.ResponseWriter })
		if !ok {
			return w
		}
		w = u.Unwrap()
	}
}

// detach hands the subscriber's connection nc, taken over from net/http
// after the header and the replay were flushed, to the stream.
func (sub *subscriber) detach(nc net.Conn, chunked bool) {
	var raw syscall.RawConn
	if sc, ok := nc.(syscall.Conn); ok && nonBlockingWrites {
		if rc, err := sc.SyscallConn(); err == nil {
			raw = rc
		}
	}
	st := sub.stream
	h := st.hub
	// The watch goroutine counts for the hub's Close, which waits for it;
	// a drain starts only while the watch runs (its count is held).
	h.mu.Lock()
	closed := h.closed
	if !closed {
		h.conns.Add(1)
	}
	h.mu.Unlock()
	if closed {
		_ = nc.SetWriteDeadline(time.Now().Add(closeGrace))
		if chunked {
			_, _ = nc.Write(lastChunk)
		}
		_ = nc.Close()
		sub.leave()
		return
	}
	_ = nc.SetDeadline(time.Time{})
	st.mu.Lock()
	sub.rc = nil
	sub.mu.Lock()
	sub.conn = conn{c: nc, raw: raw, chunked: chunked}
	sub.ctx = context.Background() // its request is over
	switch {
	case sub.closed && sub.reason == ReasonSlow:
		sub.closeConnLocked()
	case len(sub.queue) > 0:
		// Events came while the header and the replay went out.
		sub.startDrainLocked()
		if sub.closed {
			_ = nc.SetWriteDeadline(time.Now().Add(closeGrace))
		}
	case sub.closed:
		sub.closeConnLocked()
	}
	sub.mu.Unlock()
	st.mu.Unlock()
	go sub.watch(nc)
}

// writeLocked writes ev to the detached subscriber's connection without
// blocking; what does not fit is queued for a drain.
func (sub *subscriber) writeLocked(ev *event) delivery {
	c := &sub.conn
	p := c.payload(ev)
	n, err := writeNow(c.raw, p)
	if err != nil {
		c.dead = true
		return lost
	}
	if n < len(p) {
		sub.queue = append(sub.queue, ev)
		c.offset = n
		sub.startDrainLocked()
	}
	return delivered
}

func (sub *subscriber) startDrainLocked() {
	sub.conn.draining = true
	sub.stream.hub.conns.Add(1)
	go sub.drain()
}

// drain writes the queue of a detached subscriber that fell behind, until
// the queue is empty; a subscriber closed meanwhile (not for being slow)
// gets its queue and the end of the response, then its connection closes.
func (sub *subscriber) drain() {
	defer sub.stream.hub.conns.Done()
	c := &sub.conn
	var bufs net.Buffers
	for {
		sub.mu.Lock()
		batch, off := sub.queue, c.offset
		sub.queue, c.offset = nil, 0
		if len(batch) == 0 || c.dead {
			closing := sub.closed && !c.dead
			if !closing {
				c.draining = false
			}
			sub.mu.Unlock()
			if closing {
				if c.chunked {
					_, _ = c.c.Write(lastChunk)
				}
				sub.hangUp()
			}
			return
		}
		sub.mu.Unlock()
		bufs = bufs[:0]
		for i, ev := range batch {
			p := c.payload(ev)
			if i == 0 {
				p = p[off:]
			}
			bufs = append(bufs, p)
		}
		clear(batch)
		// WriteTo consumes the slice: keep its array for the next batch.
		all := bufs
		if _, err := bufs.WriteTo(c.c); err != nil {
			sub.mu.Lock()
			c.dead, c.draining = true, false
			clear(sub.queue)
			sub.queue = nil
			sub.closeNetLocked()
			sub.mu.Unlock()
			return
		}
		bufs = all[:0]
	}
}

// closeConnLocked ends a detached subscriber the stream closed: at once
// when it was slow; otherwise after what is queued, with the end of the
// response, which EventSource answers by reconnecting.
func (sub *subscriber) closeConnLocked() {
	c := &sub.conn
	switch {
	case c.dead:
	case sub.reason == ReasonSlow:
		c.dead = true
		sub.closeNetLocked()
	case c.draining:
		_ = c.c.SetWriteDeadline(time.Now().Add(closeGrace))
	default:
		if c.chunked {
			if n, err := writeNow(c.raw, lastChunk); err == nil && n == 0 {
				// The socket is full, or takes no write that cannot
				// block: a drain writes the last chunk.
				_ = c.c.SetWriteDeadline(time.Now().Add(closeGrace))
				sub.startDrainLocked()
				return
			}
		}
		c.dead = true
		sub.closeNetLocked()
	}
}

// closeNetLocked closes the connection unless it was closed already. A
// socket's close returns at once; closing anything else (TLS writes its
// close_notify, for up to seconds to a client that reads nothing) is left
// to a goroutine, since the caller may hold the stream's lock. The watch,
// which ends only once the connection is closed, holds the hub's count
// meanwhile. The caller holds sub.mu.
func (sub *subscriber) closeNetLocked() {
	c := &sub.conn
	if c.closed {
		return
	}
	c.closed = true
	if c.raw != nil {
		_ = c.c.Close()
		return
	}
	h := sub.stream.hub
	h.conns.Add(1)
	go func() {
		defer h.conns.Done()
		_ = c.c.Close()
	}()
}

// hangUp closes a detached subscriber's connection: nothing more is
// written to it.
func (sub *subscriber) hangUp() {
	sub.mu.Lock()
	sub.conn.dead = true
	sub.closeNetLocked()
	sub.mu.Unlock()
}

// watch waits for the client of a detached subscriber to leave (or the
// connection to be closed), then takes the subscriber out of its stream.
// A client sends nothing on an event stream's connection; what it sends
// anyway is read and ignored.
func (sub *subscriber) watch(nc net.Conn) {
	defer sub.stream.hub.conns.Done()
	buf := make([]byte, 64)
	for {
		if _, err := nc.Read(buf); err != nil {
			break
		}
	}
	sub.hangUp()
	sub.leave()
}
