// Command herd measures a cold herd: round after round, N clients send a GET for
// the same brand-new key at the same instant through a proxy, and herd records
// how long each client waited. It then asks the benchmark upstream how many of
// those requests reached it. Standard library only.
//
//	herd -url http://127.0.0.1:19101 -upstream http://127.0.0.1:19080 \
//	     [-n 100] [-rounds 50] [-prefix /herd/run1] [-gap 100ms]
//
// -url may name several proxies, comma-separated (the instances of a fleet):
// client i of every herd then asks proxy i mod k, so each herd is spread
// round robin over them, and -host gives every request the same Host, as a
// load balancer in front of them would.
//
// Before the rounds, herd opens N keep-alive connections to the proxy (and N to
// the upstream), so that no round pays for a TCP handshake. With -direct (on by
// default) it first runs the same herd straight against the upstream: that is
// the latency a client would see with no proxy at all, the baseline that a
// follower's latency is compared with.
//
// With -fill K it does something else: it requests <url><prefix>/1 … /K once
// each, with -n clients in parallel, and exits (the memory test uses it to put
// every key in the cache before its timed load).
//
// The last line of its output is machine-readable:
//
//	HERDJSON {"n":100,"rounds":50,"p50_ms":...,"p99_ms":...,"max_ms":...,
//	          "upstream_calls":...,"calls_per_round":...,"direct_p50_ms":...}
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"time"
)

type result struct {
	N                int     `json:"n"`
	Rounds           int     `json:"rounds"`
	Samples          int     `json:"samples"`
	Errors           int     `json:"errors"`
	Non200           int     `json:"non_200"`
	WrongBody        int     `json:"wrong_body"`
	P50ms            float64 `json:"p50_ms"`
	P90ms            float64 `json:"p90_ms"`
	P99ms            float64 `json:"p99_ms"`
	MaxMs            float64 `json:"max_ms"`
	MeanMs           float64 `json:"mean_ms"`
	RoundMaxP50ms    float64 `json:"round_max_p50_ms"`
	UpstreamCalls    int64   `json:"upstream_calls"`
	UpstreamKeys     int     `json:"upstream_keys"`
	CallsPerRound    float64 `json:"calls_per_round"`
	MaxCallsPerRound int64   `json:"max_calls_per_round"`
	SharedPerRound   float64 `json:"distinct_bodies_per_round"`
	DirectP50ms      float64 `json:"direct_p50_ms"`
	DirectP99ms      float64 `json:"direct_p99_ms"`
	DirectMaxMs      float64 `json:"direct_max_ms"`
	WallSeconds      float64 `json:"wall_s"`
}

type sample struct {
	d    time.Duration
	err  error
	code int
	seq  int64
	path string
}

type herd struct {
	client  *http.Client
	n       int
	timeout time.Duration
	bases   []string // client i asks bases[i % len(bases)]
	host    string   // Host of every request, if set
}

func newHerd(n int, timeout time.Duration, bases []string, host string) *herd {
	tr := &http.Transport{
		MaxIdleConns:        4 * n,
		MaxIdleConnsPerHost: 2 * n,
		IdleConnTimeout:     90 * time.Second,
		DisableCompression:  true,
	}
	return &herd{client: &http.Client{Transport: tr, Timeout: timeout}, n: n, timeout: timeout, bases: bases, host: host}
}

// fire sends n concurrent GETs of path, released together, spread round
// robin over the bases, and returns one sample per client.
func (h *herd) fire(ctx context.Context, path string) []sample {
	out := make([]sample, h.n)
	var ready, done sync.WaitGroup
	start := make(chan struct{})
	for i := 0; i < h.n; i++ {
		ready.Add(1)
		done.Add(1)
		go func(i int) {
			defer done.Done()
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, h.bases[i%len(h.bases)]+path, nil)
			if h.host != "" {
				req.Host = h.host
			}
			ready.Done()
			<-start
			t0 := time.Now()
			resp, err := h.client.Do(req)
			if err != nil {
				out[i] = sample{d: time.Since(t0), err: err}
				return
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			s := sample{d: time.Since(t0), err: err, code: resp.StatusCode}
			var doc struct {
				Path string `json:"path"`
				Seq  int64  `json:"seq"`
			}
			if err == nil && json.Unmarshal(b, &doc) == nil {
				s.seq, s.path = doc.Seq, doc.Path
			}
			out[i] = s
		}(i)
	}
	ready.Wait()
	close(start)
	done.Wait()
	return out
}

func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	// nearest-rank percentile
	r := int(math.Ceil(p / 100 * float64(len(sorted))))
	if r < 1 {
		r = 1
	}
	return sorted[r-1]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

type upstreamStats struct {
	Total     int64            `json:"total"`
	Distinct  int              `json:"distinct"`
	MaxPerKey int64            `json:"max_per_key"`
	Keys      map[string]int64 `json:"keys"`
}

func getStats(c *http.Client, base, prefix string) (upstreamStats, error) {
	var s upstreamStats
	resp, err := c.Get(base + "/__stats?keys=1&prefix=" + prefix)
	if err != nil {
		return s, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return s, fmt.Errorf("upstream stats: %s", resp.Status)
	}
	return s, json.NewDecoder(resp.Body).Decode(&s)
}

func main() {
	proxy := flag.String("url", "", "base URL of the proxy under test, e.g. http://127.0.0.1:19101; several, comma-separated, share each herd round robin")
	host := flag.String("host", "", "Host header of every request to the proxies (default: that of the URL)")
	upstream := flag.String("upstream", "http://127.0.0.1:19080", "base URL of the benchmark upstream (for /__stats and -direct)")
	n := flag.Int("n", 100, "clients per herd")
	rounds := flag.Int("rounds", 50, "herds (each on a new key)")
	prefix := flag.String("prefix", "", "path prefix of the herd keys (default /herd/<random>)")
	gap := flag.Duration("gap", 100*time.Millisecond, "pause between rounds")
	timeout := flag.Duration("timeout", 5*time.Second, "per-request timeout")
	direct := flag.Bool("direct", true, "also run the herd straight against the upstream, as the baseline")
	deadline := flag.Duration("deadline", 5*time.Minute, "give up after this long in total")
	fill := flag.Int("fill", 0, "instead of herds: GET <url><prefix>/1 .. /<fill> once each, -n in parallel")
	flag.Parse()
	if *proxy == "" || *n < 1 || *rounds < 1 {
		flag.Usage()
		os.Exit(2)
	}
	if *prefix == "" {
		*prefix = fmt.Sprintf("/herd/%08x", rand.Uint32())
	}
	var bases []string
	for _, b := range strings.Split(*proxy, ",") {
		if b = strings.TrimRight(strings.TrimSpace(b), "/"); b != "" {
			bases = append(bases, b)
		}
	}
	if len(bases) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	*upstream = strings.TrimRight(*upstream, "/")

	ctx, cancel := context.WithTimeout(context.Background(), *deadline)
	defer cancel()
	if *fill > 0 {
		os.Exit(runFill(ctx, bases[0]+*prefix, *fill, *n, *timeout))
	}
	began := time.Now()
	h := newHerd(*n, *timeout, bases, *host)
	var res result
	res.N, res.Rounds = *n, *rounds

	// Baseline: the same herd against the upstream itself.
	if *direct {
		hd := newHerd(*n, *timeout, []string{*upstream}, "")
		hd.fire(ctx, "/herd-warm/direct") // open the connections
		var lat []float64
		for r := 0; r < min(*rounds, 20) && ctx.Err() == nil; r++ {
			for _, s := range hd.fire(ctx, fmt.Sprintf("/herd-direct/%d-%08x", r, rand.Uint32())) {
				if s.err == nil && s.code == 200 {
					lat = append(lat, ms(s.d))
				}
			}
			time.Sleep(*gap)
		}
		slices.Sort(lat)
		res.DirectP50ms, res.DirectP99ms = pct(lat, 50), pct(lat, 99)
		if len(lat) > 0 {
			res.DirectMaxMs = lat[len(lat)-1]
		}
		hd.client.CloseIdleConnections()
	}

	// Open N connections to the proxies with a first herd on a key outside the prefix.
	h.fire(ctx, "/herd-warm/"+strings.Trim(strings.ReplaceAll(*prefix, "/", "-"), "-"))
	time.Sleep(*gap)

	var lat []float64
	var sum float64
	var roundP50s []float64
	var distinctBodies int
	for r := 0; r < *rounds && ctx.Err() == nil; r++ {
		want := fmt.Sprintf("%s/%d-%08x", *prefix, r, rand.Uint32())
		samples := h.fire(ctx, want)
		var rl []float64
		seqs := map[int64]bool{}
		for _, s := range samples {
			switch {
			case s.err != nil:
				res.Errors++
				if res.Errors <= 5 {
					fmt.Fprintf(os.Stderr, "herd: round %d: %v\n", r, s.err)
				}
			case s.code != 200:
				res.Non200++
			case s.path != want:
				res.WrongBody++
			default:
				seqs[s.seq] = true
			}
			if s.err == nil {
				lat = append(lat, ms(s.d))
				rl = append(rl, ms(s.d))
				sum += ms(s.d)
			}
		}
		distinctBodies += len(seqs)
		slices.Sort(rl)
		roundP50s = append(roundP50s, pct(rl, 50))
		time.Sleep(*gap)
	}
	if ctx.Err() != nil {
		fmt.Fprintln(os.Stderr, "herd: deadline reached, results are partial")
	}
	slices.Sort(lat)
	slices.Sort(roundP50s)
	res.Samples = len(lat)
	if len(lat) > 0 {
		res.P50ms, res.P90ms, res.P99ms = pct(lat, 50), pct(lat, 90), pct(lat, 99)
		res.MaxMs = lat[len(lat)-1]
		res.MeanMs = sum / float64(len(lat))
		res.RoundMaxP50ms = roundP50s[len(roundP50s)-1]
	}
	res.SharedPerRound = float64(distinctBodies) / float64(*rounds)

	// Let stragglers (e.g. background refreshes) land, then count.
	time.Sleep(200 * time.Millisecond)
	sc := &http.Client{Timeout: 10 * time.Second}
	st, err := getStats(sc, *upstream, *prefix+"/")
	if err != nil {
		fmt.Fprintln(os.Stderr, "herd:", err)
	} else {
		res.UpstreamCalls, res.UpstreamKeys, res.MaxCallsPerRound = st.Total, st.Distinct, st.MaxPerKey
		res.CallsPerRound = float64(st.Total) / float64(*rounds)
	}
	res.WallSeconds = time.Since(began).Seconds()

	fmt.Printf("herd: %d rounds x %d clients via %s (prefix %s)\n", *rounds, *n, strings.Join(bases, ", "), *prefix)
	fmt.Printf("  client latency  p50 %.2f ms  p90 %.2f ms  p99 %.2f ms  max %.2f ms  (errors %d, non-200 %d, wrong body %d)\n",
		res.P50ms, res.P90ms, res.P99ms, res.MaxMs, res.Errors, res.Non200, res.WrongBody)
	if *direct {
		fmt.Printf("  upstream direct p50 %.2f ms  p99 %.2f ms  max %.2f ms\n", res.DirectP50ms, res.DirectP99ms, res.DirectMaxMs)
	}
	fmt.Printf("  upstream calls  %d for %d rounds (%.2f per round, at most %d for one key); distinct responses per round %.2f\n",
		res.UpstreamCalls, *rounds, res.CallsPerRound, res.MaxCallsPerRound, res.SharedPerRound)
	b, _ := json.Marshal(res)
	fmt.Printf("HERDJSON %s\n", b)
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		os.Exit(1)
	}
}

// runFill requests base/1 .. base/k once each with n workers and reports how
// many answered 200.
func runFill(ctx context.Context, base string, k, n int, timeout time.Duration) int {
	h := newHerd(n, timeout, []string{base}, "")
	began := time.Now()
	next := make(chan int)
	var mu sync.Mutex
	ok, bad := 0, 0
	var wg sync.WaitGroup
	for w := 0; w < n; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				req, _ := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("%s/%d", base, i), nil)
				resp, err := h.client.Do(req)
				good := false
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					good = err == nil && resp.StatusCode == 200
				}
				mu.Lock()
				if good {
					ok++
				} else {
					bad++
				}
				mu.Unlock()
			}
		}()
	}
	for i := 1; i <= k && ctx.Err() == nil; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	fmt.Printf("fill: %d keys under %s in %.2f s: %d answered 200, %d failed\n", k, base, time.Since(began).Seconds(), ok, bad)
	if bad > 0 || ctx.Err() != nil {
		return 1
	}
	return 0
}
