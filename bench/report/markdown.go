package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

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

	p("## Targets\n\nFigures are medians over the rounds; *per round* gives the ratio of the two systems in each round (measured minutes apart), to show how much of a verdict is noise. The all-miss targets are judged on the median of those per-round ratios.\n\n| target | measured | verdict |\n|---|---|---|\n")
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
