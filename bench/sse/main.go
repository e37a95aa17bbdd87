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
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
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

// ---------------------------------------------------------------- origin

type hub struct {
	mu    sync.Mutex
	conns map[chan []byte]struct{}
	open  atomic.Int64
	peak  atomic.Int64
	total atomic.Int64
	made  atomic.Int64
}

func origin(args []string) {
	fs := flag.NewFlagSet("origin", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:19180", "address to listen on")
	rate := fs.Int("rate", 50, "events a second")
	size := fs.Int("size", 64, "padding bytes in each event's data")
	publish := fs.String("publish", "", "POST each event to this URL instead of serving streams")
	_ = fs.Parse(args)

	h := &hub{conns: map[chan []byte]struct{}{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", h.serve)
	mux.HandleFunc("GET /__stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]int64{"open": h.open.Load(), "peak": h.peak.Load(), "total": h.total.Load(), "events": h.made.Load()})
	})
	mux.HandleFunc("POST /__reset", func(w http.ResponseWriter, r *http.Request) {
		h.peak.Store(h.open.Load())
		h.total.Store(0)
		w.WriteHeader(http.StatusNoContent)
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(ln) }()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pad := strings.Repeat("x", *size)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}, Timeout: 5 * time.Second}
	tick := time.NewTicker(time.Second / time.Duration(*rate))
	defer tick.Stop()
	for n := int64(1); ; n++ {
		select {
		case <-ctx.Done():
			_ = srv.Close()
			return
		case <-tick.C:
		}
		h.made.Store(n)
		data := fmt.Sprintf("%d %d %s", n, time.Now().UnixNano(), pad)
		if *publish != "" {
			resp, err := client.Post(*publish, "text/plain", strings.NewReader(data))
			if err != nil {
				log.Printf("publish: %v", err)
				continue
			}
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			continue
		}
		ev := []byte(fmt.Sprintf("id: %d\ndata: %s\n\n", n, data))
		h.mu.Lock()
		for c := range h.conns {
			select {
			case c <- ev:
			default: // a connection this far behind loses events; subscribers count the gaps
			}
		}
		h.mu.Unlock()
	}
}

func (h *hub) serve(w http.ResponseWriter, r *http.Request) {
	c := make(chan []byte, 1024)
	h.mu.Lock()
	h.conns[c] = struct{}{}
	h.mu.Unlock()
	n := h.open.Add(1)
	h.total.Add(1)
	for p := h.peak.Load(); n > p && !h.peak.CompareAndSwap(p, n); p = h.peak.Load() {
	}
	defer func() {
		h.mu.Lock()
		delete(h.conns, c)
		h.mu.Unlock()
		h.open.Add(-1)
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	for {
		select {
		case ev := <-c:
			if _, err := w.Write(ev); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

// ---------------------------------------------------------------- floor

func floor(args []string) {
	fs := flag.NewFlagSet("floor", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:19184", "address to listen on")
	rate := fs.Int("rate", 50, "events a second")
	size := fs.Int("size", 64, "padding bytes in each event's data")
	_ = fs.Parse(args)

	var mu sync.Mutex
	cond := sync.NewCond(&mu)
	var seq int64
	var ev []byte
	go func() {
		pad := strings.Repeat("x", *size)
		tick := time.NewTicker(time.Second / time.Duration(*rate))
		for t := range tick.C {
			mu.Lock()
			seq++
			ev = fmt.Appendf(nil, "id: %d\ndata: %d %d %s\n\n", seq, seq, t.UnixNano(), pad)
			mu.Unlock()
			cond.Broadcast()
		}
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		if rc.Flush() != nil {
			return
		}
		// A client that goes away is noticed at the next write.
		mu.Lock()
		last := seq
		for {
			for seq == last {
				cond.Wait()
			}
			last = seq
			out := ev
			mu.Unlock()
			if _, err := w.Write(out); err != nil {
				return
			}
			if rc.Flush() != nil {
				return
			}
			mu.Lock()
		}
	})
	mux.HandleFunc("GET /__mem", func(w http.ResponseWriter, r *http.Request) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]uint64{"goroutines": uint64(runtime.NumGoroutine()),
			"heap_inuse": m.HeapInuse, "heap_alloc": m.HeapAlloc, "stack_inuse": m.StackInuse, "sys": m.Sys})
	})
	log.Fatal(http.ListenAndServe(*listen, mux))
}

// ---------------------------------------------------------------- subscribe

type result struct {
	N           int     `json:"n"`
	Connected   int     `json:"connected"`
	Ready       int     `json:"ready"`
	Stalled     int     `json:"stalled"`
	Events      int64   `json:"events"`
	MinPerSub   int64   `json:"min_events_per_subscriber"`
	MaxPerSub   int64   `json:"max_events_per_subscriber"`
	Gaps        int64   `json:"gaps"`
	Repeats     int64   `json:"repeats"`
	Ended       int     `json:"ended"`
	P50us       int64   `json:"p50_us"`
	P99us       int64   `json:"p99_us"`
	P999us      int64   `json:"p999_us"`
	MaxUs       int64   `json:"max_us"`
	DurationSec float64 `json:"duration_s"`
	// The proxy's processes (-pids): CPU % of one core over the window,
	// resident memory (kB) before the first subscriber and at the end.
	ProxyCPUPct  float64  `json:"proxy_cpu_pct"`
	ProxyRSSIdle int64    `json:"proxy_rss_idle_kb"`
	ProxyRSSLoad int64    `json:"proxy_rss_kb"`
	Errors       []string `json:"errors,omitempty"`
	// Stall is the comparison of -stall-pairs.
	Stall *stallResult `json:"stall,omitempty"`
}

// stallResult compares, window by window, the reading subscribers' latency
// with one stalled subscriber and without.
type stallResult struct {
	Pairs    int     `json:"pairs"`
	WindowS  float64 `json:"window_s"`
	CleanP50 []int64 `json:"clean_p50_us"`
	CleanP99 []int64 `json:"clean_p99_us"`
	StallP50 []int64 `json:"stalled_p50_us"`
	StallP99 []int64 `json:"stalled_p99_us"`
	// DiffP99 is, per pair, the stalled window's p99 minus the clean one's.
	DiffP99 []int64 `json:"diff_p99_us"`
	// Events is how many events the windows held, for the reading
	// subscribers together: clean, stalled.
	CleanEvents int64    `json:"clean_events"`
	StallEvents int64    `json:"stalled_events"`
	StallErrors []string `json:"stall_errors,omitempty"`
	// With -metrics, per pair: the mean time the proxy took to fan an
	// event out in the clean and the stalled window (ns), and the upper
	// bound of the histogram bucket holding its 99th percentile.
	CleanFanoutNs    []int64 `json:"clean_fanout_mean_ns,omitempty"`
	StallFanoutNs    []int64 `json:"stalled_fanout_mean_ns,omitempty"`
	CleanFanoutP99Ns []int64 `json:"clean_fanout_p99_le_ns,omitempty"`
	StallFanoutP99Ns []int64 `json:"stalled_fanout_p99_le_ns,omitempty"`
}

// fanoutScrape is caddy_coalesce_sse_fanout_seconds at one moment, summed
// over handlers: count, sum (s) and cumulative buckets by upper bound.
type fanoutScrape struct {
	count   float64
	sum     float64
	buckets map[float64]float64
}

func scrapeFanout(url string) (fanoutScrape, error) {
	f := fanoutScrape{buckets: map[float64]float64{}}
	resp, err := http.Get(url)
	if err != nil {
		return f, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_coalesce_sse_fanout_seconds") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			continue
		}
		switch {
		case strings.HasPrefix(line, "caddy_coalesce_sse_fanout_seconds_count"):
			f.count += v
		case strings.HasPrefix(line, "caddy_coalesce_sse_fanout_seconds_sum"):
			f.sum += v
		case strings.HasPrefix(line, "caddy_coalesce_sse_fanout_seconds_bucket"):
			_, le, ok := strings.Cut(line, `le="`)
			if !ok {
				continue
			}
			le, _, _ = strings.Cut(le, `"`)
			b, err := strconv.ParseFloat(le, 64)
			if err != nil {
				b = math.Inf(1)
			}
			f.buckets[b] += v
		}
	}
	return f, sc.Err()
}

// fanoutWindow is the mean fan-out time between two scrapes and the upper
// bound of the bucket that holds its 99th percentile (ns; -1: none).
func fanoutWindow(a, b fanoutScrape) (mean, p99 int64) {
	n := b.count - a.count
	if n <= 0 {
		return -1, -1
	}
	mean = int64((b.sum - a.sum) / n * 1e9)
	les := make([]float64, 0, len(b.buckets))
	for le := range b.buckets {
		les = append(les, le)
	}
	slices.Sort(les)
	for _, le := range les {
		if b.buckets[le]-a.buckets[le] >= 0.99*n {
			if math.IsInf(le, 1) {
				return mean, -1
			}
			return mean, int64(le * 1e9)
		}
	}
	return mean, -1
}

type sub struct {
	lat     []int32   // µs, during the window
	wins    [][]int32 // µs, per window of -stall-pairs
	events  int64
	last    int64
	gaps    int64
	repeats int64
	ready   atomic.Bool
	ended   atomic.Bool
}

func subscribe(args []string) {
	fs := flag.NewFlagSet("subscribe", flag.ExitOnError)
	url := fs.String("url", "", "event stream URL")
	n := fs.Int("n", 1000, "subscribers")
	dur := fs.Duration("duration", 10*time.Second, "measurement window")
	stalled := fs.Int("stalled", 0, "more subscribers that never read")
	readyWait := fs.Duration("ready", 60*time.Second, "longest wait for every subscriber's first event")
	pidList := fs.String("pids", "", "the proxy's process ids, comma-separated, for its CPU and memory")
	gzip := fs.Bool("gzip", false, "ask for gzip (Accept-Encoding), as a browser does, for a proxy that compresses")
	stallPairs := fs.Int("stall-pairs", 0, "pairs of windows with and without a stalled subscriber, instead of one window")
	stallWindow := fs.Duration("stall-window", 5*time.Second, "each window of -stall-pairs")
	metricsURL := fs.String("metrics", "", "with -stall-pairs: the module's metrics, for its fan-out time per window")
	_ = fs.Parse(args)
	var pids []int
	for _, f := range strings.Split(*pidList, ",") {
		if p, err := strconv.Atoi(strings.TrimSpace(f)); err == nil {
			pids = append(pids, p)
		}
	}
	rssIdle := rssKB(pids)
	if *url == "" {
		log.Fatal("subscribe: -url is required")
	}

	var measuring atomic.Bool
	// window is the -stall-pairs window being measured, or -1.
	var window atomic.Int32
	window.Store(-1)
	var errMu sync.Mutex
	var errs []string
	fail := func(err error) {
		errMu.Lock()
		if len(errs) < 5 {
			errs = append(errs, err.Error())
		}
		errMu.Unlock()
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tr := &http.Transport{MaxConnsPerHost: 0, MaxIdleConnsPerHost: *n, DisableCompression: !*gzip}
	client := &http.Client{Transport: tr}

	subs := make([]*sub, *n)
	var wg sync.WaitGroup
	dial := make(chan struct{}, 100) // dials at once
	var connected atomic.Int64
	for i := range subs {
		s := &sub{}
		subs[i] = s
		wg.Add(1)
		go func() {
			defer wg.Done()
			dial <- struct{}{}
			req, _ := http.NewRequestWithContext(ctx, "GET", *url, nil)
			req.Header.Set("Accept", "text/event-stream")
			resp, err := client.Do(req)
			<-dial
			if err != nil {
				fail(err)
				return
			}
			defer resp.Body.Close()
			if resp.StatusCode != 200 {
				fail(fmt.Errorf("status %d", resp.StatusCode))
				return
			}
			connected.Add(1)
			sc := bufio.NewScanner(resp.Body)
			sc.Buffer(make([]byte, 64<<10), 1<<20)
			for sc.Scan() {
				line := sc.Bytes()
				data, ok := bytes.CutPrefix(line, []byte("data: "))
				if !ok {
					continue
				}
				now := time.Now().UnixNano()
				f := bytes.Fields(data)
				if len(f) < 2 {
					continue
				}
				seq, _ := strconv.ParseInt(string(f[0]), 10, 64)
				at, _ := strconv.ParseInt(string(f[1]), 10, 64)
				s.ready.Store(true)
				if win := window.Load(); win >= 0 {
					for int(win) >= len(s.wins) {
						s.wins = append(s.wins, nil)
					}
					s.wins[win] = append(s.wins[win], int32(min((now-at)/1000, 1<<31-1)))
				}
				if !measuring.Load() {
					s.last = seq
					continue
				}
				switch {
				case s.last != 0 && seq <= s.last:
					s.repeats++
				case s.last != 0 && seq > s.last+1:
					s.gaps += seq - s.last - 1
				}
				s.last = seq
				s.events++
				s.lat = append(s.lat, int32(min((now-at)/1000, 1<<31-1)))
			}
			if measuring.Load() && ctx.Err() == nil {
				s.ended.Store(true)
			}
		}()
	}
	// Subscribers that stop reading: a request, then nothing.
	var stalledConns []net.Conn
	for range *stalled {
		c, err := dialStalled(*url)
		if err != nil {
			fail(err)
			continue
		}
		stalledConns = append(stalledConns, c)
	}

	deadline := time.Now().Add(*readyWait)
	ready := 0
	for time.Now().Before(deadline) {
		ready = 0
		for _, s := range subs {
			if s.ready.Load() {
				ready++
			}
		}
		if ready == *n {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	var stall *stallResult
	if *stallPairs > 0 {
		stall = &stallResult{Pairs: *stallPairs, WindowS: stallWindow.Seconds()}
		*dur = time.Duration(2**stallPairs) * *stallWindow
	}
	measuring.Store(true)
	start := time.Now()
	cpu0 := cpuTicks(pids)
	if stall == nil {
		time.Sleep(*dur)
	} else {
		for i := range 2 * *stallPairs {
			// clean, stalled, stalled, clean, clean, stalled, ...
			stalledWindow := (i%4 == 1 || i%4 == 2)
			var c net.Conn
			if stalledWindow {
				var err error
				if c, err = dialStalled(*url); err != nil && len(stall.StallErrors) < 5 {
					stall.StallErrors = append(stall.StallErrors, err.Error())
				}
			}
			var before fanoutScrape
			if *metricsURL != "" {
				before, _ = scrapeFanout(*metricsURL)
			}
			window.Store(int32(i))
			time.Sleep(*stallWindow)
			window.Store(-1)
			if *metricsURL != "" {
				after, err := scrapeFanout(*metricsURL)
				if err != nil && len(stall.StallErrors) < 5 {
					stall.StallErrors = append(stall.StallErrors, err.Error())
				}
				mean, p99 := fanoutWindow(before, after)
				if stalledWindow {
					stall.StallFanoutNs = append(stall.StallFanoutNs, mean)
					stall.StallFanoutP99Ns = append(stall.StallFanoutP99Ns, p99)
				} else {
					stall.CleanFanoutNs = append(stall.CleanFanoutNs, mean)
					stall.CleanFanoutP99Ns = append(stall.CleanFanoutP99Ns, p99)
				}
			}
			if c != nil {
				c.Close()
			}
		}
	}
	measuring.Store(false)
	elapsed := time.Since(start)
	cpu1 := cpuTicks(pids)
	rssLoad := rssKB(pids)
	cancel()
	for _, c := range stalledConns {
		c.Close()
	}
	wg.Wait()

	res := result{N: *n, Connected: int(connected.Load()), Ready: ready, Stalled: len(stalledConns), DurationSec: elapsed.Seconds(), Errors: errs,
		ProxyRSSIdle: rssIdle, ProxyRSSLoad: rssLoad}
	if len(pids) > 0 {
		// Linux counts CPU time in ticks of 1/100 s (USER_HZ).
		res.ProxyCPUPct = float64(cpu1-cpu0) / 100 / elapsed.Seconds() * 100
	}
	var all []int32
	res.MinPerSub = -1
	for _, s := range subs {
		res.Events += s.events
		res.Gaps += s.gaps
		res.Repeats += s.repeats
		if s.ended.Load() {
			res.Ended++
		}
		if res.MinPerSub < 0 || s.events < res.MinPerSub {
			res.MinPerSub = s.events
		}
		res.MaxPerSub = max(res.MaxPerSub, s.events)
		all = append(all, s.lat...)
	}
	slices.Sort(all)
	q := func(p float64) int64 { return quantile(all, p) }
	res.P50us, res.P99us, res.P999us = q(0.50), q(0.99), q(0.999)
	if stall != nil {
		var clean, stalled [][]int32
		for i := range 2 * *stallPairs {
			var w []int32
			for _, s := range subs {
				if i < len(s.wins) {
					w = append(w, s.wins[i]...)
				}
			}
			slices.Sort(w)
			if i%4 == 1 || i%4 == 2 {
				stalled = append(stalled, w)
				stall.StallEvents += int64(len(w))
			} else {
				clean = append(clean, w)
				stall.CleanEvents += int64(len(w))
			}
		}
		for i := range *stallPairs {
			c, st := clean[i], stalled[i]
			stall.CleanP50 = append(stall.CleanP50, quantile(c, 0.50))
			stall.CleanP99 = append(stall.CleanP99, quantile(c, 0.99))
			stall.StallP50 = append(stall.StallP50, quantile(st, 0.50))
			stall.StallP99 = append(stall.StallP99, quantile(st, 0.99))
			stall.DiffP99 = append(stall.DiffP99, quantile(st, 0.99)-quantile(c, 0.99))
		}
		res.Stall = stall
	}
	if len(all) > 0 {
		res.MaxUs = int64(all[len(all)-1])
	}
	b, _ := json.Marshal(res)
	fmt.Printf("SUBJSON %s\n", b)
}

// quantile of sorted latencies (µs); 0 for none.
func quantile(sorted []int32, p float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	return int64(sorted[min(int(p*float64(len(sorted))), len(sorted)-1)])
}

// dialStalled opens a subscriber that sends its request and never reads,
// with a receive buffer as small as the kernel allows, so that the proxy's
// writes to it block after a few kilobytes rather than after the megabytes
// a loopback socket buffers by default.
func dialStalled(url string) (net.Conn, error) {
	host := strings.TrimPrefix(strings.TrimPrefix(url, "http://"), "https://")
	hostport, path, _ := strings.Cut(host, "/")
	d := net.Dialer{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 1024)
			if serr == nil {
				// A small segment size keeps the proxy's send buffer,
				// which the kernel sizes by segments, small too.
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 536)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	c, err := d.Dial("tcp", hostport)
	if err != nil {
		return nil, err
	}
	if _, err := fmt.Fprintf(c, "GET /%s HTTP/1.1\r\nHost: %s\r\nAccept: text/event-stream\r\n\r\n", path, hostport); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

func median(v []int64) float64 {
	if len(v) == 0 {
		return 0
	}
	w := slices.Clone(v)
	slices.Sort(w)
	if len(w)%2 == 1 {
		return float64(w[len(w)/2])
	}
	return float64(w[len(w)/2-1]+w[len(w)/2]) / 2
}

// meanCI is the mean of v and the half-width of its 95 % confidence
// interval (Student's t, for the few pairs a run has).
func meanCI(v []int64) (float64, float64) {
	n := len(v)
	if n == 0 {
		return 0, 0
	}
	var sum float64
	for _, x := range v {
		sum += float64(x)
	}
	mean := sum / float64(n)
	if n < 2 {
		return mean, 0
	}
	var ss float64
	for _, x := range v {
		ss += (float64(x) - mean) * (float64(x) - mean)
	}
	sd := math.Sqrt(ss / float64(n-1))
	// t(0.975, n-1) for n-1 = 1..10; beyond, 2.0 is close enough.
	t := []float64{12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23}
	tv := 2.0
	if n-1 <= len(t) {
		tv = t[n-2]
	}
	return mean, tv * sd / math.Sqrt(float64(n))
}

// cpuTicks sums utime and stime of the processes (/proc/<pid>/stat).
func cpuTicks(pids []int) int64 {
	var sum int64
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
		if err != nil {
			continue
		}
		// The command may hold spaces; the fields follow its closing paren.
		rest := b[bytes.LastIndexByte(b, ')')+2:]
		f := strings.Fields(string(rest))
		if len(f) > 12 {
			u, _ := strconv.ParseInt(f[11], 10, 64)
			s, _ := strconv.ParseInt(f[12], 10, 64)
			sum += u + s
		}
	}
	return sum
}

// rssKB sums VmRSS of the processes.
func rssKB(pids []int) int64 {
	var sum int64
	for _, p := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
				sum += kb
			}
		}
	}
	return sum
}

// ---------------------------------------------------------------- report

// row is one line of results.jsonl, as bench/sse.sh writes it.
type row struct {
	System        string `json:"system"`
	Subscribers   int    `json:"subscribers"`
	UpstreamPeak  int64  `json:"upstream_peak"`
	UpstreamTotal int64  `json:"upstream_total"`
	// SlowDrops: subscribers caddy-coalesce dropped as slow in the run
	// (its metrics), or -1 when not known.
	SlowDrops int64  `json:"slow_drops"`
	Sub       result `json:"sub"`
}

func report(args []string) {
	if len(args) != 1 {
		log.Fatal("usage: sse report results.jsonl")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		log.Fatal(err)
	}
	var rows []row
	for _, line := range bytes.Split(b, []byte("\n")) {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		r := row{SlowDrops: -1}
		if err := json.Unmarshal(line, &r); err != nil {
			log.Fatalf("%s: %v", line, err)
		}
		rows = append(rows, r)
	}
	fmt.Println("| system | subscribers | streaming when the window opened | upstream connections (peak) | events delivered | gaps / repeats | p50 | p99 | p99.9 | proxy CPU | proxy RSS idle → loaded | RSS per subscriber |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range rows {
		if r.Sub.Stall != nil {
			continue
		}
		s := r.Sub
		perSub := "—"
		if s.N > 0 && s.ProxyRSSLoad > 0 {
			perSub = fmt.Sprintf("%.1f KiB", float64(s.ProxyRSSLoad-s.ProxyRSSIdle)/float64(s.N))
		}
		ms := func(us int64) string { return fmt.Sprintf("%.2f ms", float64(us)/1000) }
		fmt.Printf("| %s | %d | %d | %d | %d (%d–%d each) | %d / %d | %s | %s | %s | %.0f %% | %.1f → %.1f MiB | %s |\n",
			r.System, r.Subscribers, s.Ready, r.UpstreamPeak, s.Events, max(s.MinPerSub, 0), s.MaxPerSub, s.Gaps, s.Repeats,
			ms(s.P50us), ms(s.P99us), ms(s.P999us), s.ProxyCPUPct,
			float64(s.ProxyRSSIdle)/1024, float64(s.ProxyRSSLoad)/1024, perSub)
	}
	var stalls []row
	for _, r := range rows {
		if r.Sub.Stall != nil {
			stalls = append(stalls, r)
		}
	}
	if len(stalls) == 0 {
		return
	}
	fmt.Println()
	fmt.Println("A stalled subscriber, window by window (stalled minus clean, per pair of windows):")
	fmt.Println()
	fmt.Println("| system | subscribers | pairs × window | p99 clean (median) | p99 stalled (median) | p99 difference: median | mean ± 95 % CI | min … max | p50 difference: median | mean ± 95 % CI | slow drops |")
	fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range stalls {
		st := r.Sub.Stall
		var d50 []int64
		for i := range st.CleanP50 {
			d50 = append(d50, st.StallP50[i]-st.CleanP50[i])
		}
		mean, ci := meanCI(st.DiffP99)
		mean50, ci50 := meanCI(d50)
		drops := "—"
		if r.SlowDrops >= 0 {
			drops = strconv.FormatInt(r.SlowDrops, 10)
		}
		ms := func(us float64) string { return fmt.Sprintf("%.2f ms", us/1000) }
		fmt.Printf("| %s | %d | %d × %.0f s | %s | %s | %s | %s ± %s | %s … %s | %s | %s ± %s | %s |\n",
			r.System, r.Subscribers, st.Pairs, st.WindowS, ms(median(st.CleanP99)), ms(median(st.StallP99)),
			ms(median(st.DiffP99)), ms(mean), ms(ci), ms(float64(slices.Min(st.DiffP99))), ms(float64(slices.Max(st.DiffP99))),
			ms(median(d50)), ms(mean50), ms(ci50), drops)
	}
	var inside []row
	for _, r := range stalls {
		if len(r.Sub.Stall.CleanFanoutNs) > 0 && len(r.Sub.Stall.CleanFanoutNs) == len(r.Sub.Stall.StallFanoutNs) {
			inside = append(inside, r)
		}
	}
	if len(inside) > 0 {
		fmt.Println()
		fmt.Println("Inside the proxy: the time to hand an event to every subscriber (caddy_coalesce_sse_fanout_seconds), the same windows:")
		fmt.Println()
		fmt.Println("| system | subscribers | mean clean (median of windows) | mean stalled (median) | mean difference: median | mean ± 95 % CI | min … max | p99 bucket, clean windows (largest) | p99 bucket, stalled windows (largest) |")
		fmt.Println("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, r := range inside {
			st := r.Sub.Stall
			var d []int64
			for i := range st.CleanFanoutNs {
				d = append(d, st.StallFanoutNs[i]-st.CleanFanoutNs[i])
			}
			mean, ci := meanCI(d)
			us := func(ns float64) string { return fmt.Sprintf("%.1f µs", ns/1000) }
			le := func(v []int64) string {
				if slices.Contains(v, -1) {
					return "> 100 ms"
				}
				return "≤ " + us(float64(slices.Max(v)))
			}
			fmt.Printf("| %s | %d | %s | %s | %s | %s ± %s | %s … %s | %s | %s |\n",
				r.System, r.Subscribers, us(median(st.CleanFanoutNs)), us(median(st.StallFanoutNs)),
				us(median(d)), us(mean), us(ci), us(float64(slices.Min(d))), us(float64(slices.Max(d))),
				le(st.CleanFanoutP99Ns), le(st.StallFanoutP99Ns))
		}
	}
	fmt.Println()
	for _, r := range stalls {
		st := r.Sub.Stall
		fmt.Printf("%s, %d subscribers, per pair (clean → stalled p99, ms):", r.System, r.Subscribers)
		for i := range st.DiffP99 {
			fmt.Printf(" %.1f→%.1f", float64(st.CleanP99[i])/1000, float64(st.StallP99[i])/1000)
		}
		fmt.Println()
	}
}
