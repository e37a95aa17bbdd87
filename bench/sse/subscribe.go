package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

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
