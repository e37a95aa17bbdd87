package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"log"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

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
