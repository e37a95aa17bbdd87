package main

import (
	"fmt"
	"math"
)

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
				// Judged on the median of the per-round ratios when there
				// are rounds: the ratio of the two medians mixes rounds
				// measured minutes apart on a machine whose speed drifts.
				x := 1 - c.rps/p.rps
				judged := fmt.Sprintf("%s vs %s req/s: %s %% below", f0(c.rps), f0(p.rps), f1(100*x))
				if m := r.pairedMedian(wl, sys, "caddy-proxy", rpsOf); !math.IsNaN(m) {
					x = 1 - m
					judged = fmt.Sprintf("median of the per-round ratios %s: %s %% below (medians %s vs %s req/s)", f2(m), f1(100*x), f0(c.rps), f0(p.rps))
				}
				cpu := ""
				if !math.IsNaN(c.cpuReq) && !math.IsNaN(p.cpuReq) {
					ratio := c.cpuReq / p.cpuReq
					if m := r.pairedMedian(wl, sys, "caddy-proxy", cpuReqOf); !math.IsNaN(m) {
						ratio = m
					}
					cpu = fmt.Sprintf("; Caddy's CPU per request %s vs %s µs (medians), %s × (median per round)%s", f0(c.cpuReq), f0(p.cpuReq), f2(ratio),
						r.perRound(wl, sys, "caddy-proxy", cpuReqOf))
				}
				v = append(v, verdict{fmt.Sprintf("%s: ≤ 5 %% req/s below `reverse_proxy` — %s", what, name),
					fmt.Sprintf("%s (p99 %s vs %s ms)%s%s", judged, fms(c.p99), fms(p.p99),
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
