#!/usr/bin/env bash
# bench/sse-mem.sh — what one event-stream subscriber holds in memory: N
# subscribers on one stream at 50 events/s, then the proxy's resident memory,
# Go heap and goroutine stacks per subscriber, and its heap profile.
#
#   bench/sse-mem.sh                         # coalesce proxy floor, 1000 subscribers
#   bench/sse-mem.sh coalesce coalesce-gzip  # these modes only
#
# Modes:
#   coalesce       Caddy, `coalesce { sse }` in front of reverse_proxy
#   coalesce-gzip  the same behind `encode gzip`, subscribers asking for gzip
#   proxy          Caddy, reverse_proxy alone
#   floor          no Caddy: `sse floor`, a bare net/http handler per
#                  subscriber waiting on a broadcast (Go's own per-request cost)
#
# Environment (defaults in brackets):
#   BENCH_SSE_MEM_SUBSCRIBERS  [1000]
#   BENCH_PORT_BASE            [19000]; this script uses +185 to +188
#   BENCH_OUT                  [bench/out/sse-mem-<UTC timestamp>]
#   CADDY_BIN                  a Caddy with this module (default: built by ./xcaddy.sh)
#
# Per subscriber = (loaded − idle) ÷ subscribers, idle being before the first
# one. Caddy's figures are its admin API's (go_memstats_*, after the forced
# collection of /debug/pprof/heap?gc=1, whose profile is kept as
# <mode>-heap.pb.gz: `go tool pprof -top <caddy> <file>`); the floor's, its
# /__mem after a collection. Everything listens on 127.0.0.1.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
N=${BENCH_SSE_MEM_SUBSCRIBERS:-1000}
PORT_BASE=${BENCH_PORT_BASE:-19000}
OUT=${BENCH_OUT:-$BENCH_DIR/out/sse-mem-$(date -u +%Y%m%dT%H%M%SZ)}
ORIGIN_PORT=$((PORT_BASE + 185))
PROXY_PORT=$((PORT_BASE + 186))
ADMIN_PORT=$((PORT_BASE + 187))
FLOOR_PORT=$((PORT_BASE + 188))
MODES=("$@")
((${#MODES[@]})) || MODES=(coalesce proxy floor)

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

PIDS=()
cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	PIDS=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in $ORIGIN_PORT $PROXY_PORT $ADMIN_PORT $FLOOR_PORT; do
	port_free "$p" || die "port $p is in use (set BENCH_PORT_BASE)"
done
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

mkdir -p "$OUT"
(cd "$ROOT" && go build -o "$OUT/sse" ./bench/sse)
CADDY=${CADDY_BIN:-}
if [[ -z $CADDY && " ${MODES[*]} " != " floor " ]]; then
	"$ROOT/xcaddy.sh" "$OUT/caddy" >"$OUT/build.log" 2>&1 || die "build failed: $OUT/build.log"
	CADDY=$OUT/caddy
fi

# mem URL: heap_inuse stack_inuse goroutines (bytes, bytes, count)
mem() {
	if [[ $1 == floor ]]; then
		curl -s --max-time 10 "http://127.0.0.1:$FLOOR_PORT/__mem" |
			sed -n 's/.*"goroutines":\([0-9]*\).*"heap_inuse":\([0-9]*\).*"stack_inuse":\([0-9]*\).*/\2 \3 \1/p'
	else
		curl -s --max-time 10 "http://127.0.0.1:$ADMIN_PORT/metrics" | awk '
			/^go_memstats_heap_inuse_bytes / { h = $2 }
			/^go_memstats_stack_inuse_bytes / { s = $2 }
			/^go_goroutines / { g = $2 }
			END { printf "%.0f %.0f %.0f\n", h, s, g }'
	fi
}
rss() { sed -n 's/^VmRSS:[[:space:]]*\([0-9]*\) kB/\1/p' "/proc/$1/status"; }

printf '| mode | subscribers | goroutines per subscriber | RSS per subscriber | heap per subscriber | stacks per subscriber |\n|---|---:|---:|---:|---:|---:|\n' >"$OUT/RESULTS.md"
for mode in "${MODES[@]}"; do
	log "$mode: $N subscribers"
	url=http://127.0.0.1:$PROXY_PORT/events
	subflags=()
	if [[ $mode == floor ]]; then
		"$OUT/sse" floor -listen "127.0.0.1:$FLOOR_PORT" >"$OUT/$mode.log" 2>&1 &
		pid=$!
		PIDS+=("$pid")
		url=http://127.0.0.1:$FLOOR_PORT/events
	else
		"$OUT/sse" origin -listen "127.0.0.1:$ORIGIN_PORT" >"$OUT/origin-$mode.log" 2>&1 &
		PIDS+=("$!")
		inner="reverse_proxy 127.0.0.1:$ORIGIN_PORT"
		case $mode in
		coalesce | coalesce-gzip) inner=$'coalesce {\n\t\tsse\n\t}\n\t'"$inner" ;;
		proxy) ;;
		*) die "unknown mode $mode" ;;
		esac
		if [[ $mode == coalesce-gzip ]]; then
			inner=$'encode gzip\n\t'"$inner"
			subflags=(-gzip)
		fi
		cat >"$OUT/$mode.Caddyfile" <<EOF
{
	admin 127.0.0.1:$ADMIN_PORT
	auto_https off
	persist_config off
	grace_period 1s
	log {
		level ERROR
	}
}
http://127.0.0.1:$PROXY_PORT {
	$inner
}
EOF
		"$CADDY" run --config "$OUT/$mode.Caddyfile" --adapter caddyfile >"$OUT/$mode.log" 2>&1 &
		pid=$!
		PIDS+=("$pid")
	fi
	for ((i = 0; i < 100; i++)); do
		[[ -n $(mem "$mode") ]] && break
		sleep 0.1
	done
	sleep 1
	if [[ $mode != floor ]]; then
		curl -s --max-time 30 -o /dev/null "http://127.0.0.1:$ADMIN_PORT/debug/pprof/heap?gc=1"
	fi
	read -r h0 s0 g0 < <(mem "$mode")
	r0=$(rss "$pid")
	"$OUT/sse" subscribe -url "$url" -n "$N" -duration 30s "${subflags[@]}" >"$OUT/$mode-subscribe.txt" 2>&1 &
	spid=$!
	PIDS+=("$spid")
	for ((i = 0; i < 1200; i++)); do
		read -r _ _ g < <(mem "$mode")
		((g >= g0 + N)) && break
		sleep 0.1
	done
	sleep 6 # a few collections shrink the stacks that grew while the subscribers came
	if [[ $mode != floor ]]; then
		curl -s --max-time 30 "http://127.0.0.1:$ADMIN_PORT/debug/pprof/heap?gc=1" >"$OUT/$mode-heap.pb.gz"
	fi
	read -r h1 s1 g1 < <(mem "$mode")
	r1=$(rss "$pid")
	wait "$spid" || true
	awk -v m="$mode" -v n="$N" -v h0="$h0" -v h1="$h1" -v s0="$s0" -v s1="$s1" -v g0="$g0" -v g1="$g1" -v r0="$r0" -v r1="$r1" 'BEGIN {
		printf "| %s | %d | %.2f | %.1f KiB | %.1f KiB | %.1f KiB |\n", m, n, (g1 - g0) / n, (r1 - r0) / n, (h1 - h0) / 1024 / n, (s1 - s0) / 1024 / n
	}' | tee -a "$OUT/RESULTS.md"
	cleanup
done
log "done: $OUT/RESULTS.md"
