package coalesce_test

import (
	"net/http"
	"net/url"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// soakWriter is a client that reads nothing back.
type soakWriter struct {
	h      http.Header
	status int
}

func (w *soakWriter) Header() http.Header         { return w.h }
func (w *soakWriter) Write(p []byte) (int, error) { return len(p), nil }
func (w *soakWriter) WriteHeader(s int)           { w.status = s }

// rssKiB is the process's resident set size (Linux), 0 elsewhere.
func rssKiB() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return n
		}
	}
	return 0
}

func soakHeap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestSoakKeyChurnStaysWithinBounds sends a million distinct keys (or as
// many as 60 s allow: about 1 million without -race, 150 000 with it, on 2
// cores; COALESCE_SOAK_KEYS and COALESCE_SOAK_DURATION change both) through one engine: mostly one request per key, every 50th
// key a herd of four, every 10th response a Set-Cookie (a hit-for-miss
// mark). The cache never holds more than max_entries or max_memory, the
// registry holds nothing once the requests are done, and the heap is flat
// once the cache is full.
func TestSoakKeyChurnStaysWithinBounds(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test: skipped with -short")
	}
	keys, duration := int64(1_000_000), 60*time.Second
	if v := os.Getenv("COALESCE_SOAK_KEYS"); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n <= 0 {
			t.Fatalf("COALESCE_SOAK_KEYS=%q", v)
		}
		keys = n
	}
	if v := os.Getenv("COALESCE_SOAK_DURATION"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("COALESCE_SOAK_DURATION=%q", v)
		}
		duration = d
	}

	cfg := coalesce.DefaultConfig()
	cfg.TTL = 50 * time.Millisecond
	cfg.MaxEntries = 10_000
	cfg.MaxMemory = 4 << 20 // below 10 000 entries of ~700 bytes: both bounds bite
	engine, err := coalesce.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()

	body := []byte(strings.Repeat("x", 400))
	next := func(w http.ResponseWriter, r *http.Request) error {
		n, _ := strconv.Atoi(strings.TrimPrefix(r.URL.Path, "/k/"))
		if n%50 == 0 {
			time.Sleep(time.Millisecond) // a herd's followers join meanwhile
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		if n%10 == 0 {
			w.Header().Set("Set-Cookie", "sid="+strconv.Itoa(n))
		}
		_, _ = w.Write(body)
		return nil
	}
	request := func(n int64) error {
		r := &http.Request{
			Method: http.MethodGet,
			URL:    &url.URL{Path: "/k/" + strconv.FormatInt(n, 10)},
			Host:   "soak.example",
			Header: http.Header{"Authorization": {"Bearer soak"}},
		}
		return engine.Serve(&soakWriter{h: http.Header{}}, r, next)
	}

	var (
		next64   atomic.Int64
		failed   atomic.Int64
		overflow atomic.Int64
		samples  []uint64
		mu       sync.Mutex
	)
	deadline := time.Now().Add(duration)
	checkBounds := func() {
		st := engine.Stats()
		if st.Cache.Entries > int64(cfg.MaxEntries) || st.Cache.Bytes > cfg.MaxMemory || st.Uncollapsible > cfg.MaxEntries {
			if overflow.Add(1) <= 5 {
				t.Errorf("over budget: %d entries, %d bytes, %d hit-for-miss marks", st.Cache.Entries, st.Cache.Bytes, st.Uncollapsible)
			}
		}
	}
	start := time.Now()
	rssStart := rssKiB()
	const workers, sampleEvery = 4, 25_000
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				n := next64.Add(1)
				if n > keys {
					return
				}
				if n%50 == 0 {
					var herd sync.WaitGroup
					for range 4 {
						herd.Add(1)
						go func() {
							defer herd.Done()
							if request(n) != nil {
								failed.Add(1)
							}
						}()
					}
					herd.Wait()
				} else if request(n) != nil {
					failed.Add(1)
				}
				if n%sampleEvery == 0 {
					checkBounds()
					h := soakHeap()
					mu.Lock()
					samples = append(samples, h)
					mu.Unlock()
				} else if n%1000 == 0 {
					checkBounds()
				}
			}
		}()
	}
	wg.Wait()
	took := time.Since(start)
	done := min(next64.Load(), keys)

	st := engine.Stats()
	finalHeap := soakHeap()
	mib := func(b uint64) string { return strconv.FormatFloat(float64(b)/(1<<20), 'f', 1, 64) }
	var trail []string
	for _, s := range samples {
		trail = append(trail, mib(s))
	}
	t.Logf("soak: %d distinct keys in %s (%.0f keys/s), %d failed; registry %d active keys, %d waiters, %d flights, %d collapsed; cache %d entries, %d bytes, %d evictions; %d hit-for-miss marks",
		done, took.Round(time.Millisecond), float64(done)/took.Seconds(), failed.Load(),
		st.Registry.ActiveKeys, st.Registry.Waiters, st.Registry.Flights, st.Registry.Collapsed,
		st.Cache.Entries, st.Cache.Bytes, st.Cache.Evictions, st.Uncollapsible)
	t.Logf("soak: heap after GC every %d keys (MiB): %s; at the end %s MiB; RSS %d MiB at the start, %d MiB at the end",
		sampleEvery, strings.Join(trail, " "), mib(finalHeap), rssStart>>10, rssKiB()>>10)

	if failed.Load() != 0 {
		t.Errorf("%d requests failed", failed.Load())
	}
	if st.Registry.ActiveKeys != 0 || st.Registry.Waiters != 0 {
		t.Errorf("registry after the churn: %d active keys, %d waiters; want 0, 0", st.Registry.ActiveKeys, st.Registry.Waiters)
	}
	checkBounds()
	if churn := int64(5 * cfg.MaxEntries); done < keys && done < churn {
		t.Errorf("only %d keys in %s, fewer than %d (the cache filled five times): too few to say anything", done, duration, churn)
	}
	// Flat: once the cache is full (the first sample), the heap stays
	// within a generous margin of it.
	if len(samples) > 0 {
		if limit := samples[0] + max(samples[0]/2, 8<<20); finalHeap > limit {
			t.Errorf("heap grew from %s MiB (first %d keys) to %s MiB", mib(samples[0]), sampleEvery, mib(finalHeap))
		}
	}
}
