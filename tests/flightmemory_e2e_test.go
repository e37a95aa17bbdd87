package tests

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// The load of issue #9's measurement: many clients, each reading slowly
// from a URL of its own whose response fits max_body. Without a bound on
// what flights buffer together, every leader holds its whole body while its
// client reads (Caddy grew by 462 MB under this test's load, 60 MB with a
// plain reverse_proxy); with max_flight_memory 32MiB it must grow by under
// 120 MB, and every client still receives its whole body.
const (
	slowReaders     = 600
	slowBodySize    = 900 << 10
	slowReadChunk   = 16 << 10
	slowReadPause   = 100 * time.Millisecond
	slowReadersGrow = 120 << 20 // bytes of RSS growth allowed
)

func TestFlightMemoryBoundsCaddyUnderSlowReaders(t *testing.T) {
	if testing.Short() {
		t.Skip("end-to-end test builds Caddy with xcaddy; skipped with -short")
	}
	dir := t.TempDir()
	bin := buildCaddy(t, dir, false)

	body := strings.Repeat("x", slowBodySize)
	up := newUpstream(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = io.WriteString(w, body)
	})
	base, pid := runBuiltCaddy(t, bin, dir, fmt.Sprintf(`coalesce {
		max_flight_memory 32MiB
	}
	reverse_proxy %s`, up.addr))

	client := slowReaderClient(t)
	for i := range 20 { // warm up: the first requests' allocations are not the load's
		if f := get(client, "GET", fmt.Sprintf("%s/warm-%d", base, i)); f.err != nil || len(f.body) != slowBodySize {
			t.Fatalf("warm-up %d: %d bytes, %v", i, len(f.body), f.err)
		}
	}
	baseline := rss(t, pid)

	var peak atomic.Int64
	peak.Store(baseline)
	sampling, stopSampling := context.WithCancel(context.Background())
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		for sampling.Err() == nil {
			if v := rssOf(pid); v > peak.Load() {
				peak.Store(v)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	var wg sync.WaitGroup
	errs := make([]error, slowReaders)
	for i := range slowReaders {
		wg.Go(func() { errs[i] = readSlowly(ctx, client, fmt.Sprintf("%s/slow-%d", base, i)) })
	}
	wg.Wait()
	took := time.Since(start)
	stopSampling()
	<-sampled

	failed := 0
	for i, err := range errs {
		if err != nil {
			if failed < 5 {
				t.Errorf("client %d: %v", i, err)
			}
			failed++
		}
	}
	grew := peak.Load() - baseline
	t.Logf("%d clients reading %d KiB each slowly (%d KiB every %s): all done in %s; Caddy's RSS %d MB before, peak %d MB, grew %d MB (bound %d MB); %d failed",
		slowReaders, slowBodySize>>10, slowReadChunk>>10, slowReadPause, took.Round(time.Millisecond),
		baseline>>20, peak.Load()>>20, grew>>20, slowReadersGrow>>20, failed)
	if grew >= slowReadersGrow {
		t.Errorf("Caddy grew by %d MB under the load, want well under %d MB", grew>>20, slowReadersGrow>>20)
	}
}

// readSlowly reads url's body in slowReadChunk pieces with slowReadPause
// between them, and checks that all of it arrived.
func readSlowly(ctx context.Context, client *http.Client, url string) error {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d (%s)", resp.StatusCode, resp.Header.Get("Cache-Status"))
	}
	buf := make([]byte, slowReadChunk)
	n := 0
	for {
		m, err := io.ReadFull(resp.Body, buf)
		n += m
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("after %d bytes: %w", n, err)
		}
		time.Sleep(slowReadPause)
	}
	if n != slowBodySize {
		return fmt.Errorf("%d bytes, want %d", n, slowBodySize)
	}
	return nil
}

// slowReaderClient opens a connection per request with a small receive
// buffer and an Ethernet-sized segment (MSS 1460), so that a client that
// reads slowly holds the server back as a slow client across a network
// does. Over loopback's 64 KiB segments the server's send buffer starts
// large enough to take a whole 900 KiB body at once, and no reader is slow.
func slowReaderClient(t *testing.T) *http.Client {
	dialer := &net.Dialer{Timeout: 10 * time.Second, Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = errors.Join(
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, slowReadChunk),
				syscall.SetsockoptInt(int(fd), syscall.IPPROTO_TCP, syscall.TCP_MAXSEG, 1460))
		})
		return errors.Join(err, serr)
	}}
	tr := &http.Transport{DialContext: dialer.DialContext, DisableKeepAlives: true, DisableCompression: true}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr}
}

// runBuiltCaddy runs bin with a site on a free port whose routes are
// routes, and returns the site's base URL and the process id. The process
// is killed when the test ends.
func runBuiltCaddy(t *testing.T, bin, dir, routes string) (string, int) {
	t.Helper()
	adminPort, port := freePort(t), freePort(t)
	c := startBuiltCaddy(t, bin, dir, siteCaddyfile(adminPort, port, routes), adminPort, port)
	return fmt.Sprintf("http://127.0.0.1:%d", port), c.cmd.Process.Pid
}

// rss is the resident memory of process pid in bytes.
func rss(t *testing.T, pid int) int64 {
	t.Helper()
	v := rssOf(pid)
	if v <= 0 {
		t.Fatalf("cannot read the resident memory of pid %d from /proc", pid)
	}
	return v
}

func rssOf(pid int) int64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				return 0
			}
			return kb << 10
		}
	}
	return 0
}
