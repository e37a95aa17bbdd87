package main

// The fleet workload (bench/run.sh, BENCH_WORKLOADS=fleet): three Caddy
// instances with the same Caddyfile in front of the same upstream, each
// alone (caddy-fleet) or sharing one redis-server (caddy-fleet-shared).
// Its three parts are measured as workloads of their own: fleet-hot,
// fleet-hit and fleet-herd.

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"
)

const (
	fleetAlone  = "caddy-fleet"
	fleetShared = "caddy-fleet-shared"
)

var fleetSystems = []string{fleetAlone, fleetShared}

var fleetSystemText = map[string]string{
	fleetAlone:  "3 × Caddy + coalesce, each alone",
	fleetShared: "3 × Caddy + coalesce, `shared` on one Redis",
}

// sharedCounts are the shared tier's counters (/coalesce/stats, "shared")
// summed over the instances of a fleet, from their start (probes included)
// to the end of the load.
type sharedCounts struct {
	Instances    int     `json:"instances"`
	NotUp        int     `json:"instances_not_up"` // the tier was not "up" at the end
	SharedHits   float64 `json:"shared_hits"`
	Won          float64 `json:"leaderships_won"`
	Lost         float64 `json:"leaderships_lost"`
	Waits        float64 `json:"fleet_waits"`
	WaitTimeouts float64 `json:"fleet_wait_timeouts"`
	Errors       float64 `json:"redis_errors"`
}

// addShared adds the tier's counters of one instance's /coalesce/stats to
// sum; an instance without the tier leaves sum as it is (nil stays nil).
func addShared(sum *sharedCounts, stats string) *sharedCounts {
	var st struct {
		Total struct {
			Shared *struct {
				State        string  `json:"state"`
				SharedHits   float64 `json:"shared_hits"`
				Won          float64 `json:"leaderships_won"`
				Lost         float64 `json:"leaderships_lost"`
				Waits        float64 `json:"fleet_waits"`
				WaitTimeouts float64 `json:"fleet_wait_timeouts"`
				Errors       float64 `json:"redis_errors"`
			} `json:"shared"`
		} `json:"total"`
	}
	if json.Unmarshal([]byte(stats), &st) != nil || st.Total.Shared == nil {
		return sum
	}
	s := st.Total.Shared
	if sum == nil {
		sum = &sharedCounts{}
	}
	sum.Instances++
	if s.State != "up" {
		sum.NotUp++
	}
	sum.SharedHits += s.SharedHits
	sum.Won += s.Won
	sum.Lost += s.Lost
	sum.Waits += s.Waits
	sum.WaitTimeouts += s.WaitTimeouts
	sum.Errors += s.Errors
	return sum
}

// sharedMedian is the median over the rounds of one of the tier's counters.
func (r *report) sharedMedian(wl, sys string, f func(s *sharedCounts) float64) float64 {
	var xs []float64
	for _, m := range r.byKey[[2]string{wl, sys}] {
		if m.Failed == "" && m.Shared != nil {
			xs = append(xs, f(m.Shared))
		}
	}
	return median(xs)
}

// sharedCells are the table cells of the tier's counters: shared hits,
// leaderships won / lost, fleet waits (timed out), Redis errors.
func (r *report) sharedCells(wl, sys string) string {
	med := func(f func(s *sharedCounts) float64) string { return f0(r.sharedMedian(wl, sys, f)) }
	hits := med(func(s *sharedCounts) float64 { return s.SharedHits })
	if hits == "–" {
		return "– | – | – | –"
	}
	return fmt.Sprintf("%s | %s / %s | %s (%s) | %s", hits,
		med(func(s *sharedCounts) float64 { return s.Won }), med(func(s *sharedCounts) float64 { return s.Lost }),
		med(func(s *sharedCounts) float64 { return s.Waits }), med(func(s *sharedCounts) float64 { return s.WaitTimeouts }),
		med(func(s *sharedCounts) float64 { return s.Errors }))
}

// rounds lists f of (wl, sys) round by round.
func (r *report) rounds(wl, sys string, f func(m measurement) float64, format func(float64) string) string {
	ms := slices.Clone(r.byKey[[2]string{wl, sys}])
	sort.Slice(ms, func(i, j int) bool { return ms[i].Round < ms[j].Round })
	var parts []string
	for _, m := range ms {
		if m.Failed == "" {
			parts = append(parts, format(f(m)))
		}
	}
	if len(parts) < 2 {
		return ""
	}
	return "; per round " + strings.Join(parts, ", ")
}

func ratioOf(m measurement) float64 { return m.Ratio }

// rpsPerCPU is req/s per percent of the machine's CPU time that the
// benchmark's processes (client, upstream, servers) had during the load: on
// a shared machine, req/s follows the CPU left by other work.
func rpsPerCPU(m measurement) float64 {
	if !(m.BenchCPU > 0) {
		return nan()
	}
	return m.RPS / m.BenchCPU
}

// medianOf is the median of f over the rounds of (wl, sys).
func (r *report) medianOf(wl, sys string, f func(m measurement) float64) float64 {
	var xs []float64
	for _, m := range r.byKey[[2]string{wl, sys}] {
		if m.Failed == "" {
			xs = append(xs, f(m))
		}
	}
	return median(xs)
}

func (r *report) fleetTargets() []verdict {
	var v []verdict
	shared, okS := r.get("fleet-hot", fleetShared)
	if okS {
		v = append(v, verdict{"fleet of 3, hot key: upstream ≤ 1.05 × ⌈duration ÷ (ttl + latency)⌉ with `shared`",
			fmt.Sprintf("%s upstream requests for a minimum of %s: ratio %s%s",
				f0(shared.up), f0(shared.min), f2(shared.ratio), r.rounds("fleet-hot", fleetShared, ratioOf, f2)),
			pass(shared.ratio <= 1.05)})
	} else {
		v = append(v, verdict{"fleet of 3, hot key: upstream ≤ 1.05 × the minimum with `shared`", "–", pending})
	}
	if alone, ok := r.get("fleet-hot", fleetAlone); ok {
		v = append(v, verdict{"fleet of 3, hot key, for reference: without `shared` about 3 × the minimum (2.5–3.5 ×), one cycle per instance",
			fmt.Sprintf("%s upstream requests for a minimum of %s: ratio %s%s",
				f0(alone.up), f0(alone.min), f2(alone.ratio), r.rounds("fleet-hot", fleetAlone, ratioOf, f2)),
			pass(alone.ratio >= 2.5 && alone.ratio <= 3.5)})
	}
	hs, ok1 := r.get("fleet-hit", fleetShared)
	ha, ok2 := r.get("fleet-hit", fleetAlone)
	if ok1 && ok2 {
		x := hs.rps / ha.rps
		cs, ca := r.medianOf("fleet-hit", fleetShared, rpsPerCPU), r.medianOf("fleet-hit", fleetAlone, rpsPerCPU)
		v = append(v, verdict{"fleet of 3, local hits: req/s with `shared` ≥ 0.95 × without",
			fmt.Sprintf("%s vs %s req/s: %s ×%s (p99 %s vs %s ms). Per %% of the machine's CPU the benchmark got (req/s ÷ `bench_cpu_pct`, less sensitive to other work on the machine): %s vs %s, %s ×%s",
				f0(hs.rps), f0(ha.rps), f2(x), r.perRound("fleet-hit", fleetShared, fleetAlone, rpsOf), fms(hs.p99), fms(ha.p99),
				f0(cs), f0(ca), f2(cs/ca), r.perRound("fleet-hit", fleetShared, fleetAlone, rpsPerCPU)),
			pass(x >= 0.95)})
	} else {
		v = append(v, verdict{"fleet of 3, local hits: req/s with `shared` ≥ 0.95 × without", "–", pending})
	}
	hs, ok1 = r.get("fleet-herd", fleetShared)
	ha, ok2 = r.get("fleet-herd", fleetAlone)
	if ok1 {
		without := ""
		if ok2 {
			without = fmt.Sprintf("; without: %s; client p99 %s vs %s ms", f2(ha.ratio), fms(hs.p99), fms(ha.p99))
		}
		// calls per herd is a mean over the herds: 1.00 only when every
		// herd cost exactly one call
		v = append(v, verdict{"fleet of 3, cold herd spread over the instances: 1 upstream call per herd with `shared` (3 without)",
			fmt.Sprintf("%s calls per herd with `shared`%s%s", f2(hs.ratio), r.rounds("fleet-herd", fleetShared, ratioOf, f2), without),
			pass(hs.ratio <= 1.0+1e-9)})
	} else {
		v = append(v, verdict{"fleet of 3, cold herd: 1 upstream call per herd with `shared`", "–", pending})
	}
	return v
}

// fleetMarkdown writes the fleet's section, if it was measured.
func (r *report) fleetMarkdown(b *strings.Builder) {
	p := func(format string, a ...any) { fmt.Fprintf(b, format, a...) }
	src := -1
	for _, wl := range []string{"fleet-hot", "fleet-hit", "fleet-herd"} {
		for _, sys := range fleetSystems {
			if ms := r.byKey[[2]string{wl, sys}]; len(ms) > 0 {
				src = ms[0].src
			}
		}
	}
	if src < 0 {
		return
	}
	run := r.runs[src]
	meta := func(k string) string { return first(run.meta, k) }
	p("## (f) a fleet of three instances\n\n")
	if src != 0 && meta("date") != r.m("date") {
		r.runNote(b, src)
	}
	p("Three Caddy processes run the same Caddyfile (ports and admin address aside) in front of the same upstream, either each alone (each instance collapses and caches on its own) or with `shared redis://…` on all three and one `redis-server`, started for the measurement. "+
		"wrk sends a third of its %s connections to each instance (one wrk thread per instance, `bench/wrk/fleet.lua`), all with the same `Host`, as a load balancer would; the herd sends its client *i* to instance *i* mod 3. "+
		"The tier's columns are its counters (admin API `/coalesce/stats`) summed over the three instances, from their start to the end of the load; peak RSS sums the three Caddy processes and Redis.\n\n",
		meta("fleet_connections"))

	wrkHead := "| system | req/s (range) | p50 ms | p99 ms (range) | max ms | upstream requests | minimum | ratio | shared hits | leaderships won / lost | fleet waits (timed out) | Redis errors | peak RSS MB | errors / non-2xx | other CPU % |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
	wrkRows := func(wl string) {
		r.measuredRows(p, wl, fleetSystems, fleetSystemText, func(sys, name string, a agg) {
			p("| %s | %s%s | %s | %s%s | %s | %s | %s | %s | %s | %s | %s / %s | %s |\n", name,
				f0(a.rps), r.span(wl, sys, rpsOf, f0), fms(a.p50), fms(a.p99), r.span(wl, sys, p99Of, fms), fms(a.max),
				f0(a.up), f0(a.min), f2(a.ratio), r.sharedCells(wl, sys), f1(a.hwm), f0(a.errs), f0(a.non2xx), r.otherCell(wl, sys))
		})
		p("\n")
	}

	if r.measured("fleet-hot") {
		p("### hot key, `ttl %s`\n\n", ms(meta("ttl_ms")))
		p("All connections ask for one key for %s, with the settings of `caddy-coalesce` (`ttl %s`). Minimum = ⌈duration ÷ (ttl + upstream latency)⌉: one upstream request per TTL cycle for the whole fleet. Each instance alone needs that many for itself, about 3 × in all; with the tier the fleet needs them once. Here a request can wait for Redis: an instance whose copy expired asks the fleet before it goes upstream.\n\n",
			meta("duration"), ms(meta("ttl_ms")))
		p("%s", wrkHead)
		wrkRows("fleet-hot")
	}
	if r.measured("fleet-hit") {
		p("### local hits, `ttl %s` and `stale %s`\n\n", meta("fleet_hit_ttl"), meta("stale"))
		p("All connections ask for one key for %s; its copy stays fresh for %s and is then served stale for as long while one refresh runs in the background. So every request after an instance's first is a local hit, which never touches Redis: the difference between the two rows is the tier's price on the hit path (its refreshes, once a second, run beside the requests).\n\n",
			meta("duration"), meta("fleet_hit_ttl"))
		p("%s", wrkHead)
		wrkRows("fleet-hit")
	}
	if r.measured("fleet-herd") {
		p("### cold herd spread over the instances\n\n")
		p("Each herd: %s clients on open keep-alive connections, a third on each instance, send `GET` for one brand-new key at the same instant, %s times (`bench/herd -url <instance 1>,<instance 2>,<instance 3>`). Ideal: 1 upstream call per herd with the tier, 3 without (one per instance). *Upstream alone* is the same herd sent straight to the upstream.\n\n",
			meta("herd_n"), meta("herd_rounds"))
		p("| system | client p50 ms | client p99 ms (range) | client max ms | upstream alone p50 / p99 ms | calls/herd | distinct bodies/herd | shared hits | leaderships won / lost | fleet waits (timed out) | Redis errors | errors | peak RSS MB | other CPU %% |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		r.measuredRows(p, "fleet-herd", fleetSystems, fleetSystemText, func(sys, name string, a agg) {
			p("| %s | %s | %s%s | %s | %s / %s | %s | %s | %s | %s | %s | %s |\n", name, fms(a.p50), fms(a.p99),
				r.span("fleet-herd", sys, p99Of, fms), fms(a.max), fms(a.dirP50), fms(a.dirP99), f2(a.ratio), f1(a.distinct),
				r.sharedCells("fleet-herd", sys), f0(a.errs+a.non2xx), f1(a.hwm), r.otherCell("fleet-herd", sys))
		})
		p("\n")
	}
	// Hand-written notes about a run measured apart go with its section.
	if src != 0 {
		r.appendNotes(b, run.dir, "")
		p("\n")
	}
}

func (r *report) measured(wl string) bool {
	for _, sys := range fleetSystems {
		if _, ok := r.aggs[[2]string{wl, sys}]; ok {
			return true
		}
	}
	return false
}

// ms turns "50" (a meta.env figure in ms) into "50ms".
func ms(v string) string {
	if v == "" {
		return "?"
	}
	return v + "ms"
}

// runNote describes the run of the -dir of index src, when a section was
// measured apart from the rest of the report.
func (r *report) runNote(b *strings.Builder, src int) {
	run := r.runs[src]
	meta := func(k string) string { return first(run.meta, k) }
	fmt.Fprintf(b, "Measured apart from the sections above, by `%s` on %s (rounds: %s, every figure the median over them; %s per wrk run).",
		meta("command"), meta("date"), meta("rounds"), meta("duration"))
	fmt.Fprintf(b, " Machine: %s; %s. Load average at the start %s, at the end %s.", meta("cpu"), meta("host"), meta("loadavg_start"), meta("loadavg_end"))
	if med, max, n, over := r.interference(src); n > 0 {
		fmt.Fprintf(b, " During the loads, processes outside the benchmark took a median %s %% of the machine's CPU time (at most %s %%); %d of %d measurements had more than %.0f %%.",
			f0(med), f0(max), over, n, disturbed)
	}
	if v := meta("redis"); v != "" {
		fmt.Fprintf(b, " Software: %s; %s; %s.", meta("caddy"), v, meta("wrk"))
	}
	rel, err := filepath.Rel(filepath.Dir(r.out), run.dir)
	if err != nil {
		rel = run.dir
	}
	fmt.Fprintf(b, " Raw output: [`%s/`](%s/).\n\n", rel, rel)
}
