package tests

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// End to end: the Caddy binary that ./xcaddy.sh builds, run as a user runs
// it, on ports of its own (never the in-process Caddy's 2999/9080).

// syncBuffer collects a process's output from several goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// buildCaddy builds the binary with ../xcaddy.sh into dir; with race, with
// the race detector (xcaddy's XCADDY_RACE_DETECTOR, which needs cgo).
func buildCaddy(t *testing.T, dir string, race bool) string {
	t.Helper()
	bin := filepath.Join(dir, "caddy")
	bound := 8 * time.Minute
	if race {
		bound = 20 * time.Minute
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", "../xcaddy.sh", bin)
	if race {
		cmd.Env = append(os.Environ(), "XCADDY_RACE_DETECTOR=1", "CGO_ENABLED=1")
	}
	start := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("../xcaddy.sh %s failed after %s: %v\n%s", bin, time.Since(start).Round(time.Second), err, out)
	}
	t.Logf("built %s in %s", bin, time.Since(start).Round(time.Second))
	return bin
}

// caddyEnv keeps the binary's data, config autosave and home inside dir.
func caddyEnv(dir string) []string {
	return append(os.Environ(), "HOME="+dir, "XDG_DATA_HOME="+dir+"/data", "XDG_CONFIG_HOME="+dir+"/config")
}

// builtCaddy is a `caddy run` process of the test.
type builtCaddy struct {
	cmd       *exec.Cmd
	output    *syncBuffer
	exited    chan struct{}
	waitErr   error
	adminPort int
}

// startBuiltCaddy runs bin with caddyfile and waits until its admin API and
// /healthz (which the site must answer with "ok") respond. The process is
// killed when the test ends, and its output logged if the test failed.
func startBuiltCaddy(t *testing.T, bin, dir, caddyfile string, adminPort, port int) *builtCaddy {
	t.Helper()
	cfgPath := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(cfgPath, []byte(caddyfile), 0o644); err != nil {
		t.Fatal(err)
	}
	c := &builtCaddy{output: new(syncBuffer), exited: make(chan struct{}), adminPort: adminPort}
	c.cmd = exec.Command(bin, "run", "--config", cfgPath, "--adapter", "caddyfile")
	c.cmd.Env = caddyEnv(dir)
	c.cmd.Stdout, c.cmd.Stderr = c.output, c.output
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { c.waitErr = c.cmd.Wait(); close(c.exited) }()
	t.Cleanup(func() {
		_ = c.cmd.Process.Kill()
		select {
		case <-c.exited:
		case <-time.After(10 * time.Second):
			t.Errorf("caddy (pid %d) did not exit after SIGKILL", c.cmd.Process.Pid)
		}
		if t.Failed() {
			t.Logf("caddy output (last 64 KiB):\n%s", tail(c.output.String(), 64<<10))
		}
	})

	client := &http.Client{Timeout: 5 * time.Second}
	defer client.CloseIdleConnections()
	ready := func() bool {
		select {
		case <-c.exited:
			t.Fatalf("caddy exited before it was ready: %v\n%s", c.waitErr, c.output.String())
		default:
		}
		a := get(client, "GET", fmt.Sprintf("http://127.0.0.1:%d/config/", adminPort))
		s := get(client, "GET", fmt.Sprintf("http://127.0.0.1:%d/healthz", port))
		return a.err == nil && a.status == 200 && s.err == nil && s.body == "ok"
	}
	if !waitFor(60*time.Second, ready) {
		t.Fatalf("caddy not ready after 60s\n%s", c.output.String())
	}
	return c
}

// siteCaddyfile is the Caddyfile of a built Caddy's test: its admin API
// and one HTTP site on the given ports of 127.0.0.1, the site answering
// /healthz with "ok" (startBuiltCaddy waits for it) and site otherwise.
func siteCaddyfile(adminPort, port int, site string) string {
	return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	default_bind 127.0.0.1
	http_port %d
	auto_https off
	grace_period 1s
}

:%d {
	handle /healthz {
		respond "ok" 200
	}
	%s
}
`, adminPort, port, port, site)
}

func TestBuiltBinaryEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test builds Caddy with xcaddy (about 100 s the first time); skipped with -short")
	}
	dir := t.TempDir()
	bin := buildCaddy(t, dir, false)

	adminPort, port := freePort(t), freePort(t)
	// The herds' upstream requests are answered once the herd waits (50
	// clients on /herd, 10 on /cookie); anything else at once.
	admin := fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	herdGate, cookieGate := newHerdGateAt(t, 50, admin), newHerdGateAt(t, 10, admin)
	var seq atomic.Int64
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasPrefix(r.URL.Path, "/cookie"):
			if !cookieGate.hold(r.Context(), r.URL.Path) {
				return
			}
			n := seq.Add(1)
			w.Header().Set("Set-Cookie", fmt.Sprintf("session=s%d; Path=/", n))
			_, _ = fmt.Fprintf(w, "hello s%d", n)
		case r.URL.Path == "/herd":
			if !herdGate.hold(r.Context(), r.URL.Path) {
				return
			}
			_, _ = fmt.Fprint(w, "answer for "+r.URL.Path)
		default:
			_, _ = fmt.Fprint(w, "answer for "+r.URL.Path)
		}
	})

	startBuiltCaddy(t, bin, dir, siteCaddyfile(adminPort, port, fmt.Sprintf(`coalesce {
		ttl 1s
	}
	reverse_proxy %s`, up.addr)), adminPort, port)
	client := newClient(t)
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	t.Run("a herd of 50 makes one upstream call", func(t *testing.T) {
		for i, f := range herd(client, 50, "GET", base+"/healthz") {
			if f.err != nil {
				t.Fatalf("warm-up %d: %v", i, f.err)
			}
		}
		before := up.PathCalls("/herd")
		got := herd(client, 50, "GET", base+"/herd")
		expectAll(t, got, http.StatusOK, "answer for /herd")
		if n := up.PathCalls("/herd") - before; n != 1 {
			t.Errorf("upstream calls: %d, want 1", n)
		}
		collapsed := 0
		for _, f := range got {
			if strings.Contains(f.cacheStatus(), "collapsed") {
				collapsed++
			}
		}
		if collapsed != 49 {
			t.Errorf("%d clients collapsed, want 49", collapsed)
		}
	})

	t.Run("a GET within the TTL is a hit", func(t *testing.T) {
		first := get(client, "GET", base+"/hit")
		second := get(client, "GET", base+"/hit")
		if first.status != 200 || second.status != 200 || second.body != "answer for /hit" {
			t.Fatalf("got %d %q then %d %q", first.status, first.body, second.status, second.body)
		}
		if cs := second.cacheStatus(); !strings.Contains(cs, "hit") {
			t.Errorf("second GET: Cache-Status %q, want a hit", cs)
		}
		if n := up.PathCalls("/hit"); n != 1 {
			t.Errorf("upstream calls: %d, want 1", n)
		}
	})

	t.Run("Set-Cookie responses are not shared", func(t *testing.T) {
		got := herd(client, 10, "GET", base+"/cookie")
		seen := map[string]bool{}
		for i, f := range got {
			name, _, _ := strings.Cut(f.header.Get("Set-Cookie"), ";")
			if f.status != 200 || name == "" || seen[name] || f.body != "hello "+strings.TrimPrefix(name, "session=") {
				t.Errorf("client %d: %d %q with Set-Cookie %q", i, f.status, f.body, f.header.Get("Set-Cookie"))
			}
			seen[name] = true
		}
		if n := up.PathCalls("/cookie"); n != 10 {
			t.Errorf("upstream calls: %d, want 10", n)
		}
	})

	t.Run("caddy validate names the line of a bad option", func(t *testing.T) {
		badDir := t.TempDir()
		bad := filepath.Join(badDir, "Caddyfile")
		// ttl 5s is on line 6.
		if err := os.WriteFile(bad, []byte("{\n\tadmin off\n}\n:8080 {\n\tcoalesce {\n\t\tttl 5s\n\t}\n\treverse_proxy 127.0.0.1:9\n}\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		vc := exec.Command(bin, "validate", "--config", bad, "--adapter", "caddyfile")
		vc.Env = caddyEnv(dir)
		out, err := vc.CombinedOutput()
		if err == nil {
			t.Fatalf("caddy validate accepted ttl 5s:\n%s", out)
		}
		if !strings.Contains(string(out), "Caddyfile:6") || !strings.Contains(string(out), "at most 1s") {
			t.Errorf("caddy validate output does not name Caddyfile:6 and the 1s limit:\n%s", out)
		}
	})

	t.Run("caddy list-modules lists http.handlers.coalesce", func(t *testing.T) {
		lc := exec.Command(bin, "list-modules")
		lc.Env = caddyEnv(dir)
		out, err := lc.CombinedOutput()
		if err != nil {
			t.Fatalf("list-modules: %v\n%s", err, out)
		}
		found := false
		for _, line := range strings.Split(string(out), "\n") {
			if strings.TrimSpace(line) == "http.handlers.coalesce" {
				found = true
			}
		}
		if !found {
			t.Errorf("http.handlers.coalesce not listed:\n%s", out)
		}
	})
}
