// Command upstream is the benchmark's origin server: it answers any path with
// about 1 KiB of JSON after a fixed latency, and counts the requests it serves,
// per key (path and query), so the harness can tell how many requests each
// proxy let through. Standard library only.
//
//	upstream [-listen 127.0.0.1:19080] [-latency 20ms] [-size 1024]
//	upstream -print-body /some/path      print the body it would serve and exit
//
// Endpoints (the two stats endpoints are never counted):
//
//	GET  /__stats[?prefix=P][&keys=1]  {"total", "distinct", "max_per_key",
//	                                    "max_inflight", "prefix", ...};
//	                                    with prefix: only keys starting with P;
//	                                    with keys=1: also "keys": {key: count}
//	                                    (at most 20 000 keys listed)
//	POST /__reset                       zero every counter (204)
//	GET  anything else                  200, application/json, -size bytes,
//	                                    after -latency (?delay=<duration>
//	                                    overrides it for that request)
//
// Responses carry no Cache-Control, no validators and no Set-Cookie: every proxy
// under test decides its TTL from its own configuration.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type counters struct {
	mu       sync.Mutex
	perKey   map[string]int64
	total    int64
	inflight atomic.Int64
	maxInfl  atomic.Int64
	seq      atomic.Int64
}

func newCounters() *counters { return &counters{perKey: make(map[string]int64)} }

func (c *counters) hit(key string) {
	c.mu.Lock()
	c.perKey[key]++
	c.total++
	c.mu.Unlock()
}

func (c *counters) reset() {
	c.mu.Lock()
	c.perKey = make(map[string]int64)
	c.total = 0
	c.mu.Unlock()
	c.maxInfl.Store(c.inflight.Load())
}

type stats struct {
	Total       int64            `json:"total"`
	Distinct    int              `json:"distinct"`
	MaxPerKey   int64            `json:"max_per_key"`
	MaxInflight int64            `json:"max_inflight"`
	Prefix      string           `json:"prefix,omitempty"`
	Keys        map[string]int64 `json:"keys,omitempty"`
	KeysCapped  bool             `json:"keys_capped,omitempty"`
}

const maxListedKeys = 20000

func (c *counters) snapshot(prefix string, withKeys bool) stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := stats{Prefix: prefix, MaxInflight: c.maxInfl.Load()}
	if withKeys {
		s.Keys = make(map[string]int64)
	}
	for k, n := range c.perKey {
		if prefix != "" && !strings.HasPrefix(k, prefix) {
			continue
		}
		s.Total += n
		s.Distinct++
		if n > s.MaxPerKey {
			s.MaxPerKey = n
		}
		if withKeys {
			if len(s.Keys) < maxListedKeys {
				s.Keys[k] = n
			} else {
				s.KeysCapped = true
			}
		}
	}
	return s
}

// bodyMaker builds the JSON document served for a key: it names the key and the
// upstream's sequence number of the request (so that a client can tell a shared
// response from an individual one) and is padded to exactly size bytes (unless
// the key alone is longer). The list of items is built once.
type bodyMaker struct {
	size  int
	items string
}

func newBodyMaker(size int) *bodyMaker {
	var b strings.Builder
	// leave room for the head (key, seq) and the padding field
	for i := 0; b.Len() < size-220; i++ {
		if i > 0 {
			b.WriteByte(',')
		}
		fmt.Fprintf(&b, `{"id":%d,"state":"active","user":"u%04d"}`, i, i*7%10000)
	}
	return &bodyMaker{size: size, items: b.String()}
}

func (m *bodyMaker) body(key string, seq int64) []byte {
	out := make([]byte, 0, m.size+len(key))
	out = append(out, `{"path":`...)
	out = strconv.AppendQuote(out, key)
	out = append(out, `,"seq":`...)
	out = strconv.AppendInt(out, seq, 10)
	out = append(out, `,"items":[`...)
	out = append(out, m.items...)
	out = append(out, `],"pad":"`...)
	for n := m.size - len(out) - 2; n > 0; n-- {
		out = append(out, 'x')
	}
	return append(out, `"}`...)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:19080", "listen address (keep it on 127.0.0.1)")
	latency := flag.Duration("latency", 20*time.Millisecond, "time before each response")
	size := flag.Int("size", 1024, "response body size in bytes")
	printBody := flag.String("print-body", "", "print the body served for this path and exit")
	flag.Parse()

	bm := newBodyMaker(*size)
	if *printBody != "" {
		os.Stdout.Write(bm.body(*printBody, 0))
		return
	}

	c := newCounters()
	mux := http.NewServeMux()
	mux.HandleFunc("/__stats", func(w http.ResponseWriter, r *http.Request) {
		s := c.snapshot(r.URL.Query().Get("prefix"), r.URL.Query().Get("keys") == "1")
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		json.NewEncoder(w).Encode(s)
	})
	mux.HandleFunc("/__reset", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost {
			http.Error(w, "POST only", http.StatusMethodNotAllowed)
			return
		}
		c.reset()
		w.WriteHeader(http.StatusNoContent)
	})
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		key := r.URL.RequestURI()
		c.hit(key)
		n := c.inflight.Add(1)
		for {
			m := c.maxInfl.Load()
			if n <= m || c.maxInfl.CompareAndSwap(m, n) {
				break
			}
		}
		defer c.inflight.Add(-1)
		seq := c.seq.Add(1)

		d := *latency
		if v := r.URL.Query().Get("delay"); v != "" {
			if pd, err := time.ParseDuration(v); err == nil && pd >= 0 {
				d = pd
			}
		}
		if d > 0 {
			t := time.NewTimer(d)
			select {
			case <-t.C:
			case <-r.Context().Done():
				t.Stop()
				return
			}
		}
		b := bm.body(key, seq)
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(http.StatusOK)
		if r.Method != http.MethodHead {
			w.Write(b)
		}
	})

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: mux, IdleTimeout: 120 * time.Second, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	log.Printf("upstream: listening on %s, latency %s, body %d bytes", ln.Addr(), *latency, *size)
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Fatal(err)
	}
}
