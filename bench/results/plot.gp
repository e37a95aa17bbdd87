set terminal pngcairo size 1400,1040 font 'sans,11' noenhanced
set output "plot.png"
set multiplot layout 2,1 title "caddy-coalesce benchmark, median of 3 rounds, upstream latency 20 ms (2026-11-27T12:06:03Z)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set grid ytics
set key outside right top vertical
set datafile missing "?"
set yrange [0:*]
set format y "%.0f"
set title 'Throughput, req/s (higher is better)'
set ylabel 'req/s'
plot "plot-rps.dat" using 2:xtic(1) title "caddy-respond" lc rgb "#8c8c8c", \
     '' using 3 title "caddy-proxy" lc rgb "#1f77b4", \
     '' using 4 title "caddy-coalesce" lc rgb "#2ca02c", \
     '' using 5 title "caddy-coalesce-stale" lc rgb "#98df8a", \
     '' using 6 title "nginx" lc rgb "#ff7f0e", \
     '' using 7 title "varnish" lc rgb "#9467bd", \
     '' using 8 title "varnish-grace" lc rgb "#c5b0d5"
set title 'p99 latency, ms, log scale (lower is better)'
set ylabel 'p99 ms'
set logscale y
set yrange [*:*]
set format y '%g'
plot "plot-p99.dat" using 2:xtic(1) title "caddy-respond" lc rgb "#8c8c8c", \
     '' using 3 title "caddy-proxy" lc rgb "#1f77b4", \
     '' using 4 title "caddy-coalesce" lc rgb "#2ca02c", \
     '' using 5 title "caddy-coalesce-stale" lc rgb "#98df8a", \
     '' using 6 title "nginx" lc rgb "#ff7f0e", \
     '' using 7 title "varnish" lc rgb "#9467bd", \
     '' using 8 title "varnish-grace" lc rgb "#c5b0d5"
unset multiplot
