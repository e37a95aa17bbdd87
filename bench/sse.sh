#!/usr/bin/env bash
# bench/sse.sh — event-stream fan-out side by side: one upstream stream at
# BENCH_SSE_RATE events a second, 1000 and 5000 subscribers, through Caddy's
# reverse_proxy, NGINX (proxy_buffering off), caddy-coalesce (sse) and nchan
# (the pub/sub anchor: the origin publishes into it). See bench/README.md,
# "Event streams".
#
#   bench/sse.sh                                   # every system, 1000 and 5000 subscribers
#   BENCH_SSE_SUBSCRIBERS=1000 BENCH_SSE_DURATION=5s bench/sse.sh   # smaller run
#
# Environment (defaults in brackets):
#   BENCH_SSE_SUBSCRIBERS  subscriber counts [1000 5000]
#   BENCH_SSE_RATE         events a second [50]
#   BENCH_SSE_SIZE         padding bytes per event [64]
#   BENCH_SSE_DURATION     measurement window of each run [10s]
#   BENCH_SSE_SYSTEMS      [caddy-proxy nginx caddy-coalesce nchan]
#   BENCH_SSE_STALL_PAIRS  one more run of caddy-coalesce at the first count:
#                          this many pairs of windows with and without a
#                          subscriber that never reads; 0: none [6]
#   BENCH_SSE_STALL_WINDOW each of those windows [10s]: long enough for the
#                          stalled one's socket buffers and queue to fill
#                          and for it to be dropped inside its window
#   BENCH_PORT_BASE        first port of the block bench/ uses [19000]; this
#                          script uses +181 to +183
#   BENCH_OUT              output directory [bench/out/sse-<UTC timestamp>]
#   CADDY_BIN              a Caddy with this module (default: built by ./xcaddy.sh)
#
# Needs nginx with libnginx-mod-nchan (Debian: apt-get install nginx-light
# libnginx-mod-nchan) and Go. Everything listens on 127.0.0.1; every process
# started here is stopped when the script exits.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

SUBSCRIBERS=${BENCH_SSE_SUBSCRIBERS:-1000 5000}
RATE=${BENCH_SSE_RATE:-50}
SIZE=${BENCH_SSE_SIZE:-64}
DURATION=${BENCH_SSE_DURATION:-10s}
SYSTEMS=${BENCH_SSE_SYSTEMS:-caddy-proxy nginx caddy-coalesce nchan}
STALL_PAIRS=${BENCH_SSE_STALL_PAIRS:-6}
STALL_WINDOW=${BENCH_SSE_STALL_WINDOW:-10s}
PORT_BASE=${BENCH_PORT_BASE:-19000}
OUT=${BENCH_OUT:-$BENCH_DIR/out/sse-$(date -u +%Y%m%dT%H%M%SZ)}
NCHAN_MODULE=${NCHAN_MODULE:-/usr/lib/nginx/modules/ngx_nchan_module.so}

ORIGIN_PORT=$((PORT_BASE + 181))
PROXY_PORT=$((PORT_BASE + 182))
ADMIN_PORT=$((PORT_BASE + 183))

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

PIDS=()
stop_pid() {
	local pid=$1 i
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	kill -KILL "$pid" 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}
cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		stop_pid "$p"
	done
	PIDS=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

wait_http() {
	local url=$1 i
	for ((i = 0; i < 100; i++)); do
		[[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]] && return 0
		sleep 0.1
	done
	return 1
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# ---------------------------------------------------------------- setup
command -v go >/dev/null || die "go is needed"
command -v curl >/dev/null || die "curl is needed"
command -v nginx >/dev/null || die "nginx is needed (apt-get install nginx-light libnginx-mod-nchan)"
[[ -f $NCHAN_MODULE ]] || die "no nchan module at $NCHAN_MODULE (apt-get install libnginx-mod-nchan, or set NCHAN_MODULE)"
for p in $ORIGIN_PORT $PROXY_PORT $ADMIN_PORT; do
	port_free "$p" || die "port $p is in use (set BENCH_PORT_BASE)"
done
# 5000 subscribers are 5000 connections for the client, up to 10000 for a proxy.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 12000)) || log "warning: ulimit -n is $(ulimit -n); 5000 subscribers need about 12000"

mkdir -p "$OUT/conf" "$OUT/raw"
log "output: $OUT"
(cd "$ROOT" && go build -o "$OUT/sse" ./bench/sse)
CADDY=${CADDY_BIN:-}
if [[ -z $CADDY ]]; then
	log "building Caddy with the module (./xcaddy.sh)"
	"$ROOT/xcaddy.sh" "$OUT/caddy" >"$OUT/build.log" 2>&1 || die "build failed: $OUT/build.log"
	CADDY=$OUT/caddy
fi
{
	echo "date=$(date -u +%FT%TZ)"
	echo "host=$(uname -srm)"
	echo "cpus=$(nproc)"
	echo "load=$(cut -d' ' -f1-3 /proc/loadavg)"
	echo "caddy=$("$CADDY" version | head -1)"
	echo "nginx=$(nginx -v 2>&1)"
	echo "rate=$RATE size=$SIZE duration=$DURATION subscribers=$SUBSCRIBERS"
	echo "command=BENCH_SSE_SUBSCRIBERS='$SUBSCRIBERS' BENCH_SSE_RATE=$RATE BENCH_SSE_DURATION=$DURATION BENCH_SSE_SYSTEMS='$SYSTEMS' BENCH_SSE_STALL_PAIRS=$STALL_PAIRS BENCH_SSE_STALL_WINDOW=$STALL_WINDOW bench/sse.sh"
} >"$OUT/meta.env"

# ---------------------------------------------------------------- configs
caddy_conf() { # system
	local dir=$OUT/conf/$1 inner="reverse_proxy 127.0.0.1:$ORIGIN_PORT"
	[[ $1 == caddy-coalesce ]] && inner=$'coalesce {\n\t\tsse\n\t}\n\t'"$inner"
	mkdir -p "$dir"
	cat >"$dir/Caddyfile" <<EOF
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
}

nginx_conf() { # system
	local dir=$OUT/conf/$1 load="" server
	mkdir -p "$dir/tmp"
	chmod 777 "$dir/tmp"
	if [[ $1 == nchan ]]; then
		load="load_module $NCHAN_MODULE;"
		server="
		location = /events {
			nchan_subscriber eventsource;
			nchan_channel_id bench;
			nchan_subscriber_first_message newest;
		}
		location = /pub {
			# The origin pipelines its POSTs on one connection.
			keepalive_requests 1000000;
			nchan_publisher;
			nchan_channel_id bench;
			nchan_message_buffer_length 256;
			nchan_message_timeout 1m;
		}"
	else
		server="
		location /events {
			proxy_pass http://origin;
			proxy_http_version 1.1;
			proxy_set_header Connection \"\";
			proxy_buffering off;
			proxy_cache off;
			proxy_read_timeout 1h;
		}"
	fi
	cat >"$dir/nginx.conf" <<EOF
$load
worker_processes 2;
worker_rlimit_nofile 65536;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events {
	worker_connections 20000;
}
http {
	access_log off;
	client_body_temp_path $dir/tmp/body;
	proxy_temp_path $dir/tmp/proxy;
	fastcgi_temp_path $dir/tmp/fastcgi;
	uwsgi_temp_path $dir/tmp/uwsgi;
	scgi_temp_path $dir/tmp/scgi;
	upstream origin {
		server 127.0.0.1:$ORIGIN_PORT;
		keepalive 64;
	}
	server {
		listen 127.0.0.1:$PROXY_PORT;
		$server
	}
}
EOF
}

# ---------------------------------------------------------------- one run
# run SYSTEM N PAIRS: origin, proxy, subscribers; one line in results.jsonl.
# PAIRS > 0: pairs of windows with and without a stalled subscriber instead
# of one window.
run() {
	local sys=$1 n=$2 pairs=$3 raw proxy_pid origin_pid pids publish=() stats line mode=()
	raw=$OUT/raw/$sys-$n.txt
	if ((pairs > 0)); then
		raw=$OUT/raw/$sys-$n-stall.txt
		mode=(-stall-pairs "$pairs" -stall-window "$STALL_WINDOW")
		[[ $sys == caddy-coalesce ]] && mode+=(-metrics "http://127.0.0.1:$ADMIN_PORT/metrics")
		log "$sys: $n subscribers, $pairs pairs of $STALL_WINDOW windows with and without a stalled subscriber"
	else
		log "$sys: $n subscribers"
	fi
	case $sys in
	caddy-*)
		caddy_conf "$sys"
		"$CADDY" run --config "$OUT/conf/$sys/Caddyfile" --adapter caddyfile >"$OUT/raw/$sys.log" 2>&1 &
		proxy_pid=$!
		;;
	nginx | nchan)
		nginx_conf "$sys"
		nginx -p "$OUT/conf/$sys" -c "$OUT/conf/$sys/nginx.conf" -g 'daemon off;' >"$OUT/raw/$sys.log" 2>&1 &
		proxy_pid=$!
		[[ $sys == nchan ]] && publish=(-publish "http://127.0.0.1:$PROXY_PORT/pub")
		;;
	*) die "unknown system $sys" ;;
	esac
	PIDS+=("$proxy_pid")
	"$OUT/sse" origin -listen "127.0.0.1:$ORIGIN_PORT" -rate "$RATE" -size "$SIZE" "${publish[@]}" >"$OUT/raw/origin.log" 2>&1 &
	origin_pid=$!
	PIDS+=("$origin_pid")
	wait_http "http://127.0.0.1:$ORIGIN_PORT/__stats" || die "origin did not start"
	for ((i = 0; i < 100; i++)); do
		port_free "$PROXY_PORT" || break
		sleep 0.1
	done
	if [[ $sys == nginx || $sys == nchan ]]; then
		# Its workers (2) are forked after the listener opens.
		for ((i = 0; i < 100; i++)); do
			(($(pgrep -c -P "$proxy_pid" 2>/dev/null || echo 0) >= 2)) && break
			sleep 0.1
		done
	fi
	pids=$proxy_pid
	for c in $(pgrep -P "$proxy_pid" 2>/dev/null || true); do
		pids+=",$c"
	done
	{
		echo "system=$sys subscribers=$n stall_pairs=$pairs rate=$RATE duration=$DURATION"
		echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
	} >"$raw"
	"$OUT/sse" subscribe -url "http://127.0.0.1:$PROXY_PORT/events" -n "$n" "${mode[@]}" \
		-duration "$DURATION" -pids "$pids" >>"$raw" 2>&1 || log "$sys: subscribe failed (see $raw)"
	stats=$(curl -s --max-time 5 "http://127.0.0.1:$ORIGIN_PORT/__stats" || echo '{}')
	echo "ORIGINJSON $stats" >>"$raw"
	local drops=-1
	if [[ $sys == caddy-coalesce ]]; then
		echo "COALESCESTREAMS $(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/coalesce/streams" | tr -d '\n')" >>"$raw"
		drops=$(curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" | sed -n 's/^caddy_coalesce_sse_drops_total{.*reason="slow".*} \([0-9.e+]*\)$/\1/p' | head -1)
		drops=$(printf '%.0f' "${drops:-0}")
		echo "slow_drops=$drops" >>"$raw"
	fi
	echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$raw"
	line=$(grep '^SUBJSON ' "$raw" | head -1 | cut -d' ' -f2-)
	if [[ -n $line ]]; then
		local peak total
		peak=$(sed -n 's/.*"peak":\([0-9]*\).*/\1/p' <<<"$stats")
		total=$(sed -n 's/.*"total":\([0-9]*\).*/\1/p' <<<"$stats")
		if [[ $sys == nchan ]]; then
			peak=1 # the origin's one publishing connection; it serves no stream
			total=1
		fi
		printf '{"system":"%s","subscribers":%d,"upstream_peak":%d,"upstream_total":%d,"slow_drops":%d,"sub":%s}\n' \
			"$sys" "$n" "${peak:-0}" "${total:-0}" "$drops" "$line" >>"$OUT/results.jsonl"
	fi
	stop_pid "$origin_pid"
	stop_pid "$proxy_pid"
	PIDS=()
}

first=${SUBSCRIBERS%% *}
for n in $SUBSCRIBERS; do
	for sys in $SYSTEMS; do
		run "$sys" "$n" 0
	done
done
if ((STALL_PAIRS > 0)) && [[ " $SYSTEMS " == *" caddy-coalesce "* ]]; then
	run caddy-coalesce "$first" "$STALL_PAIRS"
fi

echo "load_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.env"
{
	echo "# Event-stream fan-out: $RATE events/s, one stream"
	echo
	echo "Machine: $(uname -srm), $(nproc) CPUs, load average (1, 5, 15 min) at the start: $(grep '^load=' "$OUT/meta.env" | cut -d= -f2), at the end: $(grep '^load_end=' "$OUT/meta.env" | cut -d= -f2)."
	echo "Command: \`$(grep '^command=' "$OUT/meta.env" | cut -d= -f2-)\`."
	echo
	echo "Latency: from the origin's stamp when it makes an event to a subscriber reading it (one clock);"
	echo "for nchan the stamp is taken before the origin POSTs the event (pipelined on one connection, so nchan's answers never slow the events down). CPU: the proxy's processes,"
	echo "% of one core over the window. RSS per subscriber: (loaded − idle) ÷ subscribers."
	echo
	"$OUT/sse" report "$OUT/results.jsonl"
} >"$OUT/RESULTS.md"
log "done: $OUT/RESULTS.md"
cat "$OUT/RESULTS.md"
