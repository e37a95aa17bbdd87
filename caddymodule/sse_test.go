package caddymodule

import (
	"testing"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// `sse` alone is `{}` in JSON (every default); a 0 that means "none" is -1.
func TestCaddyfileSSEBlock(t *testing.T) {
	checkAdapts(t, map[string]string{
		"coalesce {\n sse\n}":      `{"sse":{}}`,
		"coalesce {\n sse {\n}\n}": `{"sse":{}}`,
		"coalesce {\n sse {\n replay 0\n linger 0\n heartbeat 0\n}\n}":                                      `{"sse":{"replay":-1,"linger":-1,"heartbeat":-1}}`,
		"coalesce {\n sse {\n replay 16\n buffer 8\n linger 500ms\n heartbeat 1s\n max_subscribers 5\n}\n}": `{"sse":{"replay":16,"buffer":8,"linger":500000000,"heartbeat":1000000000,"max_subscribers":5}}`,
	})
}

func TestSSEOptionsDefaults(t *testing.T) {
	var h Handler
	if h.config().SSE != nil {
		t.Fatal("without sse, event streams must pass through (SSE nil)")
	}
	h.SSE = &SSEOptions{}
	got := *h.config().WithDefaults().SSE
	want := coalesce.SSEConfig{Replay: 256, Buffer: 64, Linger: 2 * time.Second, Heartbeat: 15 * time.Second, MaxSubscribers: 10000}
	if got != want {
		t.Errorf("defaults %+v, want %+v", got, want)
	}
}
