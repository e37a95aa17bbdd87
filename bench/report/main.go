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
	"flag"
	"fmt"
	"log"
	"os"
	"path/filepath"
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

func (r *report) m(k string) string { return first(r.meta, k) }
