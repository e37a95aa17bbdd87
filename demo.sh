#!/usr/bin/env bash
# Runs the demo: the demo API upstream (cmd/demo-upstream) behind Caddy with
# Caddyfile.example, and the demo page (demo/web). Caddy serves
# http://localhost:$PORT (default 8080) and, over HTTP/2,
# https://localhost:$HTTPS_PORT (default 8443); its admin API is on $ADMIN
# (default localhost:2019); stop with Ctrl-C. Build ./caddy first with
# ./xcaddy.sh.
#
# The page is built here (npm ci, then vite build, each only when its inputs
# changed) when Node.js 20.19 or later and npm are installed; without them
# the API demo runs alone, and this says what to install.
#
#   ./demo.sh                         starts the demo upstream on 127.0.0.1:9000
#                                     (DEMO_UPSTREAM_LISTEN=host:port moves it)
#   UPSTREAM=10.0.0.5:8000 ./demo.sh  uses your own upstream instead
#   PORT=8081 HTTPS_PORT=8444 ADMIN=localhost:2020 ./demo.sh   other ports for Caddy
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

# node_ok: Node.js and npm are there, in a version Vite 8 supports.
node_ok() {
	command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 &&
		node -e 'const [a, b] = process.versions.node.split(".").map(Number);
process.exit(a > 22 || (a === 22 && b >= 12) || (a === 20 && b >= 19) ? 0 : 1)'
}

# build_page builds demo/web into demo/web/dist, skipping each step whose
# inputs did not change since it last ran.
build_page() {
	local web=demo/web
	if [[ ! -f $web/node_modules/.package-lock.json || $web/package-lock.json -nt $web/node_modules/.package-lock.json ]]; then
		echo "demo.sh: installing the demo page's packages (npm ci in $web)"
		(cd "$web" && npm ci --no-audit --no-fund --no-update-notifier) || return 1
	fi
	if [[ ! -f $web/dist/index.html ]] ||
		[[ -n $(find "$web/src" "$web/index.html" "$web/vite.config.js" "$web/package-lock.json" -newer "$web/dist/index.html" -print -quit) ]]; then
		echo "demo.sh: building the demo page (vite build in $web)"
		(cd "$web" && npx --no-install --no-update-notifier vite build --logLevel warn) || return 1
		touch "$web/dist/index.html"
	fi
}

page=
if ! node_ok; then
	echo "demo.sh: the demo page needs Node.js 20.19 or later (or 22.12+) and npm, found: $(node --version 2>/dev/null || echo 'no node'), $(npm --version 2>/dev/null || echo 'no npm')." >&2
	echo "demo.sh: install them (https://nodejs.org/ or your system's packages) to see the page; running the API demo without it." >&2
elif ! build_page; then
	echo "demo.sh: building the demo page failed (above); running the API demo without it." >&2
else
	page=1
fi

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
HTTPS_PORT=${HTTPS_PORT:-8443}
ADMIN=${ADMIN:-localhost:2019}
export UPSTREAM PORT HTTPS_PORT ADMIN

echo "demo.sh: caddy on http://localhost:$PORT and https://localhost:$HTTPS_PORT (HTTP/2) -> $UPSTREAM, admin API on $ADMIN"
if [[ -n $page ]]; then
	echo "demo.sh: open https://localhost:$HTTPS_PORT/ for the demo page (your browser warns once about Caddy's local certificate), or try: curl -i localhost:$PORT/api/sessions"
else
	echo "demo.sh: try: curl -i localhost:$PORT/api/sessions"
fi
./caddy run --config Caddyfile.example --adapter caddyfile
