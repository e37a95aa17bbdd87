package caddymodule

import (
	"context"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// headerOnlyWriter is a client connection reduced to its header: what the
// benchmark measures is the handler, not the network.
type headerOnlyWriter struct{ h http.Header }

func (w *headerOnlyWriter) Header() http.Header         { return w.h }
func (w *headerOnlyWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *headerOnlyWriter) WriteHeader(int)             {}

// The module's price on the all-miss path (bench/RESULTS.md, workload d0):
// every request for a key never asked for before, through the handler in
// front of a stand-in for reverse_proxy that answers at once, against the
// stand-in alone. The request is prepared as Caddy's server prepares it
// (replacer, vars, a cancellable context). The difference between the two
// is what a miss costs the module, in time, bytes and allocations.
func BenchmarkHandlerLoneMiss(b *testing.B) {
	body := make([]byte, 1024)
	proxy := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		h := w.Header()
		delete(h, "Server") // as reverse_proxy: Via instead
		h["Via"] = []string{"1.1 Caddy"}
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", strconv.Itoa(len(body)))
		h.Set("Date", "Thu, 03 Dec 2026 22:00:00 GMT")
		w.WriteHeader(http.StatusOK)
		_, err := w.Write(body)
		return err
	})
	run := func(b *testing.B, serve func(w http.ResponseWriter, r *http.Request) error) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			i++
			ctx, cancel := context.WithCancel(context.Background())
			r, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://127.0.0.1/m/"+strconv.Itoa(i)+"?delay=0s", nil)
			if err != nil {
				b.Fatal(err)
			}
			w := &headerOnlyWriter{h: http.Header{"Server": {"Caddy"}}}
			r = caddyhttp.PrepareRequest(r, caddy.NewReplacer(), w, nil)
			if err := serve(w, r); err != nil {
				b.Fatal(err)
			}
			cancel()
		}
	}
	b.Run("reverse_proxy alone", func(b *testing.B) { run(b, proxy.ServeHTTP) })
	b.Run("coalesce", func(b *testing.B) {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		defer cancel()
		h := &Handler{TTL: caddy.Duration(50 * time.Millisecond)}
		if err := h.Provision(ctx); err != nil {
			b.Fatal(err)
		}
		defer func() { _ = h.Cleanup() }()
		h.logger = zap.NewNop() // as at the bench's log level (ERROR)
		run(b, func(w http.ResponseWriter, r *http.Request) error { return h.ServeHTTP(w, r, proxy) })
	})
}
