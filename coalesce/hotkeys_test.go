package coalesce

import (
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
)

func hotRequest(path, auth string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://api.example"+path, nil)
	if auth != "" {
		r.Header.Set("Authorization", auth)
	}
	return r
}

func TestHotKeysListTheHeaviestKeysOfASkewedLoadFirst(t *testing.T) {
	h := NewHotKeys(HotKeysConfig{Capacity: 256}, nil)
	now := time.Now()
	rng := rand.New(rand.NewPCG(1, 2))
	zipf := rand.NewZipf(rng, 1.1, 1, 9_999)
	exact := map[string]int{}
	reqs := make([]*http.Request, 10_000)
	for i := range reqs {
		reqs[i] = hotRequest(fmt.Sprintf("/api/items/%d", i), "")
	}
	for range 200_000 {
		i := zipf.Uint64()
		exact[reqs[i].URL.Path]++
		h.Record(reqs[i], Event{Outcome: OutcomeHit}, now)
	}
	type kv struct {
		path string
		n    int
	}
	var truth []kv
	for p, n := range exact {
		truth = append(truth, kv{p, n})
	}
	slices.SortFunc(truth, func(a, b kv) int { return b.n - a.n })

	top := h.Top(10, now)
	if len(top) != 10 {
		t.Fatalf("Top(10) returned %d rows", len(top))
	}
	for i, row := range top {
		if row.Path != truth[i].path {
			t.Errorf("row %d: %s (%d), want %s (%d exact)", i, row.Path, row.Count, truth[i].path, truth[i].n)
		}
		if d := int(row.Count) - truth[i].n; d < 0 || uint64(d) > row.Overcount {
			t.Errorf("row %d %s: count %d, exact %d, overcount bound %d", i, row.Path, row.Count, truth[i].n, row.Overcount)
		}
		if row.Hit != 1 || row.Upstream != 0 {
			t.Errorf("row %d: hit share %v, upstream %v/min; every request was a hit", i, row.Hit, row.Upstream)
		}
	}
}

func TestHotKeysAlertOncePerKeyPerWindowWhateverTheIdentities(t *testing.T) {
	h := NewHotKeys(HotKeysConfig{Window: time.Minute, AlertRate: 20}, nil)
	start := time.Now()
	alerts := map[string][]time.Time{}
	// Two keys at 40 requests a minute for three minutes: one polled by
	// one identity, one spread over ten.
	for i := range 120 {
		at := start.Add(time.Duration(i) * 1500 * time.Millisecond)
		for _, k := range []struct{ path, auth string }{
			{"/api/sessions", "Bearer one"},
			{"/api/users", fmt.Sprintf("Bearer user-%d", i%10)},
		} {
			if row, ok := h.Record(hotRequest(k.path, k.auth), Event{Outcome: OutcomeLeader, Upstream: true}, at); ok {
				alerts[row.Path] = append(alerts[row.Path], at)
				if row.Requests <= 20 {
					t.Errorf("alert for %s at %.1f/min, below the rate", row.Path, row.Requests)
				}
			}
		}
	}
	for _, path := range []string{"/api/sessions", "/api/users"} {
		got := alerts[path]
		if len(got) != 3 {
			t.Fatalf("%s: %d alerts in three windows, want one per window: %v", path, len(got), got)
		}
		for i := 1; i < len(got); i++ {
			if h.periodOf(got[i]) == h.periodOf(got[i-1]) {
				t.Errorf("%s: two alerts in one window: %v", path, got)
			}
		}
	}
	rows := h.Top(10, start.Add(179*time.Second))
	byPath := map[string]HotKey{}
	for _, r := range rows {
		byPath[r.Path] = r
	}
	if n := byPath["/api/sessions"].Identities; n != 1 {
		t.Errorf("/api/sessions: %d identities, want 1", n)
	}
	if n := byPath["/api/users"].Identities; n < 9 || n > 11 {
		t.Errorf("/api/users: %d identities, want about 10", n)
	}
	for _, r := range rows {
		if r.Requests < 35 || r.Requests > 45 {
			t.Errorf("%s: %.1f requests/min, want about 40", r.Path, r.Requests)
		}
		if r.Upstream != r.Requests {
			t.Errorf("%s: %.1f upstream/min for %.1f requests/min, every request went upstream", r.Path, r.Upstream, r.Requests)
		}
	}
}

func TestHotKeysNeverShowQueriesOrCredentials(t *testing.T) {
	h := NewHotKeys(HotKeysConfig{}, []string{"X-Api-Key"})
	now := time.Now()
	r := hotRequest("/api/search?q=secret-term&token=abc123", "Bearer sk-live-42")
	r.Header.Set("Cookie", "sid=cookie-value")
	r.Header.Set("X-Api-Key", "key-value")
	h.Record(r, Event{Outcome: OutcomeLeader, Upstream: true}, now)
	rows := h.Top(10, now)
	if len(rows) != 1 {
		t.Fatalf("%d rows, want 1", len(rows))
	}
	text := fmt.Sprintf("%+v", rows)
	for _, secret := range []string{"secret-term", "abc123", "sk-live-42", "cookie-value", "key-value", "token"} {
		if strings.Contains(text, secret) {
			t.Errorf("the view shows %q: %s", secret, text)
		}
	}
	if rows[0].Path != "/api/search" || rows[0].Host != "api.example" || rows[0].Method != "GET" {
		t.Errorf("row %+v, want GET api.example /api/search", rows[0])
	}
}

func TestHotKeysMemoryStaysBoundedUnderKeyChurn(t *testing.T) {
	h := NewHotKeys(HotKeysConfig{}, nil)
	now := time.Now()
	for i := range 100_000 {
		h.Record(hotRequest(fmt.Sprintf("/api/items/%d/%s", i, strings.Repeat("x", 40)), ""), Event{Outcome: OutcomeLeader}, now)
	}
	first := h.MemoryBytes()
	for i := range 100_000 {
		h.Record(hotRequest(fmt.Sprintf("/api/other/%d/%s", i, strings.Repeat("y", 40)), ""), Event{Outcome: OutcomeLeader}, now.Add(time.Minute))
	}
	second := h.MemoryBytes()
	t.Logf("hot-key view after 100 000 distinct keys: %d bytes, then %d after 100 000 more", first, second)
	// Two windows of 1024 counters with ~70-byte labels.
	if first > 1<<20 || second > 1<<20 {
		t.Errorf("memory %d then %d bytes after 100 000 keys each, want under 1 MiB", first, second)
	}
	if n := len(h.Top(-1, now.Add(time.Minute))); n > 2*DefaultHotKeyCapacity {
		t.Errorf("%d rows, more than two windows of %d counters", n, DefaultHotKeyCapacity)
	}
}

func TestHotKeysForgetKeysAfterTwoQuietWindows(t *testing.T) {
	h := NewHotKeys(HotKeysConfig{Window: time.Minute}, nil)
	now := time.Now()
	h.Record(hotRequest("/api/a", ""), Event{Outcome: OutcomeLeader}, now)
	if n := len(h.Top(10, now.Add(90*time.Second))); n != 1 {
		t.Errorf("%d rows half a window later, want 1 (the previous window still counts)", n)
	}
	if n := len(h.Top(10, now.Add(3*time.Minute))); n != 0 {
		t.Errorf("%d rows three windows later, want 0", n)
	}
}

func BenchmarkHotKeysRecord(b *testing.B) {
	h := NewHotKeys(HotKeysConfig{}, nil)
	r := benchRequest()
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		h.Record(r, Event{Outcome: OutcomeHit}, now)
	}
}

// Once the summaries are full, paths asked for once (an all-miss load) take
// no counter: the keys asked for again keep theirs, with their counts
// (Space-Saving would give every counter to a path asked for once), and a
// key's second request gives it one, its first counted too.
func TestHotKeysKeepTheirCountersUnderPathsAskedForOnce(t *testing.T) {
	h := NewHotKeys(HotKeysConfig{Capacity: 64}, nil)
	now := time.Now()
	for i := range 64 { // fill the summaries
		for range 50 {
			h.Record(hotRequest(fmt.Sprintf("/api/kept/%d", i), ""), Event{Outcome: OutcomeHit}, now)
		}
	}
	for i := range 10_000 {
		h.Record(hotRequest(fmt.Sprintf("/api/once/%d", i), ""), Event{Outcome: OutcomeLeader, Upstream: true}, now)
	}
	kept, once := 0, 0
	for _, row := range h.Top(100, now) {
		switch {
		case strings.HasPrefix(row.Path, "/api/once/"):
			once++
		case row.Count-row.Overcount > 50 || row.Count < 50 || row.Hit != 1:
			t.Errorf("%s: count %d (overcount %d), hit share %v; want 50 hits", row.Path, row.Count, row.Overcount, row.Hit)
		default:
			kept++
		}
	}
	// A shard may hold fewer than its share of the 64 keys (its room goes
	// to paths asked for once), and a false positive of the doorkeeper
	// takes a counter over.
	if kept < 48 || once > 16 {
		t.Errorf("listed: %d of the 64 keys asked for again, %d paths asked for once", kept, once)
	}
	// A key asked for twice takes a counter with both requests.
	twice := hotRequest("/api/twice", "")
	h.Record(twice, Event{Outcome: OutcomeLeader, Upstream: true}, now)
	h.Record(twice, Event{Outcome: OutcomeLeader, Upstream: true}, now)
	for _, row := range h.Top(200, now) {
		if row.Path == "/api/twice" {
			if row.Count-row.Overcount != 2 || row.Upstream == 0 {
				t.Errorf("/api/twice: %+v, want a count of 2 over its overcount, and upstream requests", row)
			}
			return
		}
	}
	t.Error("a key asked for twice is not listed")
}
