package main

import (
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
)

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
