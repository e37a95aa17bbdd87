// Package caddycoalesce is what xcaddy builds in: importing it registers the
// coalesce handler, its Caddyfile directive, the breaker selection policy and
// the admin API with Caddy.
//
//	xcaddy build --with github.com/edge-coalesce/caddy-coalesce
package caddycoalesce

import (
	// The modules register themselves in their init functions.
	_ "github.com/edge-coalesce/caddy-coalesce/caddymodule"
)
