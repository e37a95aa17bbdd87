package caddymodule

import (
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// engines holds the registry and micro-cache of every handler, keyed by zone
// and settings, so that a config reload that keeps a handler keeps its state
// and requests of the old config finish against the same registry.
var engines = caddy.NewUsagePool()

// bypassAll is the process-wide kill switch: while it is on, every coalesce
// handler passes requests straight through.
var bypassAll atomic.Bool

type pooledEngine struct{ *coalesce.Engine }

// Destruct runs when the last config holding the engine is gone.
func (p pooledEngine) Destruct() error {
	p.Close()
	return nil
}

// Interface guards
var _ caddy.Destructor = pooledEngine{}
