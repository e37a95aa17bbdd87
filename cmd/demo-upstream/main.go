// Command demo-upstream is a tiny API server to put behind Caddy with the
// coalesce handler (see demo.sh and Caddyfile.example). It counts the requests
// that reach it, so the effect of collapsing and micro-caching can be seen.
//
//	go run ./cmd/demo-upstream [-listen 127.0.0.1:9000] [-delay 100ms]
//
// The listen address defaults to $DEMO_UPSTREAM_LISTEN, else 127.0.0.1:9000.
//
// Endpoints:
//
//	GET  /api/sessions  a ~1 KiB JSON list of sessions, answered after the delay
//	                    (?delay=250ms overrides it); plain cacheable headers, an
//	                    ETag, and 304 Not Modified for a matching If-None-Match
//	GET  /api/me        the caller's Authorization and Cookie as JSON, after the
//	                    delay (to watch two users' bursts stay apart)
//	GET  /api/events    Server-Sent Events: 5 events, one every 500ms, each flushed
//	GET  /api/sessions/stream
//	                    Server-Sent Events without end: one event a second (see
//	                    handleSessionStream), honouring Last-Event-ID
//	GET  /stats         {"requests": {"<path>": count, ...}, "total": N,
//	                     "streams": {"open": n, "opened": m}}
//	POST /stats/reset   zeroes the counters (204); open streams stay open and counted
//
// Every /api/ response carries X-Upstream-Count: N, the number of requests
// that endpoint has served so far, this one included; /stats is not counted.
// Each request is logged to stderr as: method, path, count ("-" if not counted);
// GET /api/sessions and /stats are not logged (the demo page polls them many
// times a second), and an event stream is logged when it opens and when it closes.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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

// counted maps the routes whose requests are counted to their name in /stats.
var counted = map[string]string{
	"GET /api/sessions": "/api/sessions",
	"GET /api/me":       "/api/me",
	"GET /api/events":   "/api/events",

	"GET /api/sessions/stream": "/api/sessions/stream",
}

type server struct {
	mux          *http.ServeMux
	delay        time.Duration
	sessions     []byte // the /api/sessions body: fixed, so its ETag is stable
	sessionsETag string

	mu       sync.Mutex
	requests map[string]int64

	streamsOpen   atomic.Int64 // /api/sessions/stream connections open now
	streamsOpened atomic.Int64 // since the start or the last reset
}

func main() {
	listen := "127.0.0.1:9000"
	if v := os.Getenv("DEMO_UPSTREAM_LISTEN"); v != "" {
		listen = v
	}
	flag.StringVar(&listen, "listen", listen, "address to listen on ($DEMO_UPSTREAM_LISTEN)")
	delay := flag.Duration("delay", 100*time.Millisecond, "how long /api/sessions and /api/me take to answer")
	flag.Parse()
	log.SetFlags(log.Ltime | log.Lmicroseconds)

	// Event streams never end on their own: shutting down cancels the base
	// context of every request, so that they end and Shutdown does not wait.
	base, cancelBase := context.WithCancel(context.Background())
	srv := &http.Server{
		Addr:              listen,
		Handler:           newServer(*delay),
		ReadHeaderTimeout: 5 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return base },
	}
	srv.RegisterOnShutdown(cancelBase)
	go func() {
		if err := srv.ListenAndServe(); !errors.Is(err, http.ErrServerClosed) {
			log.Fatal(err)
		}
	}()
	log.Printf("demo-upstream on http://%s (delay %s)", listen, *delay)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	<-ctx.Done()
	stop() // a second signal kills at once
	log.Print("shutting down")
	// In-flight requests (an event stream lasts 2.5s) get a few seconds to finish.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		srv.Close()
	}
}

func newServer(delay time.Duration) *server {
	s := &server{mux: http.NewServeMux(), delay: delay, requests: map[string]int64{}}
	s.resetStats()

	type session struct {
		ID        string `json:"id"`
		User      string `json:"user"`
		Device    string `json:"device"`
		StartedAt string `json:"started_at"`
	}
	devices := []string{"Firefox on Linux", "Safari on iPhone", "Chrome on Windows", "Edge on macOS"}
	var list []session
	for i := 1; i <= 9; i++ {
		started := time.Date(2025, 1, i, 9, 30, 0, 0, time.UTC).Format(time.RFC3339)
		list = append(list, session{fmt.Sprintf("sess-%04d", i), fmt.Sprintf("user%d@example.com", i), devices[i%4], started})
	}
	s.sessions, _ = json.Marshal(map[string]any{"sessions": list, "count": len(list)})
	sum := sha256.Sum256(s.sessions)
	s.sessionsETag = `"` + hex.EncodeToString(sum[:8]) + `"`

	s.mux.HandleFunc("GET /api/sessions", s.handleSessions)
	s.mux.HandleFunc("GET /api/me", s.handleMe)
	s.mux.HandleFunc("GET /api/events", s.handleEvents)
	s.mux.HandleFunc("GET /api/sessions/stream", s.handleSessionStream)
	s.mux.HandleFunc("GET /stats", s.handleStats)
	s.mux.HandleFunc("POST /stats/reset", func(w http.ResponseWriter, r *http.Request) {
		s.resetStats()
		w.WriteHeader(http.StatusNoContent)
	})
	return s
}

// ServeHTTP counts and logs the request, then routes it.
func (s *server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	count := "-"
	if _, route := s.mux.Handler(r); counted[route] != "" {
		s.mu.Lock()
		s.requests[counted[route]]++
		count = strconv.FormatInt(s.requests[counted[route]], 10)
		s.mu.Unlock()
		w.Header().Set("X-Upstream-Count", count)
		if route == "GET /api/sessions" {
			s.mux.ServeHTTP(w, r)
			return
		}
	}
	if r.URL.Path != "/stats" {
		log.Printf("%s %s %s", r.Method, r.URL.RequestURI(), count)
	}
	s.mux.ServeHTTP(w, r)
}

func (s *server) handleSessions(w http.ResponseWriter, r *http.Request) {
	if !s.wait(w, r) {
		return
	}
	w.Header().Set("ETag", s.sessionsETag)
	if etagMatches(r.Header.Get("If-None-Match"), s.sessionsETag) {
		w.WriteHeader(http.StatusNotModified)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Write(s.sessions)
}

func (s *server) handleMe(w http.ResponseWriter, r *http.Request) {
	if !s.wait(w, r) {
		return
	}
	auth, cookie := r.Header.Get("Authorization"), r.Header.Get("Cookie")
	writeJSON(w, map[string]any{"authorization": auth, "cookie": cookie, "anonymous": auth == "" && cookie == ""})
}

func (s *server) handleEvents(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	rc := http.NewResponseController(w)
	for i := 1; i <= 5; i++ {
		if i > 1 {
			select {
			case <-time.After(500 * time.Millisecond):
			case <-r.Context().Done():
				return
			}
		}
		fmt.Fprintf(w, "id: %d\nevent: tick\ndata: {\"n\":%d,\"time\":%q}\n\n", i, i, time.Now().UTC().Format(time.RFC3339Nano))
		if rc.Flush() != nil {
			return
		}
	}
}

// streamHistory is how far back (in events, one a second) a Last-Event-ID is
// honoured; an older id resumes this many events back.
const streamHistory = 300

// handleSessionStream is an event stream of the sessions' activity that never
// ends: one event a second, on the second. An event's id is the Unix time of
// its second and its data is a function of the id alone, so every connection
// (and every instance, and this one after a restart) sends the same event
// under the same id, and a Last-Event-ID is answered from that rule instead
// of a stored history. A connection starts with the current second's event,
// or, with Last-Event-ID, with the events after that id (at most
// streamHistory of them, none if the id is not a number of this kind).
func (s *server) handleSessionStream(w http.ResponseWriter, r *http.Request) {
	open := s.streamsOpen.Add(1)
	s.streamsOpened.Add(1)
	start := time.Now()
	log.Printf("stream opened (Last-Event-ID %q): %d open", r.Header.Get("Last-Event-ID"), open)
	defer func() {
		log.Printf("stream closed after %s: %d open", time.Since(start).Round(time.Millisecond), s.streamsOpen.Add(-1))
	}()

	now := time.Now().Unix()
	next := now
	if v := r.Header.Get("Last-Event-ID"); v != "" {
		if id, err := strconv.ParseInt(v, 10, 64); err == nil && id > now-10*365*86400 {
			next = max(id+1, now-streamHistory+1)
		}
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	fmt.Fprint(w, "retry: 1000\n\n")
	for {
		for ; next <= time.Now().Unix(); next++ {
			fmt.Fprintf(w, "id: %d\ndata: %s\n\n", next, sessionEvent(next))
		}
		if rc.Flush() != nil {
			return
		}
		t := time.NewTimer(time.Until(time.Unix(next, 0)))
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
			return
		}
	}
}

// sessionEvent is the data of the event with this id: the same for the same
// id, wherever and whenever it is sent.
func sessionEvent(id int64) []byte {
	b, _ := json.Marshal(map[string]any{
		"seq":    id,
		"time":   time.Unix(id, 0).UTC().Format(time.RFC3339),
		"active": 5 + id%5,
		"latest": fmt.Sprintf("sess-%04d", 1+id%9),
	})
	return b
}

func (s *server) handleStats(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	requests, total := make(map[string]int64, len(s.requests)), int64(0)
	for path, n := range s.requests {
		requests[path], total = n, total+n
	}
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, map[string]any{
		"requests": requests,
		"total":    total,
		"streams":  map[string]int64{"open": s.streamsOpen.Load(), "opened": s.streamsOpened.Load()},
	})
}

func (s *server) resetStats() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, path := range counted {
		s.requests[path] = 0
	}
	s.streamsOpened.Store(0)
}

// wait sleeps for the delay (or the request's ?delay=) and reports false if the
// request is over: a bad ?delay= was answered with 400, or the client went away.
func (s *server) wait(w http.ResponseWriter, r *http.Request) bool {
	d := s.delay
	if v := r.URL.Query().Get("delay"); v != "" {
		var err error
		if d, err = time.ParseDuration(v); err != nil || d < 0 || d > time.Minute {
			http.Error(w, "delay must be a duration from 0 to 1m, e.g. 250ms", http.StatusBadRequest)
			return false
		}
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-r.Context().Done():
		return false
	}
}

// etagMatches is If-None-Match's weak comparison (RFC 9110 §13.1.2).
func etagMatches(header, etag string) bool {
	for _, candidate := range strings.Split(header, ",") {
		candidate = strings.TrimPrefix(strings.TrimSpace(candidate), "W/")
		if candidate == "*" || candidate == etag {
			return true
		}
	}
	return false
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}
