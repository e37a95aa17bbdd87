#!/usr/bin/env bash
# bench/run.sh — side-by-side benchmark of caddy-coalesce against Caddy's own
# respond and reverse_proxy, an NGINX micro-cache and Varnish, on this machine,
# in one run, alternating the systems and repeating every measurement; and a
# fleet of three instances with and without the shared tier (workload fleet).
#
#   sudo bench/run.sh                      # full run (about 30 minutes)
#   BENCH_DURATION=3s BENCH_ROUNDS=1 BENCH_HERD_ROUNDS=10 bench/run.sh   # smoke run
#   BENCH_PUBLISH=1 sudo -E bench/run.sh   # also write bench/RESULTS.md and bench/results/
#   BENCH_WORKLOADS=fleet BENCH_PUBLISH=1 bench/run.sh   # the fleet alone, into bench/results-fleet/
#   BENCH_WORKLOADS="miss miss0" BENCH_PUBLISH=1 bench/run.sh   # all-miss alone, into bench/results-miss/
#
# Root is only needed to apt-get install what is missing (nginx-light, varnish,
# wrk, gnuplot-nox, curl, procps; redis-server for the fleet workload). Everything listens on 127.0.0.1; every process
# this script starts is stopped when it exits. See bench/README.md.
#
# Environment (defaults in brackets):
#   BENCH_DURATION      length of each wrk run [10s]
#   BENCH_ROUNDS        rounds; each round measures every system once [3]
#   BENCH_THREADS       wrk threads [2]
#   BENCH_CONNECTIONS   wrk connections [64]
#   BENCH_LATENCY       upstream latency [20ms]
#   BENCH_HERD_N        clients per cold herd [100]
#   BENCH_HERD_ROUNDS   herds per measurement [50]
#   BENCH_KEYS          keys of the Zipf workload [10000]
#   BENCH_ZIPF_S        Zipf exponent [1.1]
#   BENCH_MEM_KEYS      live keys of the memory test [10000]
#   BENCH_MEM_DURATION  length of the memory test's load [10s]
#   BENCH_MEM_CONNECTIONS  wrk connections of the memory test [256]
#   BENCH_MEM_EXTRA     extra lines for the memory test's coalesce block, e.g. "max_memory 64MiB" []
#   BENCH_SYSTEMS       systems to measure [caddy-respond caddy-proxy caddy-coalesce
#                       caddy-coalesce-stale nginx varnish varnish-grace]
#   BENCH_WORKLOADS     workloads [hot herd zipf miss miss0 mem fleet]
#   BENCH_PORT_BASE     first port of the block of ports used [19000]
#   BENCH_OUT           output directory [bench/out/<UTC timestamp>]
#   BENCH_PUBLISH       1: copy the raw output to bench/results/ (the all-miss
#                       workloads' to bench/results-miss/, the fleet's to
#                       bench/results-fleet/) and write bench/RESULTS.md from them [0]
#   BENCH_INSTALL       0: never apt-get install [1]
#   BENCH_QUIET         before each measurement, wait until other processes use
#                       at most this % of the CPUs (0: do not wait) [20] ...
#   BENCH_QUIET_WAIT    ... but no longer than this many seconds [30]
#   CADDY_BIN           use this Caddy binary instead of building one with ./xcaddy.sh
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

DURATION=${BENCH_DURATION:-10s}
ROUNDS=${BENCH_ROUNDS:-3}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-64}
LATENCY=${BENCH_LATENCY:-20ms}
TTL=50ms   # the issue's setting for caddy-coalesce and Varnish
STALE=1s   # stale (coalesce) and grace (Varnish) of the "with stale" variants
HERD_N=${BENCH_HERD_N:-100}
HERD_ROUNDS=${BENCH_HERD_ROUNDS:-50}
KEYS=${BENCH_KEYS:-10000}
ZIPF_S=${BENCH_ZIPF_S:-1.1}
MEM_KEYS=${BENCH_MEM_KEYS:-10000}
MEM_DURATION=${BENCH_MEM_DURATION:-10s}
MEM_CONNS=${BENCH_MEM_CONNECTIONS:-256}
MEM_EXTRA=${BENCH_MEM_EXTRA:-}
SYSTEMS=${BENCH_SYSTEMS:-caddy-respond caddy-proxy caddy-coalesce caddy-coalesce-stale nginx varnish varnish-grace}
WORKLOADS=${BENCH_WORKLOADS:-hot herd zipf miss miss0 mem fleet}
PORT_BASE=${BENCH_PORT_BASE:-19000}
OUT=${BENCH_OUT:-$BENCH_DIR/out/$(date -u +%Y%m%dT%H%M%SZ)}
PUBLISH=${BENCH_PUBLISH:-0}
INSTALL=${BENCH_INSTALL:-1}
QUIET=${BENCH_QUIET:-20}
QUIET_WAIT=${BENCH_QUIET_WAIT:-30}

UP_PORT=$((PORT_BASE + 80))
REDIS_PORT=$((PORT_BASE + 90)) # the fleet's redis-server
REDIS=/usr/bin/redis-server    # Debian's, as the tests use
# The fleet workload: three Caddy instances, each sent a third of wrk's
# connections (one wrk thread per instance), all with the same Host.
FLEET_SIZE=3
FLEET_CONNS=$((CONNS - CONNS % FLEET_SIZE))
FLEET_HOST=fleet.bench
FLEET_HIT_TTL=1s # the local-hit measurement: every request after the first is a local hit
# keep-alive connections a proxy may keep idle to the upstream (NGINX and Caddy alike)
UP_KEEPALIVE=$((CONNS * 2))

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------- durations
# dur_ms 10s -> 10000; accepts ms, s, m (as wrk and Go do)
dur_ms() {
	local d=$1
	case $d in
	*ms) echo "${d%ms}" ;;
	*s) awk -v v="${d%s}" 'BEGIN { printf "%d", v * 1000 }' ;;
	*m) awk -v v="${d%m}" 'BEGIN { printf "%d", v * 60000 }' ;;
	*) awk -v v="$d" 'BEGIN { printf "%d", v * 1000 }' ;;
	esac
}
DURATION_MS=$(dur_ms "$DURATION")
MEM_DURATION_MS=$(dur_ms "$MEM_DURATION")
LATENCY_MS=$(dur_ms "$LATENCY")
TTL_MS=$(dur_ms "$TTL")

# ---------------------------------------------------------------- processes
PIDS=()  # every process started here; stopped on exit

# tree_pids PID: PID and all its descendants
tree_pids() {
	local p=$1 c
	echo "$p"
	for c in $(pgrep -P "$p" 2>/dev/null || true); do
		tree_pids "$c"
	done
}

# stop_tree PID: TERM the process, wait up to 10 s, then KILL it and whatever
# of its descendants is left.
stop_tree() {
	local pid=$1 tree i
	kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
	tree=$(tree_pids "$pid")
	kill -TERM "$pid" 2>/dev/null || true
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	# shellcheck disable=SC2086
	kill -KILL $tree 2>/dev/null || true
	wait "$pid" 2>/dev/null || true
}

cleanup() {
	local p
	for p in "${PIDS[@]}"; do
		stop_tree "$p"
	done
	PIDS=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

forget_pid() {
	local p keep=()
	for p in "${PIDS[@]}"; do
		[[ $p == "$1" ]] || keep+=("$p")
	done
	PIDS=(${keep[@]+"${keep[@]}"})
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# wait_http URL SECONDS: until URL answers 200
wait_http() {
	local url=$1 secs=$2 i
	for ((i = 0; i < secs * 10; i++)); do
		if [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]]; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

# rss PID...: "<sum of VmHWM kB> <sum of VmRSS kB> <processes>" over the process trees
rss() {
	local hwm=0 cur=0 n=0 p h r root
	for p in $(for root in "$@"; do tree_pids "$root"; done); do
		[[ -r /proc/$p/status ]] || continue
		h=$(awk '/^VmHWM:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
		r=$(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || true)
		hwm=$((hwm + ${h:-0}))
		cur=$((cur + ${r:-0}))
		n=$((n + 1))
	done
	echo "$hwm $cur $n"
}

# cpu_snapshot PID...: "<busy> <total> <ours>" in clock ticks: busy and total
# CPU time of the machine (/proc/stat: user+nice+system+steal, and all), and
# the CPU time of this shell and its reaped children plus that of the given
# live processes (and their reaped children). busy - ours, over a measurement,
# is CPU time taken by processes that are not part of the benchmark (other
# users' work, or steal by the hypervisor): the interference the report shows.
cpu_snapshot() {
	local ours=0 p v
	for p in "$$" "$@"; do
		[[ -r /proc/$p/stat ]] || continue
		# fields after "pid (comm) ": utime stime cutime cstime are the 12th to 15th
		v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 + $14 + $15 }') || continue
		ours=$((ours + ${v:-0}))
	done
	awk -v ours="$ours" '/^cpu / { busy = $2 + $3 + $4 + $9; total = 0; for (i = 2; i <= 9; i++) total += $i; print busy, total, ours; exit }' /proc/stat
}

# proc_ticks PID...: CPU time (user + system, clock ticks) of the given live
# processes: a proxy's own price per request, which other work on the machine
# (or the hypervisor's steal) moves much less than req/s.
proc_ticks() {
	local sum=0 p v
	for p in "$@"; do
		[[ -r /proc/$p/stat ]] || continue
		v=$(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }') || continue
		sum=$((sum + ${v:-0}))
	done
	echo "$sum"
}

# wait_quiet: on a shared machine, wait (at most QUIET_WAIT s) until the CPU
# time used by others over one second is at most QUIET % (nothing of ours runs
# between measurements but the idle upstream). Prints "<seconds waited> <busy %>".
wait_quiet() {
	local waited=0 a b pct
	while :; do
		a=$(cpu_snapshot)
		sleep 1
		b=$(cpu_snapshot)
		pct=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
			t = y[2] - x[2]; o = (y[1] - x[1]) - (y[3] - x[3]); if (o < 0) o = 0
			printf "%.0f", (t > 0 ? 100 * o / t : 0) }')
		if ((QUIET <= 0 || pct <= QUIET || waited >= QUIET_WAIT)); then
			echo "$waited $pct"
			return 0
		fi
		waited=$((waited + 1))
	done
}

# ---------------------------------------------------------------- prerequisites
install_missing() {
	local -a pkgs=()
	command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || pkgs+=(nginx-light)
	command -v varnishd >/dev/null 2>&1 || [[ -x /usr/sbin/varnishd ]] || pkgs+=(varnish)
	command -v wrk >/dev/null 2>&1 || pkgs+=(wrk)
	command -v gnuplot >/dev/null 2>&1 || pkgs+=(gnuplot-nox)
	command -v curl >/dev/null 2>&1 || pkgs+=(curl)
	command -v pgrep >/dev/null 2>&1 || pkgs+=(procps)
	[[ " $WORKLOADS " != *" fleet "* || -x $REDIS ]] || pkgs+=(redis-server)
	((${#pkgs[@]} == 0)) && return 0
	[[ $INSTALL == 1 ]] || die "missing: ${pkgs[*]} (BENCH_INSTALL=0: install them yourself)"
	[[ $(id -u) == 0 ]] || die "missing: ${pkgs[*]}; run as root (sudo bench/run.sh) so that they can be installed"
	command -v apt-get >/dev/null 2>&1 || die "missing: ${pkgs[*]}; no apt-get on this machine, install them yourself"
	log "installing ${pkgs[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >/dev/null
}

export PATH="$PATH:/usr/sbin:/sbin"
install_missing
command -v go >/dev/null 2>&1 || die "Go is needed (go 1.26 or newer, https://go.dev/dl/)"

mkdir -p "$OUT"/{bin,raw,conf,logs,run,home}
OUT=$(cd "$OUT" && pwd)
log "output: $OUT"

# ---------------------------------------------------------------- builds
log "building the benchmark tools"
(cd "$ROOT" && go build -o "$OUT/bin/upstream" ./bench/upstream &&
	go build -o "$OUT/bin/herd" ./bench/herd &&
	go build -o "$OUT/bin/report" ./bench/report) || die "building bench tools failed"

if [[ -n ${CADDY_BIN:-} ]]; then
	CADDY=$CADDY_BIN
	[[ -x $CADDY ]] || die "CADDY_BIN=$CADDY is not executable"
	log "using CADDY_BIN=$CADDY (not building)"
else
	CADDY=$OUT/bin/caddy
	log "building Caddy with the module: ./xcaddy.sh $CADDY (first build: a few minutes)"
	"$ROOT/xcaddy.sh" "$CADDY" >"$OUT/logs/xcaddy.log" 2>&1 ||
		die "./xcaddy.sh failed, see $OUT/logs/xcaddy.log (or set CADDY_BIN to a Caddy binary)"
fi

HAVE_COALESCE=0
# (not `caddy list-modules | grep -q`: grep -q exits at the first match, and with
# pipefail the SIGPIPE caddy then gets fails the pipeline)
modules=$("$CADDY" list-modules 2>/dev/null || true)
if grep -qx 'http.handlers.coalesce' <<<"$modules"; then
	HAVE_COALESCE=1
elif [[ -z ${CADDY_BIN:-} ]]; then
	die "$CADDY, built by ./xcaddy.sh, has no http.handlers.coalesce module (see $OUT/logs/xcaddy.log)"
fi

# ---------------------------------------------------------------- systems
# port_of SYSTEM; admin port of Caddy systems is port + 100
port_of() {
	case $1 in
	caddy-respond) echo $((PORT_BASE + 1)) ;;
	caddy-proxy) echo $((PORT_BASE + 2)) ;;
	caddy-coalesce) echo $((PORT_BASE + 3)) ;;
	caddy-coalesce-stale) echo $((PORT_BASE + 4)) ;;
	caddy-coalesce-mem) echo $((PORT_BASE + 5)) ;;
	nginx) echo $((PORT_BASE + 10)) ;;
	varnish) echo $((PORT_BASE + 20)) ;;
	varnish-grace) echo $((PORT_BASE + 21)) ;;
	caddy-fleet | caddy-fleet-shared) echo $((PORT_BASE + 31)) ;; # instance i: + i - 1
	*) die "unknown system $1" ;;
	esac
}

# ttl_ms_of SYSTEM WORKLOAD: the TTL used for the theoretical minimum of upstream requests
ttl_ms_of() {
	case $1 in
	caddy-fleet | caddy-fleet-shared) [[ $2 == fleet-hit ]] && dur_ms "$FLEET_HIT_TTL" || echo "$TTL_MS" ;;
	caddy-coalesce | caddy-coalesce-stale | varnish | varnish-grace) echo "$TTL_MS" ;;
	caddy-coalesce-mem | nginx) echo 1000 ;;
	caddy-proxy) echo 0 ;;
	caddy-respond) echo -1 ;; # no upstream
	esac
}

# The ceiling's body: as large as the upstream's (1 KiB) but without braces,
# because respond scans its body for {placeholders} (a JSON object would make
# the ceiling pay for that scan on every request).
respond_body() {
	local head='["caddy respond: 1 KiB like the upstream body, without braces","' pad
	pad=$((1024 - ${#head} - 2))
	printf '%s%s"]' "$head" "$(printf '%*s' "$pad" '' | tr ' ' x)"
}
RESPOND_BODY=$(respond_body)

write_caddyfile() { # SYSTEM FILE
	local sys=$1 f=$2 port admin handler
	port=$(port_of "$sys")
	admin=$((port + 100))
	local proxy="reverse_proxy 127.0.0.1:$UP_PORT {
		transport http {
			keepalive_idle_conns_per_host $UP_KEEPALIVE
		}
	}"
	case $sys in
	caddy-respond) handler="respond \`$RESPOND_BODY\` 200" ;;
	caddy-proxy) handler=$proxy ;;
	caddy-coalesce) handler="coalesce {
		ttl $TTL
	}
	$proxy" ;;
	caddy-coalesce-stale) handler="coalesce {
		ttl $TTL
		stale $STALE
	}
	$proxy" ;;
	caddy-coalesce-mem) handler="coalesce {
		ttl 1s
		max_entries 20000${MEM_EXTRA:+
		$MEM_EXTRA}
	}
	$proxy" ;;
	esac
	cat >"$f" <<EOF
{
	admin localhost:$admin
	auto_https off
	persist_config off
	log {
		level ERROR
	}
}

http://:$port {
	bind 127.0.0.1
	$handler
}
EOF
}

# write_fleet_caddyfile SYSTEM WORKLOAD INSTANCE FILE: the Caddyfile of one
# instance of the fleet; the instances' files differ only in their ports.
# caddy-fleet-shared adds `shared` on the fleet's redis-server. fleet-hot and
# fleet-herd use caddy-coalesce's settings (ttl 50ms); fleet-hit keeps a copy
# fresh for FLEET_HIT_TTL, and stale for as long again while one refresh runs,
# so that every request after the first is a local hit.
write_fleet_caddyfile() {
	local sys=$1 wl=$2 port admin shared="" settings="ttl $TTL"
	port=$(($(port_of "$sys") + $3 - 1))
	admin=$((port + 100))
	[[ $wl == fleet-hit ]] && settings="ttl $FLEET_HIT_TTL
		stale $STALE"
	[[ $sys == caddy-fleet-shared ]] && shared="
		shared redis://127.0.0.1:$REDIS_PORT"
	cat >"$4" <<EOF
{
	admin localhost:$admin
	auto_https off
	persist_config off
	log {
		level ERROR
	}
}

http://:$port {
	bind 127.0.0.1
	coalesce {
		$settings
		zone bench$shared
	}
	reverse_proxy 127.0.0.1:$UP_PORT {
		transport http {
			keepalive_idle_conns_per_host $UP_KEEPALIVE
		}
	}
}
EOF
}

write_nginx_conf() { # DIR
	local d=$1 port user=""
	port=$(port_of nginx)
	[[ $(id -u) == 0 ]] && user="user root;"
	mkdir -p "$d/tmp" "$d/cache"
	cat >"$d/nginx.conf" <<EOF
worker_processes 2;
pid $d/nginx.pid;
error_log $d/error.log error;
$user
events {
	worker_connections 4096;
}
http {
	access_log off;
	client_body_temp_path $d/tmp/body;
	proxy_temp_path $d/tmp/proxy;
	fastcgi_temp_path $d/tmp/fastcgi;
	uwsgi_temp_path $d/tmp/uwsgi;
	scgi_temp_path $d/tmp/scgi;
	keepalive_requests 1000000;
	proxy_cache_path $d/cache levels=1:2 keys_zone=bench:64m max_size=1g inactive=60s use_temp_path=off;
	upstream bench_upstream {
		server 127.0.0.1:$UP_PORT;
		keepalive $UP_KEEPALIVE;
		keepalive_requests 1000000;
	}
	server {
		listen 127.0.0.1:$port;
		location / {
			proxy_pass http://bench_upstream;
			proxy_http_version 1.1;
			proxy_set_header Connection "";
			proxy_cache bench;
			proxy_cache_valid 200 1s;
			proxy_cache_lock on;
			proxy_cache_use_stale updating;
			proxy_cache_background_update on;
			add_header X-Cache-Status \$upstream_cache_status;
		}
	}
}
EOF
}

write_vcl() { # SYSTEM FILE
	local grace=0s
	[[ $1 == varnish-grace ]] && grace=$STALE
	cat >"$2" <<EOF
vcl 4.1;

backend default {
	.host = "127.0.0.1";
	.port = "$UP_PORT";
}

sub vcl_backend_response {
	set beresp.ttl = $TTL;
	set beresp.grace = $grace;
}
EOF
}

SYS_PIDS=()  # the processes of the running system (a fleet has several)
SYS_PORTS=() # the ports its clients are sent to (a fleet's: one per instance)
SYS_PORT=""  # the first of them

# start_system SYSTEM TAG: writes its configuration, starts it, waits until it
# answers through to the upstream. Sets SYS_PIDS, SYS_PORTS and SYS_PORT.
start_system() {
	local sys=$1 tag=$2 port dir
	port=$(port_of "$sys")
	dir=$OUT/run/$sys
	rm -rf "$dir"
	mkdir -p "$dir" "$OUT/conf/$sys"
	port_in_use "$port" && { log "port $port is in use"; return 1; }
	case $sys in
	caddy-*)
		write_caddyfile "$sys" "$OUT/conf/$sys/Caddyfile"
		HOME=$OUT/home XDG_DATA_HOME=$OUT/home/data XDG_CONFIG_HOME=$OUT/home/config \
			"$CADDY" run --config "$OUT/conf/$sys/Caddyfile" --adapter caddyfile \
			>>"$OUT/logs/$tag.log" 2>&1 &
		;;
	nginx)
		write_nginx_conf "$dir"
		cp "$dir/nginx.conf" "$OUT/conf/nginx/nginx.conf"
		nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" -g 'daemon off;' \
			>>"$OUT/logs/$tag.log" 2>&1 &
		;;
	varnish*)
		write_vcl "$sys" "$OUT/conf/$sys/default.vcl"
		varnishd -F -a "127.0.0.1:$port" -f "$OUT/conf/$sys/default.vcl" -n "$dir/varnish" \
			-s malloc,256m >>"$OUT/logs/$tag.log" 2>&1 &
		;;
	esac
	SYS_PIDS=("$!")
	SYS_PORTS=("$port")
	SYS_PORT=$port
	PIDS+=("$!")
	if ! wait_http "http://127.0.0.1:$port/probe/$tag/start" 30; then
		log "$sys did not come up, see $OUT/logs/$tag.log"
		stop_system
		return 1
	fi
}

# stop_system: its processes in the reverse order of their start (a fleet's
# instances before its Redis)
stop_system() {
	local i
	for ((i = ${#SYS_PIDS[@]} - 1; i >= 0; i--)); do
		stop_tree "${SYS_PIDS[i]}"
		forget_pid "${SYS_PIDS[i]}"
	done
	SYS_PIDS=()
	SYS_PORTS=()
}

# sys_tree: the running system's processes and their descendants
sys_tree() {
	local p
	for p in ${SYS_PIDS[@]+"${SYS_PIDS[@]}"}; do
		tree_pids "$p"
	done
}

# redis_answers: the fleet's redis-server answers PING
redis_answers() {
	local line
	line=$( (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" && printf 'PING\r\n' >&3 && read -r -t 2 l <&3 && echo "$l") 2>/dev/null) || return 1
	[[ $line == +PONG* ]]
}

# start_fleet SYSTEM WORKLOAD TAG: the FLEET_SIZE Caddy instances of SYSTEM,
# with the Caddyfile of WORKLOAD, and for caddy-fleet-shared first a
# redis-server of their own; waits until every instance answers through to
# the upstream and, with the tier, listens to the fleet's wake-ups (before
# that, an instance would not wait for another's flight). Sets SYS_PIDS
# (Redis first), SYS_PORTS and SYS_PORT.
start_fleet() {
	local sys=$1 wl=$2 tag=$3 base dir i port
	base=$(port_of "$sys")
	dir=$OUT/run/$sys
	rm -rf "$dir"
	mkdir -p "$dir" "$OUT/conf/$sys"
	SYS_PIDS=()
	SYS_PORTS=()
	if [[ $sys == caddy-fleet-shared ]]; then
		port_in_use "$REDIS_PORT" && { log "port $REDIS_PORT is in use"; return 1; }
		"$REDIS" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
			>>"$OUT/logs/$tag-redis.log" 2>&1 &
		SYS_PIDS+=("$!")
		PIDS+=("$!")
		for ((i = 0; i < 100; i++)); do
			redis_answers && break
			sleep 0.1
		done
		if ! redis_answers; then
			log "redis-server did not come up, see $OUT/logs/$tag-redis.log"
			stop_system
			return 1
		fi
	fi
	for ((i = 1; i <= FLEET_SIZE; i++)); do
		port=$((base + i - 1))
		if port_in_use "$port"; then
			log "port $port is in use"
			stop_system
			return 1
		fi
		write_fleet_caddyfile "$sys" "$wl" "$i" "$OUT/conf/$sys/$wl-$i.Caddyfile"
		HOME=$OUT/home XDG_DATA_HOME=$OUT/home/data XDG_CONFIG_HOME=$OUT/home/config \
			"$CADDY" run --config "$OUT/conf/$sys/$wl-$i.Caddyfile" --adapter caddyfile \
			>>"$OUT/logs/$tag-$i.log" 2>&1 &
		SYS_PIDS+=("$!")
		PIDS+=("$!")
		SYS_PORTS+=("$port")
	done
	SYS_PORT=${SYS_PORTS[0]}
	for ((i = 1; i <= FLEET_SIZE; i++)); do
		port=${SYS_PORTS[i - 1]}
		if ! wait_http "http://127.0.0.1:$port/probe/$tag/start" 30; then
			log "$sys instance $i did not come up, see $OUT/logs/$tag-$i.log"
			stop_system
			return 1
		fi
		[[ $sys == caddy-fleet-shared ]] || continue
		local listening=0 j
		for ((j = 0; j < 100; j++)); do
			if curl -s --max-time 1 "http://localhost:$((port + 100))/coalesce/stats" | grep -Eq '"listening": ?true'; then
				listening=1
				break
			fi
			sleep 0.1
		done
		if ((listening == 0)); then
			log "$sys instance $i does not listen to the fleet after 10 s, see $OUT/logs/$tag-$i.log"
			stop_system
			return 1
		fi
	done
}

# ---------------------------------------------------------------- upstream
log "starting the upstream on 127.0.0.1:$UP_PORT (latency $LATENCY)"
port_in_use "$UP_PORT" && die "port $UP_PORT is in use (set BENCH_PORT_BASE)"
"$OUT/bin/upstream" -listen "127.0.0.1:$UP_PORT" -latency "$LATENCY" >"$OUT/logs/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_http "http://127.0.0.1:$UP_PORT/__stats" 10 || die "upstream did not start"
UP=http://127.0.0.1:$UP_PORT

up_reset() { curl -s -X POST --max-time 5 "$UP/__reset" >/dev/null; }
up_stats() { curl -s --max-time 10 "$UP/__stats?prefix=$1"; }

# ---------------------------------------------------------------- checks
systems=()
skipped=()
for sys in $SYSTEMS; do
	port_of "$sys" >/dev/null
	if [[ $sys == caddy-coalesce* ]]; then
		if [[ $HAVE_COALESCE != 1 ]]; then
			skipped+=("$sys:$CADDY has no http.handlers.coalesce module")
			continue
		fi
		write_caddyfile "$sys" "$OUT/run/$sys.Caddyfile"
		if ! "$CADDY" adapt --config "$OUT/run/$sys.Caddyfile" --adapter caddyfile >"$OUT/logs/adapt-$sys.log" 2>&1; then
			skipped+=("$sys:its Caddyfile does not adapt: $(tail -1 "$OUT/logs/adapt-$sys.log")")
			continue
		fi
	fi
	systems+=("$sys")
done
mem_systems=()
for sys in caddy-proxy caddy-coalesce-mem; do
	if [[ $sys == caddy-coalesce-mem && $HAVE_COALESCE != 1 ]]; then
		[[ " $WORKLOADS " == *" mem "* ]] && skipped+=("$sys:$CADDY has no http.handlers.coalesce module")
		continue
	fi
	mem_systems+=("$sys")
done
fleet_systems=()
if [[ " $WORKLOADS " == *" fleet "* ]]; then
	for sys in caddy-fleet caddy-fleet-shared; do
		if [[ $HAVE_COALESCE != 1 ]]; then
			skipped+=("$sys:$CADDY has no http.handlers.coalesce module")
			continue
		fi
		if [[ $sys == caddy-fleet-shared && ! -x $REDIS ]]; then
			skipped+=("$sys:$REDIS is not installed (apt-get install redis-server)")
			continue
		fi
		write_fleet_caddyfile "$sys" fleet-hot 1 "$OUT/run/$sys.Caddyfile"
		if ! "$CADDY" adapt --config "$OUT/run/$sys.Caddyfile" --adapter caddyfile >"$OUT/logs/adapt-$sys.log" 2>&1; then
			skipped+=("$sys:its Caddyfile does not adapt: $(tail -1 "$OUT/logs/adapt-$sys.log")")
			continue
		fi
		fleet_systems+=("$sys")
	done
	((FLEET_CONNS >= FLEET_SIZE)) || die "the fleet workload needs BENCH_CONNECTIONS >= $FLEET_SIZE"
fi
for s in ${skipped[@]+"${skipped[@]}"}; do
	log "skipping ${s%%:*}: ${s#*:}"
done
((${#systems[@]} > 0)) || die "no system to measure"

# ---------------------------------------------------------------- run description
cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
{
	echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	cmd="bench/run.sh"
	for v in $(compgen -e | grep -E '^(BENCH_|CADDY_BIN$)' | sort); do
		[[ $v == BENCH_OUT ]] && continue
		cmd="$v=${!v} $cmd"
	done
	echo "command=$cmd"
	echo "host=$(uname -srm)"
	echo "os=$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
	echo "cpu=$cpu, $(nproc) CPUs"
	echo "memory=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
	echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
	echo "go=$(go version | cut -d' ' -f3-)"
	echo "caddy=$("$CADDY" version 2>/dev/null | head -1)"
	echo "caddy_bin=$CADDY"
	echo "have_coalesce=$HAVE_COALESCE"
	echo "nginx=$(nginx -v 2>&1 | sed 's/^nginx version: //')"
	echo "varnish=$(varnishd -V 2>&1 | head -1)"
	echo "wrk=$(wrk -v 2>&1 | head -1 | cut -d' ' -f1-2)"
	echo "git=$(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo none)$(cd "$ROOT" && git diff --quiet HEAD -- 2>/dev/null || echo '+dirty')"
	echo "duration=$DURATION"
	echo "rounds=$ROUNDS"
	echo "threads=$THREADS"
	echo "connections=$CONNS"
	echo "latency_ms=$LATENCY_MS"
	echo "ttl_ms=$TTL_MS"
	echo "stale=$STALE"
	echo "herd_n=$HERD_N"
	echo "herd_rounds=$HERD_ROUNDS"
	echo "keys=$KEYS"
	echo "zipf_s=$ZIPF_S"
	echo "mem_keys=$MEM_KEYS"
	echo "mem_duration=$MEM_DURATION"
	echo "mem_connections=$MEM_CONNS"
	if [[ " $WORKLOADS " == *" fleet "* ]]; then
		echo "fleet_size=$FLEET_SIZE"
		echo "fleet_connections=$FLEET_CONNS"
		echo "fleet_host=$FLEET_HOST"
		echo "fleet_hit_ttl=$FLEET_HIT_TTL"
		echo "redis=$("$REDIS" --version 2>/dev/null | cut -d' ' -f1-3)"
	fi
	echo "systems=${systems[*]}"
	echo "workloads=$WORKLOADS"
	echo "quiet=$QUIET"
	echo "quiet_wait=$QUIET_WAIT"
	for s in ${skipped[@]+"${skipped[@]}"}; do
		echo "skipped=$s"
	done
} >"$OUT/meta.env"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 1.0) }'; then
	log "warning: load average is $load: other work on this machine will disturb the figures"
fi

# ---------------------------------------------------------------- measurements
FAILED=0

# run_load WORKLOAD SYSTEM PREFIX OUTFILE: the client side of one measurement
run_load() {
	local wl=$1 sys=$2 prefix=$3 out=$4 url="http://127.0.0.1:$SYS_PORT"
	local secs=$(((DURATION_MS + 999) / 1000 + 30))
	local -a wrk_args=(-t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 5s)
	case $wl in
	hot)
		timeout "$secs" wrk "${wrk_args[@]}" -s "$BENCH_DIR/wrk/hot.lua" "$url$prefix/key" >"$out" 2>&1
		;;
	zipf)
		BENCH_PREFIX=$prefix BENCH_KEYS=$KEYS BENCH_ZIPF_S=$ZIPF_S \
			timeout "$secs" wrk "${wrk_args[@]}" -s "$BENCH_DIR/wrk/zipf.lua" "$url/" >"$out" 2>&1
		;;
	miss)
		BENCH_PREFIX=$prefix BENCH_QUERY="" \
			timeout "$secs" wrk "${wrk_args[@]}" -s "$BENCH_DIR/wrk/unique.lua" "$url/" >"$out" 2>&1
		;;
	miss0)
		BENCH_PREFIX=$prefix BENCH_QUERY="?delay=0s" \
			timeout "$secs" wrk "${wrk_args[@]}" -s "$BENCH_DIR/wrk/unique.lua" "$url/" >"$out" 2>&1
		;;
	herd)
		timeout 600 "$OUT/bin/herd" -url "$url" -upstream "$UP" -n "$HERD_N" -rounds "$HERD_ROUNDS" \
			-prefix "$prefix" -deadline 500s >"$out" 2>&1
		;;
	mem)
		# every key once (so that all of them are in the cache whatever this
		# machine's speed), then the timed round-robin load
		timeout 300 "$OUT/bin/herd" -url "$url" -prefix "$prefix" -fill "$MEM_KEYS" -n "$CONNS" -deadline 290s >"$out" 2>&1 || return $?
		secs=$(((MEM_DURATION_MS + 999) / 1000 + 30))
		BENCH_PREFIX=$prefix BENCH_KEYS=$MEM_KEYS \
			timeout "$secs" wrk -t"$THREADS" -c"$MEM_CONNS" -d"$MEM_DURATION" --timeout 5s \
			-s "$BENCH_DIR/wrk/keys.lua" "$url/" >>"$out" 2>&1
		;;
	fleet-hot | fleet-hit)
		# one wrk thread per instance (fleet.lua), all with the fleet's Host
		local addrs
		addrs=$(printf '127.0.0.1:%s,' "${SYS_PORTS[@]}")
		BENCH_FLEET_ADDRS=${addrs%,} BENCH_HOST=$FLEET_HOST \
			timeout "$secs" wrk -t"${#SYS_PORTS[@]}" -c"$FLEET_CONNS" -d"$DURATION" --timeout 5s \
			-s "$BENCH_DIR/wrk/fleet.lua" "$url$prefix/key" >"$out" 2>&1
		;;
	fleet-herd)
		# each herd spread round robin over the instances
		local urls
		urls=$(printf 'http://127.0.0.1:%s,' "${SYS_PORTS[@]}")
		timeout 600 "$OUT/bin/herd" -url "${urls%,}" -host "$FLEET_HOST" -upstream "$UP" -n "$HERD_N" \
			-rounds "$HERD_ROUNDS" -prefix "$prefix" -deadline 500s >"$out" 2>&1
		;;
	esac
}

# measure WORKLOAD SYSTEM ROUND
measure() {
	local wl=$1 sys=$2 round=$3
	local tag="$wl-$sys-r$round"
	local prefix="/$wl/r$round-$sys-$RANDOM$RANDOM"
	local f=$OUT/raw/$tag.txt tmp=$OUT/raw/$tag.tmp lat=$LATENCY_MS
	[[ $wl == miss0 ]] && lat=0
	{
		echo "workload=$wl"
		echo "system=$sys"
		echo "round=$round"
		echo "ttl_ms=$(ttl_ms_of "$sys" "$wl")"
		echo "latency_ms=$lat"
		echo "prefix=$prefix"
	} >"$f"
	local q
	q=$(wait_quiet)
	echo "quiet_wait_s=${q% *}" >>"$f"
	echo "other_cpu_before_pct=${q#* }" >>"$f"
	log "round $round/$ROUNDS  $wl  $sys$( ((${q% *} > 0)) && echo "  (waited ${q% *} s for other work to calm down, now ${q#* } %)")"
	local started_ok=1
	case $sys in
	caddy-fleet*) start_fleet "$sys" "$wl" "$tag" || started_ok=0 ;;
	*) start_system "$sys" "$tag" || started_ok=0 ;;
	esac
	if ((started_ok == 0)); then
		echo "failed=did not start (logs/$tag*.log)" >>"$f"
		FAILED=$((FAILED + 1))
		return 0
	fi
	# two probes: the second shows the cache headers of a repeated request; a
	# fleet's go to each instance in turn, with the fleet's Host (with the
	# tier the first leads the fleet, the others are answered by it), and
	# then to the first again
	local -a probe_ports=("$SYS_PORT" "$SYS_PORT") probe_host=()
	if [[ $sys == caddy-fleet* ]]; then
		probe_ports=("${SYS_PORTS[@]}" "$SYS_PORT")
		probe_host=(-H "Host: $FLEET_HOST")
	fi
	local port
	{
		echo "# probe"
		for port in "${probe_ports[@]}"; do
			curl -s -D - -o /dev/null --max-time 5 ${probe_host[@]+"${probe_host[@]}"} "http://127.0.0.1:$port/probe/$tag/p" || true
		done
	} | tr -d '\r' | grep -iE '^(# probe|HTTP/|cache-status|x-cache|x-varnish|age:|via:|server:)' >>"$f" || true
	up_reset
	local rc=0 cpu0 cpu1 proxy0 proxy1
	# shellcheck disable=SC2046
	cpu0=$(cpu_snapshot "$UP_PID" $(sys_tree))
	# shellcheck disable=SC2046
	proxy0=$(proc_ticks $(sys_tree))
	# in the background, so that a signal is handled at once (the trap stops it)
	run_load "$wl" "$sys" "$prefix" "$tmp" &
	local load_pid=$!
	PIDS+=("$load_pid")
	wait "$load_pid" || rc=$?
	forget_pid "$load_pid"
	# shellcheck disable=SC2046
	cpu1=$(cpu_snapshot "$UP_PID" $(sys_tree))
	# shellcheck disable=SC2046
	proxy1=$(proc_ticks $(sys_tree))
	local r
	r=$(rss "${SYS_PIDS[@]}")
	{
		echo "# output (exit $rc)"
		cat "$tmp"
		echo "# upstream"
		echo "UPSTREAMJSON $(up_stats "$prefix/")"
		if [[ $sys == caddy-coalesce* || $sys == caddy-fleet* ]]; then
			# the module's own view (admin API): cache entries and bytes, registry
			# counters, the shared tier's; one line per instance of a fleet
			for port in "${SYS_PORTS[@]}"; do
				echo "COALESCESTATS $(curl -s --max-time 5 "http://localhost:$((port + 100))/coalesce/stats" | tr -d '\n')"
			done
		fi
		read -r hwm cur n <<<"$r"
		echo "proxy_cpu_ticks=$((proxy1 - proxy0))"
		echo "clk_tck=$(getconf CLK_TCK)"
		echo "rss_hwm_kb=$hwm"
		echo "rss_kb=$cur"
		echo "rss_procs=$n"
		# share of the machine's CPU time used, during the load, by the
		# benchmark (client, upstream, proxy) and by anything else
		read -r b0 t0 o0 <<<"$cpu0"
		read -r b1 t1 o1 <<<"$cpu1"
		awk -v b="$((b1 - b0))" -v t="$((t1 - t0))" -v o="$((o1 - o0))" 'BEGIN {
			if (t <= 0) exit
			other = b - o; if (other < 0) other = 0
			printf "bench_cpu_pct=%.1f\nother_cpu_pct=%.1f\n", 100 * o / t, 100 * other / t
		}'
	} >>"$f"
	rm -f "$tmp"
	if [[ $rc != 0 ]]; then
		echo "failed=load tool exited with $rc" >>"$f"
		FAILED=$((FAILED + 1))
		log "  load tool exited with $rc, see $f"
	fi
	stop_system
	sleep 0.5
}

# rotate LIST... by N: so that no system is always first (or last) in a round
rotate() {
	local n=$1
	shift
	local -a a=("$@")
	local len=${#a[@]} i
	for ((i = 0; i < len; i++)); do
		printf '%s\n' "${a[$(((i + n) % len))]}"
	done
}

started=$(date +%s)
for ((round = 1; round <= ROUNDS; round++)); do
	for wl in $WORKLOADS; do
		parts=("$wl")
		case $wl in
		hot | zipf | miss | miss0) list=("${systems[@]}") ;;
		herd) list=() && for s in "${systems[@]}"; do [[ $s == caddy-respond ]] || list+=("$s"); done ;;
		mem) list=("${mem_systems[@]}") ;;
		fleet) list=(${fleet_systems[@]+"${fleet_systems[@]}"}) parts=(fleet-hot fleet-hit fleet-herd) ;;
		*) die "unknown workload $wl" ;;
		esac
		((${#list[@]} > 0)) || continue
		for part in "${parts[@]}"; do
			for sys in $(rotate $((round - 1)) "${list[@]}"); do
				measure "$part" "$sys" "$round"
			done
		done
	done
done
echo "elapsed_s=$(($(date +%s) - started))" >>"$OUT/meta.env"
echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/meta.env"
echo "failed=$FAILED" >>"$OUT/meta.env"

cleanup
# scratch state of the systems (NGINX cache files, Varnish work dirs): hundreds of MB
rm -rf "$OUT/run"

# ---------------------------------------------------------------- report
log "writing the report"
"$OUT/bin/report" -dir "$OUT" -o "$OUT/RESULTS.md" -img plot.png
# The fleet's and the all-miss measurements are published apart from the
# others: bench/results/ holds the side-by-side workloads, bench/results-miss/
# the all-miss ones, bench/results-fleet/ the fleet's. A run replaces only the
# directories of what it measured (BENCH_WORKLOADS=fleet keeps the others as
# they are), and bench/RESULTS.md is made from all three.

# published_dir FILE: the published directory a raw file or a configuration belongs to.
# The all-miss workloads (miss, miss0: the module's own price, which moves
# with every change to its request path) have a directory of their own, so
# that they can be measured again without the rest.
published_dir() {
	case ${1##*/} in
	fleet-* | caddy-fleet*) echo results-fleet ;;
	miss-* | miss0-*) echo results-miss ;;
	*) echo results ;;
	esac
}

# publish NAME: bench/NAME becomes this run's raw files and configurations
# that belong there, with its meta.env; nothing happens if this run measured
# none of them.
publish() {
	local name=$1 res=$BENCH_DIR/$1 f
	local -a raw=()
	for f in "$OUT"/raw/*.txt; do
		if [[ $(published_dir "$f") == "$name" ]]; then
			raw+=("$f")
		fi
	done
	((${#raw[@]} > 0)) || return 0
	if [[ -s $res/notes.md ]]; then
		log "note: bench/$name/notes.md described the previous published run; it is removed with it (git has it)"
	fi
	rm -rf "$res"
	mkdir -p "$res/raw" "$res/conf"
	cp "$OUT/meta.env" "$res/"
	cp "${raw[@]}" "$res/raw/"
	for f in "$OUT"/conf/*; do
		# configurations are per system: the all-miss directory takes those
		# of the side-by-side systems it measured
		case $(published_dir "$f"):$name in
		"$name":* | results:results-miss) cp -r "$f" "$res/conf/" ;;
		esac
	done
	log "published: bench/$name/"
}

if [[ $PUBLISH == 1 ]]; then
	publish results
	publish results-miss
	publish results-fleet
	dirs=()
	for d in results results-miss results-fleet; do
		if [[ -d $BENCH_DIR/$d/raw ]]; then
			dirs+=(-dir "$BENCH_DIR/$d")
		fi
	done
	mkdir -p "$BENCH_DIR/results"
	"$OUT/bin/report" "${dirs[@]}" -o "$BENCH_DIR/RESULTS.md" -img results/plot.png -plot "$BENCH_DIR/results/plot.png"
	log "published: bench/RESULTS.md"
fi
log "done: $OUT/RESULTS.md"
((FAILED == 0)) || log "warning: $FAILED measurement(s) failed, see the report"
