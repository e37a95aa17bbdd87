package main

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"
)

// readEvents reads n events (blocks with an id) from an event stream.
func readEvents(t *testing.T, sc *bufio.Scanner, n int) []int64 {
	t.Helper()
	var ids []int64
	for len(ids) < n && sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "id: "); ok {
			id, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				t.Fatalf("id %q: %v", v, err)
			}
			ids = append(ids, id)
		}
	}
	if len(ids) < n {
		t.Fatalf("stream ended after %d events (%v), want %d", len(ids), sc.Err(), n)
	}
	return ids
}

func stats(t *testing.T, url string) (requests map[string]int64, open, opened int64) {
	t.Helper()
	resp, err := http.Get(url + "/stats")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var s struct {
		Requests map[string]int64
		Streams  struct{ Open, Opened int64 }
	}
	if err := json.NewDecoder(resp.Body).Decode(&s); err != nil {
		t.Fatal(err)
	}
	return s.Requests, s.Streams.Open, s.Streams.Opened
}

func openStream(t *testing.T, ctx context.Context, url, lastEventID string) *bufio.Scanner {
	t.Helper()
	req, _ := http.NewRequestWithContext(ctx, "GET", url+"/api/sessions/stream", nil)
	if lastEventID != "" {
		req.Header.Set("Last-Event-ID", lastEventID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != 200 || ct != "text/event-stream" {
		t.Fatalf("got %d %q", resp.StatusCode, ct)
	}
	return bufio.NewScanner(resp.Body)
}

func TestSessionStreamSendsOneEventASecondAndCounts(t *testing.T) {
	srv := httptest.NewServer(newServer(0))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	start := time.Now()
	ids := readEvents(t, openStream(t, ctx, srv.URL, ""), 3)
	if ids[1] != ids[0]+1 || ids[2] != ids[1]+1 {
		t.Errorf("ids %v: want consecutive", ids)
	}
	if now := time.Now().Unix(); ids[2] > now || ids[0] < start.Unix()-1 {
		t.Errorf("ids %v: want Unix seconds around %d", ids, now)
	}
	// The first event comes at once, the next two on the next two seconds.
	if d := time.Since(start); d < time.Second || d > 4*time.Second {
		t.Errorf("3 events took %s, want between 1s and 3s", d)
	}
	if _, open, opened := stats(t, srv.URL); open != 1 || opened != 1 {
		t.Errorf("stats: %d open, %d opened, want 1 and 1", open, opened)
	}
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, open, _ := stats(t, srv.URL)
		if open == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d streams still open 5s after the client left", open)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestSessionStreamResumesAfterLastEventID(t *testing.T) {
	srv := httptest.NewServer(newServer(0))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	now := time.Now().Unix()
	ids := readEvents(t, openStream(t, ctx, srv.URL, strconv.FormatInt(now-5, 10)), 5)
	for i, id := range ids {
		if id != now-4+int64(i) {
			t.Fatalf("after Last-Event-ID %d: ids %v, want %d..%d", now-5, ids, now-4, now)
		}
	}
	// An id from long ago resumes streamHistory events back, not from it.
	sc := openStream(t, ctx, srv.URL, strconv.FormatInt(now-10*streamHistory, 10))
	if first := readEvents(t, sc, 1)[0]; first < now-streamHistory || first > now-streamHistory+2 {
		t.Errorf("after an old Last-Event-ID the stream starts at %d, want about %d", first, now-streamHistory+1)
	}
	if requests, _, opened := stats(t, srv.URL); opened != 2 || requests["/api/sessions/stream"] != 2 {
		t.Errorf("stats: %d streams opened, %d requests, want 2", opened, requests["/api/sessions/stream"])
	}
}

func TestSessionEventDependsOnItsIDAlone(t *testing.T) {
	a, b := sessionEvent(1796000000), sessionEvent(1796000000)
	if string(a) != string(b) || string(a) == string(sessionEvent(1796000001)) {
		t.Errorf("events %s, %s", a, b)
	}
}
