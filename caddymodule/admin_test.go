package caddymodule

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
	"github.com/edge-coalesce/caddy-coalesce/registry"
)

// serveAdmin calls one admin handler as Caddy's admin mux would and returns
// the recorder and the error the handler returned.
func serveAdmin(h caddy.AdminHandlerFunc, method, target, body string) (*httptest.ResponseRecorder, error) {
	w := httptest.NewRecorder()
	err := h(w, httptest.NewRequest(method, target, strings.NewReader(body)))
	return w, err
}

func statusOf(t *testing.T, err error) int {
	t.Helper()
	var apiErr caddy.APIError
	if !errors.As(err, &apiErr) {
		t.Fatalf("error %v is not a caddy.APIError", err)
	}
	// Caddy's admin mux uses a type assertion, not errors.As.
	if _, ok := err.(caddy.APIError); !ok {
		t.Fatalf("error %T must be a caddy.APIError value for the admin mux to use its status", err)
	}
	return apiErr.HTTPStatus
}

func TestAdminBypassSwitchesTheKillSwitchAtOnce(t *testing.T) {
	a := &adminAPI{}
	t.Cleanup(func() { bypassAll.Store(false) })

	w, err := serveAdmin(a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": true}`)
	if err != nil || w.Code != 200 || !bypassAll.Load() {
		t.Fatalf("POST enabled=true: %d %v, kill switch %v", w.Code, err, bypassAll.Load())
	}
	var got bypassState
	if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil || !got.Enabled || got.Changed == nil {
		t.Errorf("answer %s: want enabled with the time of the change", w.Body)
	}

	w, err = serveAdmin(a.handleBypass, "GET", "/coalesce/bypass", "")
	if err != nil || !strings.Contains(w.Body.String(), `"enabled":true`) {
		t.Errorf("GET after switching on: %s %v", w.Body, err)
	}

	if _, err := serveAdmin(a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": false}`); err != nil || bypassAll.Load() {
		t.Errorf("POST enabled=false: %v, kill switch %v", err, bypassAll.Load())
	}
}

func TestAdminRefusesWhatItCannotDo(t *testing.T) {
	a := &adminAPI{}
	cases := []struct {
		name           string
		h              caddy.AdminHandlerFunc
		method, target string
		body           string
		status         int
		allow          string
	}{
		{"stats by POST", a.handleStats, "POST", "/coalesce/stats", "", 405, "GET"},
		{"inflight by PUT", a.handleInflight, "PUT", "/coalesce/inflight", "", 405, "GET"},
		{"breakers by DELETE", a.handleBreakers, "DELETE", "/coalesce/breakers", "", 405, "GET"},
		{"bypass by PATCH", a.handleBypass, "PATCH", "/coalesce/bypass", `{"enabled":true}`, 405, "GET, POST"},
		{"limit 0", a.handleInflight, "GET", "/coalesce/inflight?limit=0", "", 400, ""},
		{"limit too large", a.handleInflight, "GET", "/coalesce/inflight?limit=1001", "", 400, ""},
		{"limit not a number", a.handleInflight, "GET", "/coalesce/inflight?limit=-", "", 400, ""},
		{"bypass not JSON", a.handleBypass, "POST", "/coalesce/bypass", `enabled=1`, 400, ""},
		{"bypass without enabled", a.handleBypass, "POST", "/coalesce/bypass", `{}`, 400, ""},
		{"bypass with null", a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": null}`, 400, ""},
		{"bypass with a string", a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": "true"}`, 400, ""},
		{"bypass with an unknown field", a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": true, "zone": "x"}`, 400, ""},
		{"bypass with two objects", a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": true}{}`, 400, ""},
		{"bypass too large", a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": true` + strings.Repeat(" ", 2000) + `}`, 413, ""},
		{"bypass too large after the object", a.handleBypass, "POST", "/coalesce/bypass", `{"enabled": true}` + strings.Repeat(" ", 2000), 413, ""},
		{"bypass with an array", a.handleBypass, "POST", "/coalesce/bypass", `[true]`, 400, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			w, err := serveAdmin(c.h, c.method, c.target, c.body)
			if err == nil {
				t.Fatalf("no error; answered %d %s", w.Code, w.Body)
			}
			if st := statusOf(t, err); st != c.status {
				t.Errorf("status %d, want %d (%v)", st, c.status, err)
			}
			if got := w.Header().Get("Allow"); got != c.allow {
				t.Errorf("Allow %q, want %q", got, c.allow)
			}
			if bypassAll.Load() {
				t.Errorf("a refused request switched the kill switch on")
			}
		})
	}
}

// The kill switch's refusals say what was wrong with the body.
func TestAdminBypassErrorsSayWhatIsWrong(t *testing.T) {
	a := &adminAPI{}
	for body, want := range map[string]string{
		`[true]`:                    `got a JSON array`,
		``:                          `the body is empty`,
		` null `:                    `got a JSON null`,
		`{"enabled": "yes"}`:        `"enabled" must be true or false, not a JSON string`,
		`{}`:                        `"enabled" is missing`,
		`{"enabled": true}{}`:       `unexpected data after the object`,
		strings.Repeat(" ", 2000):   `the body is over 1024 bytes`,
		`{"enabled": true, "x": 1}`: `unknown field "x"`,
	} {
		_, err := serveAdmin(a.handleBypass, "POST", "/coalesce/bypass", body)
		if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), `{"enabled": true}`) {
			t.Errorf("%.30q: got %v, want it to say %q and show the right body", body, err, want)
		}
	}
}

func TestAdminStatsAndInflightReadListedEngines(t *testing.T) {
	cfg := coalesce.DefaultConfig()
	e, err := coalesce.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	listEngine("unit-admin/1", "unit-admin", e, cfg)
	t.Cleanup(func() { unlistEngine("unit-admin/1") })

	// A flight held open by a leader that waits for gate.
	gate, started := make(chan struct{}), make(chan struct{})
	h := e.Handler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-gate
		_, _ = w.Write([]byte("ok"))
	}))
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/orders?id=secret", nil))
	}()
	<-started
	a := &adminAPI{}

	w, err := serveAdmin(a.handleInflight, "GET", "/coalesce/inflight?limit=5", "")
	if err != nil {
		t.Fatal(err)
	}
	var inflight inflightResponse
	if err := json.Unmarshal(w.Body.Bytes(), &inflight); err != nil {
		t.Fatal(err)
	}
	var mine *flightView
	for i, f := range inflight.Flights {
		if f.Zone == "unit-admin" {
			mine = &inflight.Flights[i]
		}
	}
	if mine == nil || mine.Method != "GET" || mine.Path != "/orders" || len(mine.Key) != 16 || inflight.Limit != 5 {
		t.Errorf("inflight %s: want the flight GET /orders (no query) with a 16-digit key hash", w.Body)
	} else if mine.Waiters != 0 || mine.Clients != 1 {
		t.Errorf("inflight %s: want no waiters and one client, the leader's", w.Body)
	}
	if strings.Contains(w.Body.String(), "secret") {
		t.Errorf("inflight shows the query string: %s", w.Body)
	}

	close(gate)
	<-done
	w, err = serveAdmin(a.handleStats, "GET", "/coalesce/stats", "")
	if err != nil {
		t.Fatal(err)
	}
	var stats struct {
		Bypass bypassState               `json:"bypass"`
		Total  map[string]any            `json:"total"`
		Zones  map[string]map[string]any `json:"zones"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &stats); err != nil {
		t.Fatal(err)
	}
	z := stats.Zones["unit-admin"]
	for _, field := range []string{"engines", "registry", "cache", "uncollapsible_keys", "cache_budget"} {
		if _, ok := z[field]; !ok {
			t.Errorf("zone unit-admin has no %q: %s", field, w.Body)
		}
	}
	reg, _ := z["registry"].(map[string]any)
	if reg["flights"] != 1.0 || reg["published"] != 1.0 || reg["active_keys"] != 0.0 {
		t.Errorf("zone unit-admin registry %v: want 1 flight, published, none active", reg)
	}
}

func TestViewFlightShowsTheEnginesDescription(t *testing.T) {
	for _, f := range []coalesce.FlightInfo{
		{Key: "k", Method: "GET", Path: "/api/x", Age: 1500 * time.Microsecond, Waiters: 3},
		{Key: "k", Method: "GET", Path: "/api/x", Refresh: true, Age: 1500 * time.Microsecond, Waiters: 3},
		{Key: "k", Method: "HEAD", Path: "/a b", Age: 1500 * time.Microsecond, Waiters: 3},
	} {
		v := viewFlight("z", f)
		if v.Method != f.Method || v.Path != f.Path || v.Refresh != f.Refresh || v.AgeNS != 1_500_000 || v.Age != "1.5ms" || v.Waiters != 3 {
			t.Errorf("%+v: %+v", f, v)
		}
	}
}

func TestAddStatsWeightsTheAverageLifetime(t *testing.T) {
	a := coalesce.Stats{Registry: registry.Stats{Published: 1, AverageLifetime: 10 * time.Millisecond, MaxLifetime: 10 * time.Millisecond, ActiveKeys: 2}}
	b := coalesce.Stats{Registry: registry.Stats{Published: 3, AverageLifetime: 30 * time.Millisecond, MaxLifetime: 50 * time.Millisecond, ActiveKeys: 1}}
	sum := addStats(a, b)
	if sum.Registry.AverageLifetime != 25*time.Millisecond || sum.Registry.MaxLifetime != 50*time.Millisecond ||
		sum.Registry.Published != 4 || sum.Registry.ActiveKeys != 3 {
		t.Errorf("sum %+v: want average 25ms, max 50ms, 4 published, 3 active", sum.Registry)
	}
	if z := addStats(coalesce.Stats{}, coalesce.Stats{}); z.Registry.AverageLifetime != 0 {
		t.Errorf("sum of nothing has average %s", z.Registry.AverageLifetime)
	}
}
