package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type hub struct {
	mu    sync.Mutex
	conns map[chan []byte]struct{}
	open  atomic.Int64
	peak  atomic.Int64
	total atomic.Int64
	made  atomic.Int64
}

func origin(args []string) {
	fs := flag.NewFlagSet("origin", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:19180", "address to listen on")
	rate := fs.Int("rate", 50, "events a second")
	size := fs.Int("size", 64, "padding bytes in each event's data")
	publish := fs.String("publish", "", "POST each event to this URL instead of serving streams")
	_ = fs.Parse(args)

	h := &hub{conns: map[chan []byte]struct{}{}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", h.serve)
	mux.HandleFunc("GET /__stats", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]int64{"open": h.open.Load(), "peak": h.peak.Load(), "total": h.total.Load(), "events": h.made.Load()})
	})
	mux.HandleFunc("POST /__reset", func(w http.ResponseWriter, r *http.Request) {
		h.peak.Store(h.open.Load())
		h.total.Store(0)
		w.WriteHeader(http.StatusNoContent)
	})
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go func() { _ = srv.Serve(ln) }()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	pad := strings.Repeat("x", *size)
	var pub *publisher
	if *publish != "" {
		if pub, err = newPublisher(*publish); err != nil {
			log.Fatal(err)
		}
		defer pub.close()
	}
	tick := time.NewTicker(time.Second / time.Duration(*rate))
	defer tick.Stop()
	for n := int64(1); ; n++ {
		select {
		case <-ctx.Done():
			_ = srv.Close()
			return
		case <-tick.C:
		}
		h.made.Store(n)
		data := fmt.Sprintf("%d %d %s", n, time.Now().UnixNano(), pad)
		if pub != nil {
			if err := pub.send(data); err != nil {
				log.Printf("publish: %v", err)
			}
			continue
		}
		ev := []byte(fmt.Sprintf("id: %d\ndata: %s\n\n", n, data))
		h.mu.Lock()
		for c := range h.conns {
			select {
			case c <- ev:
			default: // a connection this far behind loses events; subscribers count the gaps
			}
		}
		h.mu.Unlock()
	}
}

func (h *hub) serve(w http.ResponseWriter, r *http.Request) {
	c := make(chan []byte, 1024)
	h.mu.Lock()
	h.conns[c] = struct{}{}
	h.mu.Unlock()
	n := h.open.Add(1)
	h.total.Add(1)
	for p := h.peak.Load(); n > p && !h.peak.CompareAndSwap(p, n); p = h.peak.Load() {
	}
	defer func() {
		h.mu.Lock()
		delete(h.conns, c)
		h.mu.Unlock()
		h.open.Add(-1)
	}()
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-cache")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	_ = rc.Flush()
	for {
		select {
		case ev := <-c:
			if _, err := w.Write(ev); err != nil {
				return
			}
			if err := rc.Flush(); err != nil {
				return
			}
		case <-r.Context().Done():
			return
		}
	}
}

func floor(args []string) {
	fs := flag.NewFlagSet("floor", flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:19184", "address to listen on")
	rate := fs.Int("rate", 50, "events a second")
	size := fs.Int("size", 64, "padding bytes in each event's data")
	_ = fs.Parse(args)

	var mu sync.Mutex
	cond := sync.NewCond(&mu)
	var seq int64
	var ev []byte
	go func() {
		pad := strings.Repeat("x", *size)
		tick := time.NewTicker(time.Second / time.Duration(*rate))
		for t := range tick.C {
			mu.Lock()
			seq++
			ev = fmt.Appendf(nil, "id: %d\ndata: %d %d %s\n\n", seq, seq, t.UnixNano(), pad)
			mu.Unlock()
			cond.Broadcast()
		}
	}()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /events", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
		rc := http.NewResponseController(w)
		if rc.Flush() != nil {
			return
		}
		// A client that goes away is noticed at the next write.
		mu.Lock()
		last := seq
		for {
			for seq == last {
				cond.Wait()
			}
			last = seq
			out := ev
			mu.Unlock()
			if _, err := w.Write(out); err != nil {
				return
			}
			if rc.Flush() != nil {
				return
			}
			mu.Lock()
		}
	})
	mux.HandleFunc("GET /__mem", func(w http.ResponseWriter, r *http.Request) {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]uint64{"goroutines": uint64(runtime.NumGoroutine()),
			"heap_inuse": m.HeapInuse, "heap_alloc": m.HeapAlloc, "stack_inuse": m.StackInuse, "sys": m.Sys})
	})
	log.Fatal(http.ListenAndServe(*listen, mux))
}

// publisher POSTs events to a pub/sub server over one connection, pipelined:
// it sends each request when its event is made, without waiting for the
// answer to the one before, so the server's time to answer does not slow
// the events down (a publisher that waits for each answer delivered about
// 35 events a second to 5 000 nchan subscribers instead of 50). One
// connection keeps them in order; the answers are read apart. It connects
// at its first event (the server may start after the origin), and again
// after a failure.
type publisher struct {
	host, path string
	conn       net.Conn
	done       chan struct{} // closed when conn's answers are read to the end
}

func newPublisher(rawURL string) (*publisher, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, err
	}
	return &publisher{host: u.Host, path: u.RequestURI()}, nil
}

func (p *publisher) send(data string) error {
	if p.conn == nil {
		c, err := net.Dial("tcp", p.host)
		if err != nil {
			return err
		}
		p.conn, p.done = c, make(chan struct{})
		go readAnswers(c, p.done)
	}
	_, err := fmt.Fprintf(p.conn, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s",
		p.path, p.host, len(data), data)
	if err != nil {
		p.close()
	}
	return err
}

func readAnswers(c net.Conn, done chan struct{}) {
	defer close(done)
	br := bufio.NewReader(c)
	for {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode >= 300 {
			log.Printf("publish: %s", resp.Status)
		}
	}
}

func (p *publisher) close() {
	if p.conn != nil {
		_ = p.conn.Close()
		<-p.done
		p.conn = nil
	}
}
