package fanout

import (
	"bytes"
	"errors"
	"strconv"
	"time"
)

// event is one event of a stream exactly as the upstream sent it: its
// lines and the blank line that ends it. raw is shared by every subscriber
// and the ring, and never modified.
type event struct {
	raw []byte
	// chunk is raw framed as one chunk of HTTP/1.1's chunked transfer
	// coding, what is written to a detached subscriber's connection. raw
	// lies inside it: one allocation holds both.
	chunk []byte
	// id is the stream's last event ID once this event is dispatched (what
	// a browser sends as Last-Event-ID after it); hasID: the event set it
	// with an id field of its own.
	id    string
	hasID bool
	// retry is the reconnection time the event sets, or -1.
	retry time.Duration
	// comment: the event has no field, only comments (an upstream's
	// keep-alive). It is passed on but not kept for replay.
	comment bool
}

// heartbeat is the comment written after a stream has been silent for the
// heartbeat interval. It ends with a blank line, so that it never joins the
// lines of an event.
var heartbeat = newEvent(framed([]byte(":\n\n")))

// newEvent returns a comment-only event for raw and its chunk; parse reads
// its fields.
func newEvent(raw, chunk []byte) *event {
	return &event{raw: raw, chunk: chunk, retry: -1, comment: true}
}

// framed copies b into one chunk of chunked transfer coding (its size in
// hex, CRLF, b, CRLF) and returns the copy of b within it, and the chunk.
func framed(b []byte) (raw, chunk []byte) {
	var size [20]byte
	head := append(strconv.AppendInt(size[:0], int64(len(b)), 16), '\r', '\n')
	chunk = make([]byte, 0, len(head)+len(b)+2)
	chunk = append(chunk, head...)
	chunk = append(chunk, b...)
	chunk = append(chunk, '\r', '\n')
	end := len(head) + len(b)
	return chunk[len(head):end:end], chunk
}

// errEventTooLarge ends an upstream connection whose event does not end
// within the bound.
var errEventTooLarge = errors.New("fanout: an event is larger than the bound")

// utf8BOM is stripped from the start of every upstream connection's body, as
// the EventSource parser does: passed on, it would land in the middle of a
// subscriber's stream after a reconnect.
var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// splitter cuts an event stream into events at their blank lines. A line
// ends with CRLF, LF or CR (the EventSource grammar), so an event ends with
// two line ends in a row: \n\n, \r\r, \r\n\r\n or a mix of them.
//
// A CR is a complete line end when it arrives, and the LF that may follow
// it belongs to the same line end. An event that ends with a CR whose LF is
// not in the same write is cut at once rather than after waiting for the
// next byte, so that LF starts the next event: to a parser it is the second
// half of the line end it has already seen (and, to a subscriber that
// starts there, an empty line, which dispatches nothing).
type splitter struct {
	pending []byte // the event being read
	max     int    // largest event; 0: no bound
	// lineEnd: the last byte read ended a line (so a line end now is a
	// blank line); cr: the last byte read was a CR (an LF now is its pair).
	lineEnd, cr bool
	started     bool // the connection's first bytes (and any BOM) were read
	lastID      string
}

func newSplitter(max int, lastID string) *splitter {
	return &splitter{max: max, lastID: lastID}
}

// feed reads p and calls emit for every event it completes, in order.
func (s *splitter) feed(p []byte, emit func(*event)) error {
	if !s.started {
		// The BOM may arrive split over writes.
		need := len(utf8BOM) - len(s.pending)
		if len(p) < need && bytes.HasPrefix(utf8BOM[len(s.pending):], p) {
			s.pending = append(s.pending, p...)
			return nil
		}
		s.started = true
		head := append(s.pending, p[:min(need, len(p))]...)
		if bytes.Equal(head, utf8BOM) {
			s.pending = s.pending[:0]
			p = p[need:]
		} else {
			// Not a BOM: what was held back is the start of the stream.
			held := s.pending
			s.pending = nil
			if err := s.scan(held, emit); err != nil {
				return err
			}
		}
	}
	return s.scan(p, emit)
}

func (s *splitter) scan(p []byte, emit func(*event)) error {
	start := 0
	for i := 0; i < len(p); i++ {
		c := p[i]
		if c == '\n' && s.cr {
			s.cr = false
			continue
		}
		s.cr = c == '\r'
		if c != '\r' && c != '\n' {
			s.lineEnd = false
			continue
		}
		if !s.lineEnd {
			s.lineEnd = true
			continue
		}
		// A blank line: the event ends here, with the LF of a CRLF when
		// it is already here.
		s.lineEnd = false
		end := i + 1
		if c == '\r' && end < len(p) && p[end] == '\n' {
			end++
			s.cr = false
			i++
		}
		whole := p[start:end]
		if len(s.pending) > 0 {
			whole = append(s.pending, whole...)
			s.pending = nil
		}
		start = end
		if s.max > 0 && len(whole) > s.max {
			return errEventTooLarge
		}
		emit(s.parse(framed(whole)))
	}
	if start < len(p) {
		if s.max > 0 && len(s.pending)+len(p)-start > s.max {
			return errEventTooLarge
		}
		s.pending = append(s.pending, p[start:]...)
	}
	return nil
}

// parse reads the fields the fan-out acts on: id and retry. raw is kept as
// it is.
func (s *splitter) parse(raw, chunk []byte) *event {
	ev := newEvent(raw, chunk)
	rest := raw
	for len(rest) > 0 {
		i := bytes.IndexAny(rest, "\r\n")
		line := rest
		if i >= 0 {
			line, rest = rest[:i], rest[i+1:]
		} else {
			rest = nil
		}
		if len(line) == 0 || line[0] == ':' {
			continue
		}
		ev.comment = false
		name, value, found := bytes.Cut(line, []byte(":"))
		if found && len(value) > 0 && value[0] == ' ' {
			value = value[1:]
		}
		switch string(name) {
		case "id":
			// An id with a NUL is ignored (the EventSource grammar).
			if bytes.IndexByte(value, 0) < 0 {
				s.lastID, ev.hasID = string(value), true
			}
		case "retry":
			if ms, ok := digits(value); ok {
				ev.retry = time.Duration(ms) * time.Millisecond
			}
		}
	}
	ev.id = s.lastID
	return ev
}

// digits parses a retry value: ASCII digits only.
func digits(b []byte) (int64, bool) {
	if len(b) == 0 || len(b) > 12 {
		return 0, false
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	return n, err == nil
}
