package caddymodule

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/edge-coalesce/caddy-coalesce/internal/redistest"
)

func TestCaddyfileShared(t *testing.T) {
	h := new(Handler)
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`coalesce {
		zone api
		shared rediss://app:s3cret@10.0.0.5:6380/2 {
			prefix fleet-a:
			timeout 20ms
		}
	}`))
	if err != nil {
		t.Fatal(err)
	}
	want := SharedOptions{URL: "rediss://app:s3cret@10.0.0.5:6380/2", Prefix: "fleet-a:", Timeout: caddy.Duration(20 * time.Millisecond)}
	if h.Shared == nil || *h.Shared != want {
		t.Fatalf("shared %+v, want %+v", h.Shared, want)
	}
}

func TestCaddyfileSharedErrorsSayTheLineAndHidePasswords(t *testing.T) {
	for _, c := range []struct{ name, block, line, says string }{
		{"no url", "shared", "Testfile:2", "needs the Redis URL"},
		{"not redis", "shared http://u:hunter2@h:1", "Testfile:2", "not a Redis URL"},
		{"bad db", "shared redis://h:1/x", "Testfile:2", "redis://h:1/x"},
		{"two urls", "shared redis://h:1 redis://h:2", "Testfile:2", "one Redis URL"},
		{"unknown option", "shared redis://h:1 {\n\t\tpool 5\n\t}", "Testfile:3", "unrecognized shared option"},
		{"zero timeout", "shared redis://h:1 {\n\t\ttimeout 0\n\t}", "Testfile:3", "positive duration"},
		{"huge timeout", "shared redis://h:1 {\n\t\ttimeout 1m\n\t}", "Testfile:3", "from 1ms to 10s"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser("coalesce {\n\t" + c.block + "\n}"))
			if err == nil || !strings.Contains(err.Error(), c.line) || !strings.Contains(err.Error(), c.says) {
				t.Fatalf("error %v, want %q at %s", err, c.says, c.line)
			}
			if strings.Contains(err.Error(), "hunter2") {
				t.Fatalf("the error shows the password: %v", err)
			}
		})
	}
}

// caddy validate provisions and cleans up: with Redis down or up, the
// handler's tier leaves nothing behind (goleak checks the goroutines).
func TestSharedHandlerCleansUpItsTier(t *testing.T) {
	redis := redistest.Start(t)
	for _, url := range []string{redis.URL(), "redis://127.0.0.1:1"} {
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		h := &Handler{Zone: "fleet-test", Shared: &SharedOptions{URL: url}}
		if err := h.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		st := h.engine.Stats().Shared
		if st == nil {
			t.Fatal("no shared tier in the stats")
		}
		if err := h.Cleanup(); err != nil {
			t.Fatal(err)
		}
		cancel()
	}
}
