// Command report turns the raw output of a bench/run.sh run into a Markdown
// report (tables, the targets of the issue with their verdicts) and a PNG plot
// (through gnuplot, if installed). Standard library only.
//
//	report -dir bench/out/<run> [-dir <run>...] [-o RESULTS.md] [-img plot.png] [-plot <dir>/plot.png]
//
// It reads <dir>/meta.env and <dir>/raw/*.txt (one file per measurement, as
// written by run.sh), writes <dir>/results.jsonl (one computed line per
// measurement) and the report. A <dir>/notes.md (hand-written notes about the
// run) is appended to the report verbatim. Every figure in the tables is the median over
// the rounds of that figure.
//
// With several -dir, the report merges runs: the first describes the report
// (its date, command, machine), and each workload is taken from the last
// directory that measured it, whose run a section measured apart describes
// (see fleet.go). So bench/RESULTS.md is made from bench/results/ and
// bench/results-fleet/, which are published one without the other.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
)

var systemOrder = []string{
	"caddy-respond", "caddy-proxy", "caddy-coalesce", "caddy-coalesce-stale",
	"nginx", "varnish", "varnish-grace", "caddy-coalesce-mem",
}

var systemText = map[string]string{
	"caddy-respond":        "Caddy `respond` (ceiling)",
	"caddy-proxy":          "Caddy `reverse_proxy`",
	"caddy-coalesce":       "Caddy + coalesce (ttl 50ms)",
	"caddy-coalesce-stale": "Caddy + coalesce (ttl 50ms, stale 1s)",
	"caddy-coalesce-mem":   "Caddy + coalesce (ttl 1s, max_entries 20000)",
	"nginx":                "NGINX micro-cache (1s, lock, stale updating)",
	"varnish":              "Varnish (ttl 50ms, grace 0s)",
	"varnish-grace":        "Varnish (ttl 50ms, grace 1s)",
}

var workloadText = map[string]string{
	"hot":   "(a) one hot key",
	"herd":  "(b) cold herd",
	"zipf":  "(c) Zipf over 10 000 keys",
	"miss":  "(d) all-miss, upstream latency as configured",
	"miss0": "(d0) all-miss, upstream answers at once",
	"mem":   "(4) memory: 10 000 live keys of 1 KiB",
}

var plotLabel = map[string]string{
	"hot": "hot key", "zipf": "Zipf 10k keys", "miss": "all-miss", "miss0": "all-miss, 0 ms upstream", "herd": "cold herd",
}

type wrkJSON struct {
	Requests  int64            `json:"requests"`
	Duration  float64          `json:"duration_s"`
	RPS       float64          `json:"rps"`
	P50       float64          `json:"p50_ms"`
	P90       float64          `json:"p90_ms"`
	P99       float64          `json:"p99_ms"`
	Max       float64          `json:"max_ms"`
	Mean      float64          `json:"mean_ms"`
	Errors    map[string]int64 `json:"errors"`
	KeyHist   map[string]int64 `json:"key_hist"`
	HaveWrk   bool             `json:"-"`
	HaveHerd  bool             `json:"-"`
	HaveUpstr bool             `json:"-"`
}

type herdJSON struct {
	N             int     `json:"n"`
	Rounds        int     `json:"rounds"`
	Samples       int     `json:"samples"`
	Errors        int     `json:"errors"`
	Non200        int     `json:"non_200"`
	WrongBody     int     `json:"wrong_body"`
	P50           float64 `json:"p50_ms"`
	P90           float64 `json:"p90_ms"`
	P99           float64 `json:"p99_ms"`
	Max           float64 `json:"max_ms"`
	UpstreamCalls int64   `json:"upstream_calls"`
	CallsPerRound float64 `json:"calls_per_round"`
	Distinct      float64 `json:"distinct_bodies_per_round"`
	DirectP50     float64 `json:"direct_p50_ms"`
	DirectP99     float64 `json:"direct_p99_ms"`
}

type upstreamJSON struct {
	Total       int64 `json:"total"`
	Distinct    int64 `json:"distinct"`
	MaxPerKey   int64 `json:"max_per_key"`
	MaxInflight int64 `json:"max_inflight"`
}

// measurement is one line of results.jsonl.
type measurement struct {
	File         string  `json:"file"`
	Workload     string  `json:"workload"`
	System       string  `json:"system"`
	Round        int     `json:"round"`
	Failed       string  `json:"failed,omitempty"`
	TTLms        float64 `json:"ttl_ms"`
	LatencyMs    float64 `json:"latency_ms"`
	Requests     int64   `json:"requests"`
	DurationS    float64 `json:"duration_s"`
	RPS          float64 `json:"rps"`
	P50          float64 `json:"p50_ms"`
	P99          float64 `json:"p99_ms"`
	Max          float64 `json:"max_ms"`
	Errors       int64   `json:"errors"`
	Non2xx       int64   `json:"non_2xx"`
	Upstream     int64   `json:"upstream"`
	UpDistinct   int64   `json:"upstream_keys"`
	MaxInflight  int64   `json:"upstream_max_inflight"`
	MinUpstream  float64 `json:"min_upstream"`
	Ratio        float64 `json:"ratio"`
	CacheEntries float64 `json:"cache_entries"`
	CacheBytes   float64 `json:"cache_bytes"`
	DirectP50    float64 `json:"direct_p50_ms,omitempty"`
	DirectP99    float64 `json:"direct_p99_ms,omitempty"`
	Distinct     float64 `json:"distinct_bodies_per_round,omitempty"`
	OtherCPU     float64 `json:"other_cpu_pct"`
	BenchCPU     float64 `json:"bench_cpu_pct"`
	// ProxyCPUus is the proxy's own CPU time (its processes' user + system)
	// per client request, in µs.
	ProxyCPUus float64 `json:"proxy_cpu_us_per_request"`
	HWMmb      float64 `json:"peak_rss_mb"`
	RSSmb      float64 `json:"rss_end_mb"`
	Procs      int     `json:"procs"`
	// Shared: the shared tier's counters, summed over a fleet's instances.
	Shared *sharedCounts `json:"shared,omitempty"`

	src int // index of the -dir the measurement was read from
}

func nan() float64 { return math.NaN() }

func readKV(path string) (map[string][]string, []string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, nil, err
	}
	defer f.Close()
	kv := map[string][]string{}
	var lines []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Text()
		lines = append(lines, line)
		if i := strings.IndexByte(line, '='); i > 0 {
			k := line[:i]
			if strings.Trim(k, "abcdefghijklmnopqrstuvwxyz0123456789_") == "" {
				kv[k] = append(kv[k], line[i+1:])
			}
		}
	}
	return kv, lines, sc.Err()
}

func first(kv map[string][]string, k string) string {
	if v := kv[k]; len(v) > 0 {
		return v[0]
	}
	return ""
}

func num(s string) float64 {
	f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
	if err != nil {
		return nan()
	}
	return f
}

func parseMeasurement(path string) (measurement, error) {
	kv, lines, err := readKV(path)
	if err != nil {
		return measurement{}, err
	}
	m := measurement{
		File:     filepath.Base(path),
		Workload: first(kv, "workload"), System: first(kv, "system"),
		Failed: strings.Join(kv["failed"], "; "),
		TTLms:  num(first(kv, "ttl_ms")), LatencyMs: num(first(kv, "latency_ms")),
		RPS: nan(), P50: nan(), P99: nan(), Max: nan(), MinUpstream: nan(), Ratio: nan(),
		CacheEntries: nan(), CacheBytes: nan(),
		OtherCPU: num(first(kv, "other_cpu_pct")), BenchCPU: num(first(kv, "bench_cpu_pct")), ProxyCPUus: nan(),
		DirectP50: 0, DirectP99: 0, HWMmb: nan(), RSSmb: nan(), Upstream: -1,
	}
	m.Round, _ = strconv.Atoi(first(kv, "round"))
	if v := num(first(kv, "rss_hwm_kb")); !math.IsNaN(v) && v > 0 {
		m.HWMmb = v / 1024
	}
	if v := num(first(kv, "rss_kb")); !math.IsNaN(v) && v > 0 {
		m.RSSmb = v / 1024
	}
	m.Procs, _ = strconv.Atoi(first(kv, "rss_procs"))

	var w wrkJSON
	var h herdJSON
	var u upstreamJSON
	haveW, haveH, haveU := false, false, false
	for _, line := range lines {
		switch {
		case strings.HasPrefix(line, "WRKJSON "):
			haveW = json.Unmarshal([]byte(line[len("WRKJSON "):]), &w) == nil
		case strings.HasPrefix(line, "HERDJSON "):
			haveH = json.Unmarshal([]byte(line[len("HERDJSON "):]), &h) == nil
		case strings.HasPrefix(line, "UPSTREAMJSON "):
			haveU = json.Unmarshal([]byte(line[len("UPSTREAMJSON "):]), &u) == nil
		case strings.HasPrefix(line, "COALESCESTATS "):
			// the admin API's /coalesce/stats; only the cache size is used
			var cs struct {
				Total struct {
					Cache *struct {
						Entries float64 `json:"entries"`
						Bytes   float64 `json:"bytes"`
					} `json:"cache"`
				} `json:"total"`
			}
			if json.Unmarshal([]byte(line[len("COALESCESTATS "):]), &cs) == nil && cs.Total.Cache != nil {
				m.CacheEntries, m.CacheBytes = cs.Total.Cache.Entries, cs.Total.Cache.Bytes
			}
			m.Shared = addShared(m.Shared, line[len("COALESCESTATS "):])
		}
	}
	if haveU {
		m.Upstream, m.UpDistinct, m.MaxInflight = u.Total, u.Distinct, u.MaxInflight
	}
	switch {
	case haveW:
		m.Requests, m.DurationS, m.RPS = w.Requests, w.Duration, w.RPS
		ticks, tck := num(first(kv, "proxy_cpu_ticks")), num(first(kv, "clk_tck"))
		if ticks > 0 && tck > 0 && w.Requests > 0 {
			m.ProxyCPUus = ticks / tck * 1e6 / float64(w.Requests)
		}
		m.P50, m.P99, m.Max = w.P50, w.P99, w.Max
		m.Errors = w.Errors["connect"] + w.Errors["read"] + w.Errors["write"] + w.Errors["timeout"]
		m.Non2xx = w.Errors["status"]
		if m.TTLms >= 0 && haveU {
			cycle := (m.TTLms + m.LatencyMs) / 1000 // seconds
			capPerKey := math.Inf(1)
			if cycle > 0 {
				capPerKey = math.Ceil(w.Duration / cycle)
			}
			var min float64
			for n, keys := range w.KeyHist {
				c, err := strconv.ParseFloat(n, 64)
				if err != nil {
					continue
				}
				min += math.Min(c, capPerKey) * float64(keys)
			}
			m.MinUpstream = min
			if min > 0 {
				m.Ratio = float64(u.Total) / min
			}
		}
	case haveH:
		m.Requests = int64(h.Samples)
		m.P50, m.P99, m.Max = h.P50, h.P99, h.Max
		m.Errors = int64(h.Errors)
		m.Non2xx = int64(h.Non200 + h.WrongBody)
		m.Upstream = h.UpstreamCalls
		m.MinUpstream = float64(h.Rounds)
		if h.Rounds > 0 {
			m.Ratio = h.CallsPerRound
		}
		m.DirectP50, m.DirectP99, m.Distinct = h.DirectP50, h.DirectP99, h.Distinct
	default:
		if m.Failed == "" {
			m.Failed = "no result line in the output"
		}
	}
	return m, nil
}

func median(xs []float64) float64 {
	var v []float64
	for _, x := range xs {
		if !math.IsNaN(x) {
			v = append(v, x)
		}
	}
	if len(v) == 0 {
		return nan()
	}
	slices.Sort(v)
	if len(v)%2 == 1 {
		return v[len(v)/2]
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2
}

// agg is the median over rounds of each figure of one (workload, system).
type agg struct {
	n, failed                                   int
	rps, p50, p99, max, up, min, ratio, hwm, rs float64
	errs, non2xx, dirP50, dirP99, distinct      float64
	upKeys, reqs, entries, cacheMB, other       float64
	cpuReq                                      float64 // proxy CPU µs per request
}

func aggregate(ms []measurement) agg {
	col := func(f func(m measurement) float64) float64 {
		var xs []float64
		for _, m := range ms {
			if m.Failed == "" {
				xs = append(xs, f(m))
			}
		}
		return median(xs)
	}
	a := agg{}
	for _, m := range ms {
		if m.Failed == "" {
			a.n++
		} else {
			a.failed++
		}
	}
	a.rps = col(func(m measurement) float64 { return m.RPS })
	a.p50 = col(func(m measurement) float64 { return m.P50 })
	a.p99 = col(func(m measurement) float64 { return m.P99 })
	a.max = col(func(m measurement) float64 { return m.Max })
	a.up = col(func(m measurement) float64 {
		if m.Upstream < 0 {
			return nan()
		}
		return float64(m.Upstream)
	})
	a.min = col(func(m measurement) float64 { return m.MinUpstream })
	a.ratio = col(func(m measurement) float64 { return m.Ratio })
	a.hwm = col(func(m measurement) float64 { return m.HWMmb })
	a.rs = col(func(m measurement) float64 { return m.RSSmb })
	a.errs = col(func(m measurement) float64 { return float64(m.Errors) })
	a.non2xx = col(func(m measurement) float64 { return float64(m.Non2xx) })
	a.dirP50 = col(func(m measurement) float64 { return m.DirectP50 })
	a.dirP99 = col(func(m measurement) float64 { return m.DirectP99 })
	a.distinct = col(func(m measurement) float64 { return m.Distinct })
	a.upKeys = col(func(m measurement) float64 { return float64(m.UpDistinct) })
	a.reqs = col(func(m measurement) float64 { return float64(m.Requests) })
	a.entries = col(func(m measurement) float64 { return m.CacheEntries })
	a.other = col(func(m measurement) float64 { return m.OtherCPU })
	a.cpuReq = col(func(m measurement) float64 { return m.ProxyCPUus })
	a.cacheMB = col(func(m measurement) float64 { return m.CacheBytes / (1 << 20) })
	return a
}

func f0(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return strconv.FormatFloat(x, 'f', 0, 64)
}

func f1(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return strconv.FormatFloat(x, 'f', 1, 64)
}

func f2(x float64) string {
	if math.IsNaN(x) || math.IsInf(x, 0) {
		return "–"
	}
	return strconv.FormatFloat(x, 'f', 2, 64)
}

// fms formats a latency in ms with a precision that suits its size.
func fms(x float64) string {
	switch {
	case math.IsNaN(x):
		return "–"
	case x < 10:
		return f2(x)
	default:
		return f1(x)
	}
}

type report struct {
	meta    map[string][]string // the first run's
	byKey   map[[2]string][]measurement
	aggs    map[[2]string]agg
	systems []string // in display order, as measured
	dir     string   // the first run's
	wls     []string
	runs    []run // every -dir, the first one first
	out     string
}

// run is one run directory the report reads.
type run struct {
	dir  string
	meta map[string][]string
}

// dirList is the -dir flag, which may be repeated.
type dirList []string

func (d *dirList) String() string     { return strings.Join(*d, ",") }
func (d *dirList) Set(v string) error { *d = append(*d, v); return nil }

// span is "min–max" of a figure over the rounds of (wl, sys).
func (r *report) span(wl, sys string, f func(m measurement) float64, format func(float64) string) string {
	lo, hi := math.Inf(1), math.Inf(-1)
	n := 0
	for _, m := range r.byKey[[2]string{wl, sys}] {
		if m.Failed != "" || math.IsNaN(f(m)) {
			continue
		}
		lo, hi = math.Min(lo, f(m)), math.Max(hi, f(m))
		n++
	}
	if n < 2 {
		return ""
	}
	return " (" + format(lo) + "–" + format(hi) + ")"
}

// perRound lists f(a) / f(b) for the rounds where both were measured.
func (r *report) perRound(wl, a, b string, f func(m measurement) float64) string {
	byRound := map[int]float64{}
	otherB := map[int]float64{}
	for _, m := range r.byKey[[2]string{wl, b}] {
		if m.Failed == "" {
			byRound[m.Round] = f(m)
			otherB[m.Round] = m.OtherCPU
		}
	}
	var parts []string
	ms := slices.Clone(r.byKey[[2]string{wl, a}])
	sort.Slice(ms, func(i, j int) bool { return ms[i].Round < ms[j].Round })
	for _, m := range ms {
		if d, ok := byRound[m.Round]; ok && m.Failed == "" && d > 0 {
			mark := ""
			if m.OtherCPU > disturbed || otherB[m.Round] > disturbed {
				mark = "\\*"
			}
			parts = append(parts, f2(f(m)/d)+mark)
		}
	}
	if len(parts) < 2 {
		return ""
	}
	return "; per round " + strings.Join(parts, ", ")
}

// disturbed is the share of the machine's CPU (percent) taken by processes
// outside the benchmark above which a measurement is marked as disturbed.
const disturbed = 25.0

func rpsOf(m measurement) float64    { return m.RPS }
func p99Of(m measurement) float64    { return m.P99 }
func cpuReqOf(m measurement) float64 { return m.ProxyCPUus }

// otherCell lists, round by round, the share of the machine's CPU that
// processes outside the benchmark took during the measurement.
func (r *report) otherCell(wl, sys string) string {
	ms := slices.Clone(r.byKey[[2]string{wl, sys}])
	sort.Slice(ms, func(i, j int) bool { return ms[i].Round < ms[j].Round })
	var parts []string
	for _, m := range ms {
		if m.Failed != "" || math.IsNaN(m.OtherCPU) {
			continue
		}
		parts = append(parts, f0(m.OtherCPU))
	}
	if len(parts) == 0 {
		return "–"
	}
	return strings.Join(parts, ", ")
}

// interference summarizes other_cpu_pct over the measurements read from
// the -dir of index src.
func (r *report) interference(src int) (med, max float64, n, over int) {
	var xs []float64
	for _, ms := range r.byKey {
		for _, m := range ms {
			if m.src == src && m.Failed == "" && !math.IsNaN(m.OtherCPU) {
				xs = append(xs, m.OtherCPU)
				if m.OtherCPU > disturbed {
					over++
				}
			}
		}
	}
	if len(xs) == 0 {
		return nan(), nan(), 0, 0
	}
	slices.Sort(xs)
	return median(xs), xs[len(xs)-1], len(xs), over
}

func (r *report) get(wl, sys string) (agg, bool) {
	a, ok := r.aggs[[2]string{wl, sys}]
	return a, ok && a.n > 0
}

func main() {
	var dirs dirList
	flag.Var(&dirs, "dir", "run directory (with meta.env and raw/); repeated: each workload comes from the last one that measured it")
	out := flag.String("o", "", "Markdown report to write (default <first dir>/RESULTS.md)")
	img := flag.String("img", "plot.png", "image link used in the report")
	plot := flag.String("plot", "", "PNG to write (default <first dir>/plot.png)")
	flag.Parse()
	if len(dirs) == 0 {
		flag.Usage()
		os.Exit(2)
	}
	if *out == "" {
		*out = filepath.Join(dirs[0], "RESULTS.md")
	}
	if *plot == "" {
		*plot = filepath.Join(dirs[0], "plot.png")
	}

	r := &report{dir: dirs[0], out: *out, byKey: map[[2]string][]measurement{}, aggs: map[[2]string]agg{}}
	var all []measurement
	for i, dir := range dirs {
		meta, _, err := readKV(filepath.Join(dir, "meta.env"))
		if err != nil {
			log.Fatal(err)
		}
		r.runs = append(r.runs, run{dir: dir, meta: meta})
		ms, err := readRun(dir, i)
		if err != nil {
			log.Fatal(err)
		}
		all = append(all, ms...)
	}
	r.meta = r.runs[0].meta
	from := map[string]int{} // workload -> the last -dir that measured it
	for _, m := range all {
		from[m.Workload] = max(from[m.Workload], m.src)
	}
	seenSys := map[string]bool{}
	seenWl := map[string]bool{}
	for _, m := range all {
		if m.src != from[m.Workload] {
			continue
		}
		k := [2]string{m.Workload, m.System}
		r.byKey[k] = append(r.byKey[k], m)
		seenSys[m.System] = true
		seenWl[m.Workload] = true
	}
	for k, ms := range r.byKey {
		r.aggs[k] = aggregate(ms)
	}
	for _, s := range systemOrder {
		if seenSys[s] {
			r.systems = append(r.systems, s)
		}
	}
	for _, w := range []string{"hot", "herd", "zipf", "miss", "miss0", "mem"} {
		if seenWl[w] {
			r.wls = append(r.wls, w)
		}
	}

	plotErr := r.plot(*plot)
	var b strings.Builder
	r.markdown(&b, *img, plotErr)
	if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
		log.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "report: wrote %s", *out)
	if plotErr == nil {
		fmt.Fprintf(os.Stderr, " and %s", *plot)
	} else {
		fmt.Fprintf(os.Stderr, " (no plot: %v)", plotErr)
	}
	fmt.Fprintln(os.Stderr)
}

// readRun parses the raw files of the run in dir (the -dir of index src)
// and writes its results.jsonl.
func readRun(dir string, src int) ([]measurement, error) {
	files, _ := filepath.Glob(filepath.Join(dir, "raw", "*.txt"))
	sort.Strings(files)
	jl, err := os.Create(filepath.Join(dir, "results.jsonl"))
	if err != nil {
		return nil, err
	}
	defer jl.Close()
	var ms []measurement
	for _, f := range files {
		m, err := parseMeasurement(f)
		if err != nil {
			log.Printf("%s: %v", f, err)
			continue
		}
		m.src = src
		ms = append(ms, m)
		b, err := json.Marshal(jsonSafe(m))
		if err != nil { // a figure jsonSafe does not know of
			return nil, fmt.Errorf("%s: %w", f, err)
		}
		fmt.Fprintf(jl, "%s\n", b)
	}
	return ms, jl.Close()
}

// jsonSafe replaces NaN (which encoding/json refuses) by -1.
func jsonSafe(m measurement) measurement {
	fix := func(p *float64) {
		if math.IsNaN(*p) || math.IsInf(*p, 0) {
			*p = -1
		}
	}
	for _, p := range []*float64{&m.TTLms, &m.LatencyMs, &m.DurationS, &m.RPS, &m.P50, &m.P99, &m.Max,
		&m.MinUpstream, &m.Ratio, &m.CacheEntries, &m.CacheBytes, &m.OtherCPU, &m.BenchCPU, &m.DirectP50, &m.DirectP99, &m.Distinct, &m.HWMmb, &m.RSSmb, &m.ProxyCPUus} {
		fix(p)
	}
	return m
}

func (r *report) m(k string) string { return first(r.meta, k) }

type verdict struct {
	target, measured, result string
}

func pass(ok bool) string {
	if ok {
		return "**pass**"
	}
	return "**FAIL**"
}

const pending = "pending (not measured in this run)"

func (r *report) targets() []verdict {
	var v []verdict
	lat := num(r.m("latency_ms"))
	for _, sys := range []string{"caddy-coalesce", "caddy-coalesce-stale"} {
		name := "`" + sys + "`"
		hot, okHot := r.get("hot", sys)
		if okHot {
			v = append(v, verdict{"hot key: upstream ≤ 1.02 × ⌈duration ÷ (ttl + latency)⌉ — " + name,
				fmt.Sprintf("%s upstream requests for a minimum of %s: ratio %s", f0(hot.up), f0(hot.min), f2(hot.ratio)),
				pass(hot.ratio <= 1.02)})
		} else {
			v = append(v, verdict{"hot key: upstream ratio ≤ 1.02 — " + name, "–", pending})
		}
		if resp, ok := r.get("hot", "caddy-respond"); ok && okHot {
			x := hot.rps / resp.rps
			v = append(v, verdict{"hot key: req/s ≥ 0.9 × Caddy `respond` — " + name,
				fmt.Sprintf("%s vs %s req/s: %s ×%s", f0(hot.rps), f0(resp.rps), f2(x), r.perRound("hot", sys, "caddy-respond", rpsOf)), pass(x >= 0.9)})
		} else {
			v = append(v, verdict{"hot key: req/s ≥ 0.9 × Caddy `respond` — " + name, "–", pending})
		}
		vsys := "varnish"
		if sys == "caddy-coalesce-stale" {
			vsys = "varnish-grace"
		}
		if va, ok := r.get("hot", vsys); ok && okHot {
			x := hot.rps / va.rps
			v = append(v, verdict{fmt.Sprintf("hot key: req/s ≥ 1.0 × `%s` — %s", vsys, name),
				fmt.Sprintf("%s vs %s req/s: %s ×%s", f0(hot.rps), f0(va.rps), f2(x), r.perRound("hot", sys, vsys, rpsOf)), pass(x >= 1.0)})
			v = append(v, verdict{fmt.Sprintf("hot key: p99 ≤ `%s`'s — %s", vsys, name),
				fmt.Sprintf("%s ms vs %s ms%s", fms(hot.p99), fms(va.p99), r.perRound("hot", sys, vsys, p99Of)), pass(hot.p99 <= va.p99)})
		} else {
			v = append(v, verdict{fmt.Sprintf("hot key: req/s and p99 vs `%s` — %s", vsys, name), "–", pending})
		}
		if h, ok := r.get("herd", sys); ok {
			v = append(v, verdict{fmt.Sprintf("cold herd: p99 ≤ upstream latency + 5 ms (%s ms) — %s", f0(lat+5), name),
				fmt.Sprintf("p99 %s ms (upstream alone, same herd: p99 %s ms); %s upstream calls per herd",
					fms(h.p99), fms(h.dirP99), f2(h.ratio)),
				pass(h.p99 <= lat+5)})
			v = append(v, verdict{"cold herd: p99 ≤ p99 of the same herd sent to the upstream alone + 5 ms (client and CPU noise cancel out) — " + name,
				fmt.Sprintf("p99 %s ms vs %s + 5 ms", fms(h.p99), fms(h.dirP99)),
				pass(h.p99 <= h.dirP99+5)})
		} else {
			v = append(v, verdict{"cold herd: p99 ≤ upstream latency + 5 ms — " + name, "–", pending})
		}
		for _, wl := range []string{"miss0", "miss"} {
			c, ok1 := r.get(wl, sys)
			p, ok2 := r.get(wl, "caddy-proxy")
			what := "all-miss (upstream answers at once)"
			if wl == "miss" {
				what = fmt.Sprintf("all-miss (upstream latency %s ms)", f0(lat))
			}
			if ok1 && ok2 {
				x := 1 - c.rps/p.rps
				cpu := ""
				if !math.IsNaN(c.cpuReq) && !math.IsNaN(p.cpuReq) {
					cpu = fmt.Sprintf("; Caddy's CPU per request %s vs %s µs (%s ×)%s", f0(c.cpuReq), f0(p.cpuReq), f2(c.cpuReq/p.cpuReq),
						r.perRound(wl, sys, "caddy-proxy", cpuReqOf))
				}
				v = append(v, verdict{fmt.Sprintf("%s: ≤ 5 %% req/s below `reverse_proxy` — %s", what, name),
					fmt.Sprintf("%s vs %s req/s: %s %% below (p99 %s vs %s ms)%s%s", f0(c.rps), f0(p.rps), f1(100*x), fms(c.p99), fms(p.p99),
						r.perRound(wl, sys, "caddy-proxy", rpsOf), cpu),
					pass(x <= 0.05)})
			} else {
				v = append(v, verdict{fmt.Sprintf("%s: ≤ 5 %% req/s below `reverse_proxy` — %s", what, name), "–", pending})
			}
		}
	}
	c, ok1 := r.get("mem", "caddy-coalesce-mem")
	p, ok2 := r.get("mem", "caddy-proxy")
	if ok1 && ok2 {
		d := c.hwm - p.hwm
		v = append(v, verdict{"memory: < 50 MB over plain Caddy with 10 000 live keys of 1 KiB (peak RSS)",
			fmt.Sprintf("%s MB vs %s MB: %s MB more (at the end: %s vs %s MB; the cache held %s entries, %s MB)",
				f1(c.hwm), f1(p.hwm), f1(d), f1(c.rs), f1(p.rs), f0(c.entries), f1(c.cacheMB)),
			pass(d < 50)})
	} else {
		v = append(v, verdict{"memory: < 50 MB over plain Caddy with 10 000 live keys", "–", pending})
	}
	return append(v, r.fleetTargets()...)
}

func (r *report) markdown(b *strings.Builder, img string, plotErr error) {
	p := func(format string, a ...any) { fmt.Fprintf(b, format, a...) }
	rounds := r.m("rounds")
	p("# caddy-coalesce — side-by-side benchmark results\n\n")
	p("Produced by `bench/run.sh` on %s (rounds: %s; every figure is the median over the rounds; the systems were measured one after the other, in a rotated order in each round, each started afresh for each measurement).\n\n", r.m("date"), rounds)
	p("**Command:** `%s`\n\n", r.m("command"))
	p("**Machine:** %s; %s; %s; %s RAM. Client (wrk, herd), upstream and proxy share these CPUs, so absolute figures are those of a small shared box: compare the systems with each other, within this run.\n", r.m("cpu"), r.m("host"), r.m("os"), r.m("memory"))
	p("Load average at the start %s, at the end %s.", r.m("loadavg_start"), r.m("loadavg_end"))
	if med, max, n, over := r.interference(0); n > 0 {
		p(" **Interference:** during the loads, processes outside the benchmark (or the hypervisor) took a median %s %% of the machine's CPU time (at most %s %%); %d of %d measurements had more than %.0f %% (the *other CPU %%* column, one figure per round; marked \\* in the per-round ratios). Where that share is high, the figures of that round say more about the machine than about the systems.", f0(med), f0(max), over, n, disturbed)
	}
	p("\n\n")
	p("**Software:** %s; nginx %s; %s; %s; %s. Upstream: `bench/upstream`, 1 KiB JSON after %s ms.\n\n",
		r.m("caddy"), r.m("nginx"), r.m("varnish"), r.m("wrk"), r.m("go"), r.m("latency_ms"))
	p("**Settings:** wrk %s threads, %s connections, %s per run; cold herd %s clients × %s herds; Zipf s = %s over %s keys; memory test %s keys for %s. Raw output: [`results/`](results/) (one file per measurement in `results/raw/`, configurations in `results/conf/`).\n\n",
		r.m("threads"), r.m("connections"), r.m("duration"), r.m("herd_n"), r.m("herd_rounds"), r.m("zipf_s"), r.m("keys"), r.m("mem_keys"), r.m("mem_duration"))
	if sk := r.meta["skipped"]; len(sk) > 0 {
		p("**Not measured in this run:**\n\n")
		for _, s := range sk {
			name, why, _ := strings.Cut(s, ":")
			p("- `%s`: %s\n", name, why)
		}
		p("\n")
	}
	if f := r.m("failed"); f != "" && f != "0" {
		p("**%s measurement(s) failed** (see the `failed=` lines in the raw files); they are left out of the medians.\n\n", f)
	}

	p("## Targets\n\nFigures are medians over the rounds; *per round* gives the ratio of the two systems in each round (measured minutes apart), to show how much of a verdict is noise.\n\n| target | measured | verdict |\n|---|---|---|\n")
	for _, v := range r.targets() {
		p("| %s | %s | %s |\n", v.target, v.measured, v.result)
	}
	p("\n")

	if plotErr == nil {
		p("## Plot\n\n![req/s and p99 latency per system and workload](%s)\n\n", img)
	} else {
		p("## Plot\n\n(no plot: %v)\n\n", plotErr)
	}

	for i, wl := range r.wls {
		p("## %s\n\n", workloadText[wl])
		src := r.srcOf(wl)
		if src != 0 && (i == 0 || r.srcOf(r.wls[i-1]) != src) {
			r.runNote(b, src)
		}
		switch wl {
		case "hot":
			p("All connections ask for one key, `GET /hot/.../key`. Minimum = ⌈duration ÷ (ttl + upstream latency)⌉ (ttl of the system: 50 ms, NGINX 1 s, `reverse_proxy` 0); ratio = upstream requests ÷ minimum.\n\n")
		case "zipf":
			p("Keys drawn with P(rank k) ∝ 1/k^s. Minimum = Σ over keys of min(requests for the key, ⌈duration ÷ (ttl + latency)⌉).\n\n")
		case "miss":
			p("Every request is for a new key: nothing can be shared, this is the price of the proxy (and of its cache bookkeeping) over the upstream latency.\n\n")
		case "miss0":
			p("Every request is for a new key and the upstream answers at once (`?delay=0s`): the run is CPU-bound, so a proxy's own overhead shows in req/s. The all-miss overhead target is judged here (and on the previous table).\n\n")
		case "herd":
			p("Each herd: %s clients on open keep-alive connections send `GET` for one brand-new key at the same instant; latency of every client (leader and followers), over all herds. *Upstream alone* is the same herd sent straight to the upstream: the latency a client sees without any proxy. Calls/herd: upstream requests per herd (ideal: 1). Distinct bodies: different upstream responses the %s clients received per herd.\n\n", r.m("herd_n"), r.m("herd_n"))
		case "mem":
			p("Every one of %s keys requested once (`herd -fill`), then all of them round-robin by %s connections for %s, through `coalesce { ttl 1s  max_entries 20000 }`, and the same traffic through plain `reverse_proxy`. RSS of the proxy process at the end of the load and its peak (VmHWM). *Cache entries* and *cache MB* are the module's own count (admin API `/coalesce/stats`) at the end of the load: entries held in memory (expiry is checked on read, so an entry stays until it is replaced or evicted). An entry is fresh only if its key came round again within 1 s: when one pass over all keys takes longer than that on this machine (client requests ÷ keys ÷ duration < 1 pass per second), many held entries are expired copies — they cost the same memory, which is what this test measures.\n\n", r.m("mem_keys"), r.m("mem_connections"), r.m("mem_duration"))
		}
		switch wl {
		case "herd":
			p("| system | client p50 ms | client p99 ms (range) | client max ms | upstream alone p50 / p99 ms | calls/herd | distinct bodies/herd | errors | peak RSS MB | other CPU %% |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		case "mem":
			p("| system | req/s | p99 ms | client requests (timed load) | upstream requests (fill + load) | upstream keys | cache entries at end | cache MB | RSS at end MB | peak RSS MB | peak RSS over plain Caddy MB | other CPU %% |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		default:
			p("| system | req/s (range) | p50 ms | p99 ms (range) | max ms | upstream requests | minimum | ratio | proxy CPU µs / request | peak RSS MB | errors / non-2xx | other CPU %% |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		}
		base, _ := r.get("mem", "caddy-proxy")
		r.measuredRows(p, wl, r.systems, systemText, func(sys, name string, a agg) {
			switch wl {
			case "herd":
				p("| %s | %s | %s%s | %s | %s / %s | %s | %s | %s | %s | %s |\n", name, fms(a.p50), fms(a.p99), r.span(wl, sys, p99Of, fms), fms(a.max),
					fms(a.dirP50), fms(a.dirP99), f2(a.ratio), f1(a.distinct), f0(a.errs+a.non2xx), f1(a.hwm), r.otherCell(wl, sys))
			case "mem":
				over := "–"
				if sys != "caddy-proxy" && base.n > 0 {
					over = f1(a.hwm - base.hwm)
				}
				p("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", name, f0(a.rps), fms(a.p99), f0(a.reqs), f0(a.up), f0(a.upKeys),
					f0(a.entries), f1(a.cacheMB), f1(a.rs), f1(a.hwm), over, r.otherCell(wl, sys))
			default:
				up, mn, ratio := f0(a.up), f0(a.min), f2(a.ratio)
				if sys == "caddy-respond" {
					up, mn, ratio = "–", "–", "–"
				}
				p("| %s | %s%s | %s | %s%s | %s | %s | %s | %s | %s | %s | %s / %s | %s |\n", name, f0(a.rps), r.span(wl, sys, rpsOf, f0), fms(a.p50),
					fms(a.p99), r.span(wl, sys, p99Of, fms), fms(a.max),
					up, mn, ratio, f0(a.cpuReq), f1(a.hwm), f0(a.errs), f0(a.non2xx), r.otherCell(wl, sys))
			}
		})
		p("\n")
		// Hand-written notes about a run measured apart go after its last section.
		if src != 0 && (i == len(r.wls)-1 || r.srcOf(r.wls[i+1]) != src) {
			r.appendNotes(b, r.runs[src].dir, "")
			p("\n")
		}
	}
	r.fleetMarkdown(b)

	p("## Notes\n\n")
	p("- Peak RSS is VmHWM from `/proc/<pid>/status`, summed over the proxy's processes (NGINX master, workers, cache manager and loader; Varnish manager and child), so pages shared between processes count once per process.\n")
	p("- wrk counts a non-2xx answer as an error (`non-2xx` column); `errors` are connect/read/write errors and timeouts.\n")
	p("- Latency percentiles of wrk are those of its own histogram (`latency:percentile()` in `done()`); wrk measures from the moment it writes a request, so with all connections busy they are service times.\n")
	p("- How to run and how to read each table: [`README.md`](README.md).\n")
	r.appendNotes(b, r.dir, "\n")
}

// appendNotes appends dir/notes.md, if there is one, after lead:
// hand-written notes about a run (what the figures mean, what is being done
// about them) live next to its raw output, so that regenerating the report
// keeps them.
func (r *report) appendNotes(b *strings.Builder, dir, lead string) {
	if notes, err := os.ReadFile(filepath.Join(dir, "notes.md")); err == nil && len(strings.TrimSpace(string(notes))) > 0 {
		fmt.Fprintf(b, "%s%s", lead, notes)
	}
}

// systemColor keeps a system's colour the same from plot to plot.
var systemColor = map[string]string{
	"caddy-respond":        "#8c8c8c",
	"caddy-proxy":          "#1f77b4",
	"caddy-coalesce":       "#2ca02c",
	"caddy-coalesce-stale": "#98df8a",
	"nginx":                "#ff7f0e",
	"varnish":              "#9467bd",
	"varnish-grace":        "#c5b0d5",
}

// plotCmd plots one bar per system (column 2, 3, ...) for each row of dat.
func plotCmd(dat string, systems []string) string {
	var parts []string
	for i, sys := range systems {
		src := "''"
		if i == 0 {
			src = fmt.Sprintf("%q", dat)
		}
		xtic := ""
		if i == 0 {
			xtic = ":xtic(1)"
		}
		c := systemColor[sys]
		if c == "" {
			c = "#444444"
		}
		parts = append(parts, fmt.Sprintf("%s using %d%s title %q lc rgb %q", src, i+2, xtic, sys, c))
	}
	return "plot " + strings.Join(parts, ", \\\n     ") + "\n"
}

// plot writes gnuplot data and script next to the PNG and runs gnuplot.
func (r *report) plot(png string) error {
	gp, err := exec.LookPath("gnuplot")
	if err != nil {
		return fmt.Errorf("gnuplot not installed (apt-get install -y gnuplot-nox)")
	}
	var systems []string
	for _, s := range r.systems {
		if s != "caddy-coalesce-mem" {
			systems = append(systems, s)
		}
	}
	if len(systems) == 0 {
		return fmt.Errorf("nothing to plot")
	}
	dir := filepath.Dir(png)
	base := strings.TrimSuffix(filepath.Base(png), ".png")
	write := func(name string, wls []string, val func(a agg) float64) (string, error) {
		path := filepath.Join(dir, base+"-"+name+".dat")
		var b strings.Builder
		b.WriteString("# workload")
		for _, s := range systems {
			b.WriteString(" " + s)
		}
		b.WriteString("\n")
		rows := 0
		for _, wl := range wls {
			if !slices.Contains(r.wls, wl) {
				continue
			}
			rows++
			fmt.Fprintf(&b, "%q", plotLabel[wl])
			for _, s := range systems {
				a, ok := r.get(wl, s)
				v := nan()
				if ok {
					v = val(a)
				}
				if math.IsNaN(v) || v <= 0 {
					b.WriteString(" ?")
				} else {
					fmt.Fprintf(&b, " %.3f", v)
				}
			}
			b.WriteString("\n")
		}
		if rows == 0 {
			return "", nil
		}
		return path, os.WriteFile(path, []byte(b.String()), 0o644)
	}
	rpsDat, err := write("rps", []string{"hot", "zipf", "miss", "miss0"}, func(a agg) float64 { return a.rps })
	if err != nil {
		return err
	}
	p99Dat, err := write("p99", []string{"hot", "zipf", "miss", "miss0", "herd"}, func(a agg) float64 { return a.p99 })
	if err != nil {
		return err
	}
	var s strings.Builder
	panels := 0
	if rpsDat != "" {
		panels++
	}
	if p99Dat != "" {
		panels++
	}
	fmt.Fprintf(&s, "set terminal pngcairo size 1400,%d font 'sans,11' noenhanced\n", 80+480*panels)
	fmt.Fprintf(&s, "set output %q\n", filepath.Base(png))
	fmt.Fprintf(&s, "set multiplot layout %d,1 title %q\n", panels,
		fmt.Sprintf("caddy-coalesce benchmark, median of %s rounds, upstream latency %s ms (%s)", r.m("rounds"), r.m("latency_ms"), r.m("date")))
	s.WriteString(`set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key outside right top vertical
set datafile missing "?"
set yrange [0:*]
set format y "%.0f"
`)
	if rpsDat != "" {
		fmt.Fprintf(&s, "set title 'Throughput, req/s (higher is better)'\nset ylabel 'req/s'\n")
		s.WriteString(plotCmd(filepath.Base(rpsDat), systems))
	}
	if p99Dat != "" {
		fmt.Fprintf(&s, "set title 'p99 latency, ms, log scale (lower is better)'\nset ylabel 'p99 ms'\nset logscale y\nset yrange [*:*]\nset format y '%%g'\n")
		s.WriteString(plotCmd(filepath.Base(p99Dat), systems))
	}
	s.WriteString("unset multiplot\n")
	script := filepath.Join(dir, base+".gp")
	if err := os.WriteFile(script, []byte(s.String()), 0o644); err != nil {
		return err
	}
	cmd := exec.Command(gp, filepath.Base(script))
	cmd.Dir = dir
	outb, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("gnuplot: %v: %s", err, strings.TrimSpace(string(outb)))
	}
	return nil
}

// srcOf is the index of the -dir that wl's figures were read from.
func (r *report) srcOf(wl string) int {
	for _, sys := range r.systems {
		if ms := r.byKey[[2]string{wl, sys}]; len(ms) > 0 {
			return ms[0].src
		}
	}
	return 0
}

// measuredRows calls row for each of systems measured in wl, in order, with
// its name column (text[sys], and how many of its measurements failed); a
// system whose every measurement failed gets a row saying only that.
func (r *report) measuredRows(p func(string, ...any), wl string, systems []string, text map[string]string, row func(sys, name string, a agg)) {
	for _, sys := range systems {
		a, ok := r.aggs[[2]string{wl, sys}]
		if !ok {
			continue
		}
		name := text[sys]
		if a.failed > 0 {
			name += fmt.Sprintf(" (%d failed)", a.failed)
		}
		if a.n == 0 {
			p("| %s | failed |\n", name)
			continue
		}
		row(sys, name, a)
	}
}
