#!/usr/bin/env bash
# Runs the demo: the demo API upstream (cmd/demo-upstream) behind Caddy with
# Caddyfile.example. Caddy serves http://localhost:$PORT (default 8080), its
# admin API is on $ADMIN (default localhost:2019); stop with Ctrl-C. Build
# ./caddy first with ./xcaddy.sh.
#
#   ./demo.sh                         starts the demo upstream on 127.0.0.1:9000
#                                     (DEMO_UPSTREAM_LISTEN=host:port moves it)
#   UPSTREAM=10.0.0.5:8000 ./demo.sh  uses your own upstream instead
#   PORT=8081 ADMIN=localhost:2020 ./demo.sh   other ports for Caddy
#
# Then, in another terminal (with the default ports):
#   for i in $(seq 20); do curl -s -o /dev/null localhost:8080/api/sessions & done; wait
#   curl -s localhost:9000/stats      # how many requests reached the upstream
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ ! -x ./caddy ]]; then
	echo "demo.sh: ./caddy not found: build it first with ./xcaddy.sh" >&2
	exit 1
fi

upstream_pid=
workdir=
cleanup() {
	if [[ -n $upstream_pid ]]; then
		kill "$upstream_pid" 2>/dev/null || true
		wait "$upstream_pid" 2>/dev/null || true
	fi
	[[ -z $workdir ]] || rm -rf "$workdir"
}
trap cleanup EXIT

if [[ -z ${UPSTREAM:-} ]]; then
	UPSTREAM=${DEMO_UPSTREAM_LISTEN:-127.0.0.1:9000}
	# Build, then run the binary itself rather than `go run`: killing `go run`
	# would leave its child (the server) running.
	workdir=$(mktemp -d)
	echo "demo.sh: building and starting the demo upstream on $UPSTREAM"
	go build -o "$workdir/demo-upstream" ./cmd/demo-upstream
	"$workdir/demo-upstream" -listen "$UPSTREAM" &
	upstream_pid=$!
	for ((i = 0; ; i++)); do
		if ! kill -0 "$upstream_pid" 2>/dev/null; then
			echo "demo.sh: the demo upstream exited (is $UPSTREAM already in use?)" >&2
			exit 1
		fi
		# bash's /dev/tcp: no curl needed
		if (exec 3<>"/dev/tcp/${UPSTREAM%:*}/${UPSTREAM##*:}") 2>/dev/null; then
			break
		fi
		if ((i >= 100)); then
			echo "demo.sh: the demo upstream did not answer on $UPSTREAM within 10s" >&2
			exit 1
		fi
		sleep 0.1
	done
fi
# Caddyfile.example reads these ({$PORT:8080}, ...); set them here so that
# the line below shows the real addresses.
PORT=${PORT:-8080}
ADMIN=${ADMIN:-localhost:2019}
export UPSTREAM PORT ADMIN

echo "demo.sh: caddy on http://localhost:$PORT -> $UPSTREAM, admin API on $ADMIN (try: curl -i localhost:$PORT/api/sessions)"
./caddy run --config Caddyfile.example --adapter caddyfile
