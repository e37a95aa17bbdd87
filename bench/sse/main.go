// Command sse is the event-stream benchmark's origin and its subscribers.
// Standard library only.
//
//	sse origin    [-listen 127.0.0.1:19180] [-rate 50] [-size 64] [-publish URL]
//	sse subscribe -url URL [-n 1000] [-duration 10s] [-stalled 0] [-ready 60s] [-pids P,P] [-gzip]
//	              [-stall-pairs 0 -stall-window 5s [-metrics URL]]
//	sse floor     [-listen 127.0.0.1:19184] [-rate 50] [-size 64]
//	sse report results.jsonl
//
// The origin makes `rate` events a second, "id: n" and "data: n <unix ns> <pad>",
// stamped when it makes them. It serves them as an event stream to every
// connection on GET /events (that is what a proxy in front of it passes
// through or fans out), or, with -publish, POSTs each one to that URL (an
// nchan publisher location) over one kept-alive connection. GET /__stats
// answers {"open", "peak", "total", "events"}: event-stream connections open
// now, the most open at once, opened since the start, events made. POST
// /__reset zeroes peak and total.
//
// subscribe opens n event streams on url (and -stalled more that send their
// request and never read), waits until every stream has an event, then
// measures for -duration: the delivery latency of every event to every
// subscriber (read time minus the origin's stamp; one clock, one machine), the
// events each subscriber got, and gaps or repeats in their numbers. It prints
// one line `SUBJSON {...}`. With -pids (the proxy's processes), it also reports
// their CPU use during the window and their resident memory before the first
// subscriber and at the end of the window.
//
// With -stall-pairs K, subscribe measures what a stalled subscriber costs
// the others instead: after the ready wait, K pairs of windows of
// -stall-window each, one window with one more subscriber that sends its
// request and never reads (a socket with a small receive buffer and segment
// size, so that the proxy's writes to it block within seconds; opened at the
// window's start and closed at its end), one without, in the order
// clean-stalled, stalled-clean, ... so that a drift of the machine over the
// run cancels out. Each window's p99 is over every event every reading
// subscriber got in it; the figure is the per-pair difference, stalled
// minus clean: a difference between two windows a few seconds apart, not
// between two runs minutes apart. With -metrics (the module's Prometheus
// metrics), it also reads caddy_coalesce_sse_fanout_seconds at each window's
// start and end: the time the proxy took to hand each event to every
// subscriber, measured inside it, free of the client's scheduling.
//
// floor serves the same events itself, from a net/http handler per
// subscriber that waits on a broadcast (one sync.Cond) and writes each event:
// the least an event stream costs in Go's HTTP server, to set a proxy's
// memory per subscriber against. GET /__mem answers the Go runtime's memory
// figures after a collection.
//
// report turns the lines bench/sse.sh collects into a Markdown table.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: sse origin|subscribe [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "origin":
		origin(os.Args[2:])
	case "subscribe":
		subscribe(os.Args[2:])
	case "report":
		report(os.Args[2:])
	case "floor":
		floor(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "usage: sse origin|subscribe [flags]")
		os.Exit(2)
	}
}
