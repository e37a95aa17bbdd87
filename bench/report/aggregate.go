package main

import (
	"math"
	"slices"
	"sort"
	"strconv"
	"strings"
)

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

// roundRatios are f(a) / f(b) for the rounds where both were measured, in
// round order, each with whether the round was disturbed.
func (r *report) roundRatios(wl, a, b string, f func(m measurement) float64) (ratios []float64, marked []bool) {
	byRound := map[int]float64{}
	otherB := map[int]float64{}
	for _, m := range r.byKey[[2]string{wl, b}] {
		if m.Failed == "" {
			byRound[m.Round] = f(m)
			otherB[m.Round] = m.OtherCPU
		}
	}
	ms := slices.Clone(r.byKey[[2]string{wl, a}])
	sort.Slice(ms, func(i, j int) bool { return ms[i].Round < ms[j].Round })
	for _, m := range ms {
		if d, ok := byRound[m.Round]; ok && m.Failed == "" && d > 0 {
			ratios = append(ratios, f(m)/d)
			marked = append(marked, m.OtherCPU > disturbed || otherB[m.Round] > disturbed)
		}
	}
	return ratios, marked
}

// pairedMedian is the median of the per-round ratios f(a) / f(b), NaN with
// fewer than two rounds. The two systems of a round are measured seconds
// apart, its ratio minutes apart from the next round's: on a machine whose
// speed drifts, the median of the pairs is the steadier figure.
func (r *report) pairedMedian(wl, a, b string, f func(m measurement) float64) float64 {
	ratios, _ := r.roundRatios(wl, a, b, f)
	if len(ratios) < 2 {
		return nan()
	}
	return median(slices.Clone(ratios))
}

// perRound lists f(a) / f(b) for the rounds where both were measured.
func (r *report) perRound(wl, a, b string, f func(m measurement) float64) string {
	ratios, marked := r.roundRatios(wl, a, b, f)
	if len(ratios) < 2 {
		return ""
	}
	parts := make([]string, len(ratios))
	for i, x := range ratios {
		parts[i] = f2(x)
		if marked[i] {
			parts[i] += "\\*"
		}
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
