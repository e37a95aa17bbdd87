package coalesce

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// listOrigin answers GETs with "<path> v<version> for <cookie>" and bumps
// the version on every other method, answering status (with Location when
// given).
func listOrigin(status int, location string) (*origin, *atomic.Int64) {
	var version atomic.Int64
	return newOrigin(func(w http.ResponseWriter, r *http.Request, _ int64) {
		if safeMethod(r.Method) {
			fmt.Fprintf(w, "%s v%d for %s", r.URL.RequestURI(), version.Load(), r.Header.Get("Cookie"))
			return
		}
		version.Add(1)
		if location != "" {
			w.Header().Set("Location", location)
		}
		w.WriteHeader(status)
	}), &version
}

func TestSuccessfulWriteDropsEveryStoredCopyOfItsTargets(t *testing.T) {
	o, _ := listOrigin(http.StatusCreated, "/archive/7")
	e := newEngine(t, func(c *Config) { c.TTL = MaxTTL })
	srv := newServer(t, e.Handler(o))
	reads := [][]string{
		{"/items"}, {"/items", "Cookie", "sid=a"}, {"/items?page=2", "Cookie", "sid=b"},
		{"/items/7"}, {"/archive/7", "Cookie", "sid=a"},
	}
	for _, rd := range reads {
		get(t, srv, rd[0], rd[1:]...)
		if r := get(t, srv, rd[0], rd[1:]...); !strings.Contains(r.cacheStatus(), "hit") {
			t.Fatalf("GET %v: Cache-Status %q, want a hit before the write", rd, r.cacheStatus())
		}
	}
	other := get(t, srv, "/other")
	if r := fetch(t, srv, http.MethodPost, "/items/7"); r.status != http.StatusCreated {
		t.Fatalf("POST: %d", r.status)
	}
	for _, rd := range reads {
		if r := get(t, srv, rd[0], rd[1:]...); !strings.Contains(r.body, " v1 ") {
			t.Errorf("GET %v after the write: %q (Cache-Status %q), want v1 from the upstream", rd, r.body, r.cacheStatus())
		}
	}
	if r := get(t, srv, "/other"); r.body != other.body || !strings.Contains(r.cacheStatus(), "hit") {
		t.Errorf("an unrelated URL: %q, Cache-Status %q; want its stored copy", r.body, r.cacheStatus())
	}
}

func TestFailedWriteChangesNothing(t *testing.T) {
	for _, status := range []int{http.StatusNotFound, http.StatusConflict, http.StatusInternalServerError} {
		o, _ := listOrigin(status, "")
		e := newEngine(t, func(c *Config) { c.TTL = MaxTTL })
		srv := newServer(t, e.Handler(o))
		get(t, srv, "/items")
		fetch(t, srv, http.MethodDelete, "/items")
		if r := get(t, srv, "/items"); !strings.Contains(r.cacheStatus(), "hit") {
			t.Errorf("after a DELETE answered %d: Cache-Status %q, want a hit", status, r.cacheStatus())
		}
	}
}

// The stored copies are gone before the write's answer reaches its client:
// a client that reads again as soon as it saw the answer never gets the old
// copy.
func TestWriteInvalidatesBeforeItsAnswerGoesOut(t *testing.T) {
	o, _ := listOrigin(http.StatusNoContent, "")
	e := newEngine(t, func(c *Config) { c.TTL = MaxTTL })
	srv := newServer(t, e.Handler(o))
	get(t, srv, "/items")
	if n := e.cache.stats().Entries; n != 1 {
		t.Fatalf("%d entries stored, want 1", n)
	}
	var storedAtAnswer int64 = -1
	w := &headerSpy{ResponseRecorder: httptest.NewRecorder(), onHeader: func() { storedAtAnswer = e.cache.stats().Entries }}
	r := httptest.NewRequest(http.MethodDelete, srv.URL+"/items/7", nil)
	if err := e.Serve(w, r, o.next); err != nil || w.Code != http.StatusNoContent {
		t.Fatalf("DELETE: %v %d", err, w.Code)
	}
	if storedAtAnswer != 0 {
		t.Errorf("%d entries were still stored when the DELETE's answer went out", storedAtAnswer)
	}
}

type headerSpy struct {
	*httptest.ResponseRecorder
	onHeader func()
}

func (w *headerSpy) WriteHeader(status int) {
	w.onHeader()
	w.ResponseRecorder.WriteHeader(status)
}

func TestSafeMethods(t *testing.T) {
	for m, want := range map[string]bool{"GET": true, "HEAD": true, "OPTIONS": true, "TRACE": true, "POST": false, "PUT": false, "PATCH": false, "DELETE": false, "PROPPATCH": false} {
		if safeMethod(m) != want {
			t.Errorf("safeMethod(%s) = %v", m, !want)
		}
	}
}

// Under public, a request with Authorization shares only a response that
// says it may (RFC 9111 §3.5); a stored copy of a request without
// Authorization answers it.
func TestAuthorizedRequestsUnderPublic(t *testing.T) {
	for cc, shared := range map[string]bool{"": false, "max-age=60": false, "public": true, "s-maxage=60": true, "must-revalidate": true} {
		t.Run("cache-control "+cc, func(t *testing.T) {
			o := newOrigin(func(w http.ResponseWriter, r *http.Request, n int64) {
				if cc != "" {
					w.Header().Set("Cache-Control", cc)
				}
				fmt.Fprintf(w, "v%d for %s", n, r.Header.Get("Authorization"))
			})
			e := newEngine(t, func(c *Config) { c.Public, c.TTL = true, MaxTTL })
			srv := newServer(t, e.Handler(o))
			first := get(t, srv, "/p", "Authorization", "Bearer alice")
			stored := strings.Contains(first.cacheStatus(), "stored")
			if stored != shared {
				t.Errorf("alice's answer: Cache-Status %q, stored %v, want %v", first.cacheStatus(), stored, shared)
			}
			anon := get(t, srv, "/p")
			if got := anon.body == first.body; got != shared {
				t.Errorf("anonymous after alice: %q, shares alice's %v, want %v", anon.body, got, shared)
			}
			if !shared {
				bob := get(t, srv, "/p", "Authorization", "Bearer bob")
				if !strings.Contains(bob.cacheStatus(), "hit") || bob.body != anon.body {
					t.Errorf("bob after a stored anonymous copy: %q, Cache-Status %q; want that copy", bob.body, bob.cacheStatus())
				}
			}
		})
	}
}
