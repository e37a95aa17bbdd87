#!/usr/bin/env bash
# Builds a Caddy binary that includes this module (caddy-coalesce).
#
#   ./xcaddy.sh [OUTPUT]      default OUTPUT: ./caddy next to this script;
#                             a relative OUTPUT is taken from the caller's directory
#
# Environment:
#   XCADDY_EXTRA   more xcaddy arguments, e.g. "--with github.com/foo/bar@v1.2.3"
#
# The module is passed as a replacement with a made-up version (@v0.0.0=.): the
# Go module proxy does not know this module path, and a bare local path makes
# `go get` fail on the proxy's 403 (see CADDY-NOTES.md). CADDY_VERSION is pinned
# (keep it equal to caddy's version in go.mod); unset, xcaddy builds "latest".
set -euo pipefail

caller_dir=$PWD
cd "$(dirname "${BASH_SOURCE[0]}")"

if [[ -n ${1:-} ]]; then
	output=$1
	[[ $output == /* ]] || output="$caller_dir/$output"
else
	output="$PWD/caddy"
fi

if ! command -v xcaddy >/dev/null 2>&1; then
	gobin="$(go env GOPATH | cut -d: -f1)/bin"
	export PATH="$gobin:$PATH"
	if ! command -v xcaddy >/dev/null 2>&1; then
		echo "xcaddy.sh: installing xcaddy v0.4.5 into $gobin"
		GOBIN="$gobin" go install github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5
	fi
fi

read -r -a extra <<<"${XCADDY_EXTRA:-}"

mkdir -p "$(dirname "$output")"
echo "xcaddy.sh: building $output (Caddy v2.11.9 + caddy-coalesce from $PWD)"
CADDY_VERSION=v2.11.9 xcaddy build \
	--with github.com/edge-coalesce/caddy-coalesce@v0.0.0=. \
	${extra[@]+"${extra[@]}"} \
	--output "$output"

echo "xcaddy.sh: built $output"
if modules=$("$output" list-modules | grep coalesce); then
	echo "$modules"
else
	echo "xcaddy.sh: warning: no coalesce modules in $output" >&2
fi
