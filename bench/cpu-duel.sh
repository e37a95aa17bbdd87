#!/usr/bin/env bash
# bench/cpu-duel.sh — what a request costs Caddy's CPU with one handler setup
# against another, measured so that the machine's drift cancels out.
#
#   bench/cpu-duel.sh caddy-proxy caddy-coalesce        # the module's price on a miss
#   CADDY_BIN_B=/tmp/caddy-new bench/cpu-duel.sh caddy-coalesce caddy-coalesce   # two builds
#
# Both Caddys run at once, pinned to the same CPU, each loaded by a wrk of
# its own (pinned, with the upstream, to another CPU) with the all-miss
# load of bench/run.sh (workload miss0: every request a new key, an upstream
# that answers at once). Both saturate their CPU together, so a slower
# minute slows both alike; what each one spent per request (from
# /proc/PID/stat) is compared. The setups swap sides from one duel to the
# next, and the figure is the median of the per-duel ratios B/A.
#
# On a shared 2-CPU machine where req/s of one Caddy drifts by a third
# within minutes, two identical setups give ratios within about ±2 % of 1.
#
# Setups: caddy-proxy (reverse_proxy alone), caddy-coalesce (coalesce
# { ttl 50ms } before it), caddy-coalesce-stale (with stale 1s),
# caddy-coalesce-nobreaker (with breaker off), caddy-coalesce-bypass
# (caddy-coalesce with the kill switch on).
#
# Environment (defaults in brackets):
#   CADDY_BIN       Caddy with the module [built with ./xcaddy.sh into bench/out/duel/]
#   CADDY_BIN_B     the Caddy of setup B [CADDY_BIN]
#   DUEL_ROUNDS     duels [8]
#   DUEL_DURATION   seconds of load per duel [5]
#   DUEL_CONNECTIONS  wrk connections per Caddy [32]
#   BENCH_PORT_BASE first port of the block run.sh uses; the duel takes +190…+199 [19000]
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
ROUNDS=${DUEL_ROUNDS:-8}
SECS=${DUEL_DURATION:-5}
CONNS=${DUEL_CONNECTIONS:-32}
BASE=${BENCH_PORT_BASE:-19000}
UP_PORT=$((BASE + 192))
OUT=$ROOT/bench/out/duel

die() {
	echo "cpu-duel: $*" >&2
	exit 1
}

[[ $# == 2 ]] || die "usage: bench/cpu-duel.sh SETUP_A SETUP_B (see the head of this file)"
SETUP_A=$1 SETUP_B=$2
(($(nproc) >= 2)) || die "needs two CPUs: one for both Caddys, one for the load and the upstream"
command -v wrk >/dev/null || die "wrk is not installed (apt-get install wrk)"

mkdir -p "$OUT"
(cd "$ROOT" && go build -o "$OUT/upstream" ./bench/upstream) || die "building bench/upstream failed"
if [[ -z ${CADDY_BIN:-} ]]; then
	echo "building Caddy with the module: ./xcaddy.sh (first build: a few minutes)" >&2
	"$ROOT/xcaddy.sh" "$OUT/caddy" >"$OUT/xcaddy.log" 2>&1 || die "./xcaddy.sh failed, see $OUT/xcaddy.log"
	CADDY_BIN=$OUT/caddy
fi
BIN_A=$CADDY_BIN
BIN_B=${CADDY_BIN_B:-$CADDY_BIN}

PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap cleanup EXIT

# handler SETUP: the site's handlers for SETUP.
handler() {
	local proxy="reverse_proxy 127.0.0.1:$UP_PORT {
		transport http {
			keepalive_idle_conns_per_host 64
		}
	}"
	case $1 in
	caddy-proxy) echo "$proxy" ;;
	caddy-coalesce | caddy-coalesce-bypass) printf 'coalesce {\n\t\tttl 50ms\n\t}\n\t%s' "$proxy" ;;
	caddy-coalesce-stale) printf 'coalesce {\n\t\tttl 50ms\n\t\tstale 1s\n\t}\n\t%s' "$proxy" ;;
	caddy-coalesce-nobreaker) printf 'coalesce {\n\t\tttl 50ms\n\t\tbreaker off\n\t}\n\t%s' "$proxy" ;;
	*) die "unknown setup $1" ;;
	esac
}
handler "$SETUP_A" >/dev/null && handler "$SETUP_B" >/dev/null

taskset -c 0 "$OUT/upstream" -listen "127.0.0.1:$UP_PORT" -latency 0s >"$OUT/upstream.log" 2>&1 &
PIDS+=($!)

# start BIN SETUP PORT: a Caddy on CPU 1; its pid in STARTED.
start() {
	local bin=$1 setup=$2 port=$3 dir
	dir=$OUT/$port
	mkdir -p "$dir"
	cat >"$dir/Caddyfile" <<EOF
{
	admin localhost:$((port + 5))
	auto_https off
	persist_config off
	log {
		level ERROR
	}
}

http://:$port {
	bind 127.0.0.1
	$(handler "$setup")
}
EOF
	taskset -c 1 "$bin" run --config "$dir/Caddyfile" --adapter caddyfile >"$dir/log" 2>&1 &
	STARTED=$!
	PIDS+=("$STARTED")
}

ready() { # PORT
	local i
	for i in $(seq 100); do
		curl -fs -o /dev/null "http://127.0.0.1:$1/ready?delay=0s" && return 0
		sleep 0.1
	done
	die "Caddy on port $1 did not answer (see $OUT/$1/log)"
}

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

load() { # PORT SECONDS PREFIX -> wrk's output
	BENCH_PREFIX=$3 BENCH_QUERY="?delay=0s" taskset -c 0 \
		wrk -t1 -c"$CONNS" -d"$2s" --timeout 5s -s "$BENCH_DIR/wrk/unique.lua" "http://127.0.0.1:$1"
}

# duel LEFT_BIN LEFT_SETUP RIGHT_BIN RIGHT_SETUP ROUND: sets RESULT to the
# CPU µs per request of the left and the right one, and right over left.
duel() {
	local pl pr nl nr tl0 tr0 tl1 tr1 ol or
	start "$1" "$2" $((BASE + 190))
	pl=$STARTED
	start "$3" "$4" $((BASE + 191))
	pr=$STARTED
	ready $((BASE + 190))
	ready $((BASE + 191))
	[[ $2 == caddy-coalesce-bypass ]] && bypass $((BASE + 195))
	[[ $4 == caddy-coalesce-bypass ]] && bypass $((BASE + 196))
	load $((BASE + 190)) 1 /warm >/dev/null &
	load $((BASE + 191)) 1 /warm >/dev/null
	wait $!
	tl0=$(ticks "$pl") tr0=$(ticks "$pr")
	ol=$OUT/left.txt or=$OUT/right.txt
	load $((BASE + 190)) "$SECS" "/d$5l" >"$ol" 2>&1 &
	local w=$!
	load $((BASE + 191)) "$SECS" "/d$5r" >"$or" 2>&1
	wait $w
	tl1=$(ticks "$pl") tr1=$(ticks "$pr")
	nl=$(awk '/requests in/ {print $1}' "$ol")
	nr=$(awk '/requests in/ {print $1}' "$or")
	kill "$pl" "$pr"
	wait "$pl" "$pr" 2>/dev/null || true
	[[ -n $nl && -n $nr && $nl -gt 0 && $nr -gt 0 ]] || die "a load failed: see $ol and $or"
	RESULT=$(awk -v nl="$nl" -v nr="$nr" -v cl=$((tl1 - tl0)) -v cr=$((tr1 - tr0)) -v hz="$(getconf CLK_TCK)" 'BEGIN {
		ul = cl * 1e6 / hz / nl; ur = cr * 1e6 / hz / nr
		printf "%.1f %.1f %.4f\n", ul, ur, ur / ul }')
}

bypass() { # ADMIN_PORT
	curl -fs -X POST -H "Content-Type: application/json" -d '{"enabled": true}' \
		"http://localhost:$1/coalesce/bypass" >/dev/null || die "could not turn the kill switch on"
}

echo "A: $SETUP_A ($BIN_A)"
echo "B: $SETUP_B ($BIN_B)"
echo "each duel: $SECS s, $CONNS connections per Caddy; CPU µs per request of A and B, and B/A"
ratios=()
for ((i = 1; i <= ROUNDS; i++)); do
	if ((i % 2)); then
		duel "$BIN_A" "$SETUP_A" "$BIN_B" "$SETUP_B" "$i"
		read -r ua ub r <<<"$RESULT"
	else
		duel "$BIN_B" "$SETUP_B" "$BIN_A" "$SETUP_A" "$i"
		read -r ub ua r <<<"$RESULT"
		r=$(awk -v r="$r" 'BEGIN { printf "%.4f", 1 / r }')
	fi
	printf 'duel %d: A %s µs, B %s µs, B/A %s\n' "$i" "$ua" "$ub" "$r"
	ratios+=("$r")
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ a[NR] = $1 } END {
	m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
	printf "B/A CPU per request: median %.3f (duels %.3f to %.3f)\n", m, a[1], a[NR] }'
