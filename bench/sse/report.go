package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log"
	"os"
	"slices"
	"strconv"
)

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
		d50 := pairDiffs(st.StallP50, st.CleanP50)
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
			d := pairDiffs(st.StallFanoutNs, st.CleanFanoutNs)
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

// pairDiffs is, per pair of windows, the stalled one's figure minus the
// clean one's.
func pairDiffs(stalled, clean []int64) []int64 {
	d := make([]int64, len(clean))
	for i := range clean {
		d[i] = stalled[i] - clean[i]
	}
	return d
}
