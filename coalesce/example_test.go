package coalesce_test

import (
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// Wrapping an http.Handler: ten hooks of one page ask for the same slow
// endpoint at once; the API is called once, and a request just after is
// answered from the micro-cache.
func ExampleEngine_Handler() {
	var calls atomic.Int64
	api := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		time.Sleep(100 * time.Millisecond) // a slow endpoint
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"sessions":3}`)
	})

	// Zero fields take the defaults of a bare `coalesce`.
	engine, err := coalesce.New(coalesce.Config{TTL: time.Second})
	if err != nil {
		log.Fatal(err)
	}
	defer engine.Close()
	srv := httptest.NewServer(engine.Handler(api))
	defer srv.Close()

	get := func() (string, string) {
		resp, err := http.Get(srv.URL + "/api/sessions")
		if err != nil {
			log.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body), resp.Header.Get("Cache-Status")
	}

	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() { get() })
	}
	wg.Wait()
	fmt.Println("upstream calls:", calls.Load())

	body, cacheStatus := get()
	fmt.Println(body)
	fmt.Println(strings.HasPrefix(cacheStatus, "caddy-coalesce; hit"))
	fmt.Println("upstream calls:", calls.Load())
	// Output:
	// upstream calls: 1
	// {"sessions":3}
	// true
	// upstream calls: 1
}
