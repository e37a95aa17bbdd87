package fanout

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// split feeds input in chunks of the given sizes (cycled) and returns the
// events.
func split(t testing.TB, input []byte, chunks ...int) []*event {
	t.Helper()
	s := newSplitter(0, "")
	var out []*event
	emit := func(ev *event) { out = append(out, ev) }
	for i := 0; len(input) > 0; i++ {
		n := len(input)
		if len(chunks) > 0 {
			n = min(chunks[i%len(chunks)], len(input))
		}
		if err := s.feed(input[:n], emit); err != nil {
			t.Fatal(err)
		}
		input = input[n:]
	}
	return out
}

func raws(evs []*event) []string {
	out := make([]string, len(evs))
	for i, ev := range evs {
		out[i] = string(ev.raw)
	}
	return out
}

func TestSplitterCutsAtBlankLines(t *testing.T) {
	cases := []struct {
		name  string
		input string
		want  []string
	}{
		{"lf", "data: a\n\ndata: b\n\n", []string{"data: a\n\n", "data: b\n\n"}},
		{"crlf", "data: a\r\n\r\ndata: b\r\n\r\n", []string{"data: a\r\n\r\n", "data: b\r\n\r\n"}},
		{"cr", "data: a\r\rdata: b\r\r", []string{"data: a\r\r", "data: b\r\r"}},
		{"mixed", "data: a\n\r\ndata: b\r\n\n", []string{"data: a\n\r\n", "data: b\r\n\n"}},
		{"multi-line event", "id: 1\nevent: x\ndata: a\ndata: b\n\n", []string{"id: 1\nevent: x\ndata: a\ndata: b\n\n"}},
		{"incomplete tail kept back", "data: a\n\ndata: b\n", []string{"data: a\n\n"}},
		{"comment", ": ping\n\ndata: a\n\n", []string{": ping\n\n", "data: a\n\n"}},
		{"bom stripped", "\xEF\xBB\xBFdata: a\n\n", []string{"data: a\n\n"}},
		{"crlf pair is one line end", "data: a\r\ndata: b\r\n\r\n", []string{"data: a\r\ndata: b\r\n\r\n"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			for _, chunk := range []int{0, 1, 2, 3, 5} {
				var got []string
				if chunk == 0 {
					got = raws(split(t, []byte(c.input)))
				} else {
					got = raws(split(t, []byte(c.input), chunk))
				}
				if chunk > 0 && strings.Contains(c.input, "\r") {
					// A CR that ends an event is cut at once; its LF starts
					// the next event when it arrives in a later write.
					joined := strings.Join(got, "")
					if len(got) != len(c.want) || !strings.HasPrefix(c.input, joined) {
						t.Errorf("chunk %d: events %q, want %d events adding up to the start of %q", chunk, got, len(c.want), c.input)
					}
					continue
				}
				if len(got) != len(c.want) {
					t.Fatalf("chunk %d: got %q, want %q", chunk, got, c.want)
				}
				for i := range got {
					if got[i] != c.want[i] {
						t.Errorf("chunk %d: event %d = %q, want %q", chunk, i, got[i], c.want[i])
					}
				}
			}
		})
	}
}

func TestSplitterReadsIDAndRetry(t *testing.T) {
	evs := split(t, []byte("id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\nid: x\x00y\ndata: d\n\nretry: 250\n\nretry: 2s\n\n: only a comment\n\n"))
	type want struct {
		id      string
		hasID   bool
		retry   time.Duration
		comment bool
	}
	wants := []want{
		{"7", true, -1, false},
		{"7", false, -1, false}, // no id field: the last one stays
		{"", true, -1, false},   // an empty id resets it
		{"", false, -1, false},  // an id with NUL is ignored
		{"", false, 250 * time.Millisecond, false},
		{"", false, -1, false}, // not digits: ignored
		{"", false, -1, true},
	}
	if len(evs) != len(wants) {
		t.Fatalf("got %d events, want %d: %q", len(evs), len(wants), raws(evs))
	}
	for i, w := range wants {
		ev := evs[i]
		if ev.id != w.id || ev.hasID != w.hasID || ev.retry != w.retry || ev.comment != w.comment {
			t.Errorf("event %d %q: id %q/%v retry %v comment %v, want %+v", i, ev.raw, ev.id, ev.hasID, ev.retry, ev.comment, w)
		}
	}
}

func TestSplitterBoundsAnEvent(t *testing.T) {
	s := newSplitter(16, "")
	err := s.feed([]byte("data: 0123456789abcdef\n"), func(*event) {})
	if err != errEventTooLarge {
		t.Fatalf("got %v, want errEventTooLarge", err)
	}
}

// FuzzSplitter checks, for any input cut at any two points, that the
// events add up to the input (less a leading BOM), that each ends with a
// blank line, and that the events of a whole stream do not depend on how
// its writes were cut, except where a CR ends an event.
func FuzzSplitter(f *testing.F) {
	for _, seed := range []string{
		"data: a\n\n", "data: a\r\n\r\n", "data: a\r\r", "id: 1\ndata: x\n\nid: 2\ndata: y\n\n",
		"\xEF\xBB\xBFdata: a\n\n", ": c\n\nretry: 10\n\n", "data: a\n\r\n\r\n\n", "\n\n\n", "\xEF\xBB",
	} {
		f.Add([]byte(seed), uint(1), uint(3))
	}
	f.Fuzz(func(t *testing.T, input []byte, a, b uint) {
		body := input
		if bytes.HasPrefix(body, utf8BOM) {
			body = body[len(utf8BOM):]
		}
		cuts := []int{int(a % 64), int(b % 64)}
		if cuts[0] == 0 {
			cuts[0] = 1
		}
		if cuts[1] == 0 {
			cuts[1] = 1
		}
		evs := split(t, input, cuts...)
		var joined []byte
		for _, ev := range evs {
			joined = append(joined, ev.raw...)
			if !endsWithBlankLine(ev.raw) {
				t.Fatalf("event %q does not end with a blank line", ev.raw)
			}
		}
		if !bytes.HasPrefix(body, joined) {
			t.Fatalf("events %q are not the start of the input %q", joined, body)
		}
		// What is left is the incomplete last event: no blank line in it,
		// except one that began in a CR-cut pair.
		whole := split(t, input)
		var wholeJoined []byte
		for _, ev := range whole {
			wholeJoined = append(wholeJoined, ev.raw...)
		}
		if !bytes.Contains(input, []byte("\r")) && !bytes.Equal(joined, wholeJoined) {
			t.Fatalf("cut %v: %q; whole: %q", cuts, raws(evs), raws(whole))
		}
	})
}

// endsWithBlankLine: the event's last two line ends are adjacent.
func endsWithBlankLine(raw []byte) bool {
	n := len(raw)
	switch {
	case n >= 2 && raw[n-1] == '\n' && raw[n-2] == '\n':
		return true
	case n >= 2 && raw[n-1] == '\r' && (raw[n-2] == '\r' || raw[n-2] == '\n'):
		return true
	case n >= 3 && raw[n-1] == '\n' && raw[n-2] == '\r' && (raw[n-3] == '\n' || raw[n-3] == '\r'):
		return true
	}
	return false
}
