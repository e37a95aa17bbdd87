package tests

import (
	"fmt"
	"net/http"
	"os"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/goleak"
)

// TestMain runs the suite, stops the in-process Caddy's config, and then
// fails if any goroutine is left: a background refresh, a stream copy or a
// flight's context watch that outlived every request would show here.
// caddytest runs `caddy run` in a goroutine that never returns, with its
// signal traps and admin listener; those belong to the process, not to a
// test. So do the rotation goroutine of Caddy's file log writer, which the
// access-log test starts and Caddy never stops, and certmagic's storage-lock
// refresher, which polls every 5 s and may not have seen its lock go yet.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := caddy.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stopping Caddy: %v\n", err)
			code = 1
		}
		http.DefaultTransport.(*http.Transport).CloseIdleConnections()
		if err := settledLeaks(10 * time.Second); err != nil {
			fmt.Fprintf(os.Stderr, "goroutines outlived the tests: %v\n", err)
			code = 1
		}
	}
	os.Exit(code)
}

// settledLeaks is goleak.Find, tried again until within is over: after Stop,
// connections and the servers' goroutines end on their own schedule, and on a
// loaded machine that can take longer than goleak's own retries (under 1 s).
func settledLeaks(within time.Duration) error {
	deadline := time.Now().Add(within)
	for {
		err := goleak.Find(
			goleak.IgnoreTopFunction("github.com/caddyserver/caddy/v2/cmd.cmdRun"),
			goleak.IgnoreTopFunction("github.com/caddyserver/caddy/v2.trapSignalsCrossPlatform.func1"),
			goleak.IgnoreTopFunction("github.com/caddyserver/caddy/v2.trapSignalsPosix.func1"),
			goleak.IgnoreAnyFunction("github.com/caddyserver/caddy/v2.replaceLocalAdminServer.func2"),
			goleak.IgnoreTopFunction("github.com/DeRuina/timberjack.(*Logger).millRun"),
			goleak.IgnoreAnyFunction("github.com/caddyserver/certmagic.keepLockfileFresh"),
		)
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(250 * time.Millisecond)
	}
}
