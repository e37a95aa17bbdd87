package caddymodule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI serves /coalesce/... on Caddy's admin endpoint: statistics, the
// flights in progress, breaker states and the kill switch. Caddy builds it
// anew on every config load; it holds nothing and reads the process-wide
// state (zones, bypassAll), as admin.api.reverse_proxy reads its hosts pool.
type adminAPI struct {
	logger *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.coalesce",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision sets up the logger.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger(a)
	return nil
}

// Routes returns the /coalesce/... routes.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/coalesce/stats", Handler: caddy.AdminHandlerFunc(a.handleStats)},
		{Pattern: "/coalesce/inflight", Handler: caddy.AdminHandlerFunc(a.handleInflight)},
		{Pattern: "/coalesce/breakers", Handler: caddy.AdminHandlerFunc(a.handleBreakers)},
		{Pattern: "/coalesce/bypass", Handler: caddy.AdminHandlerFunc(a.handleBypass)},
		{Pattern: "/coalesce/top", Handler: caddy.AdminHandlerFunc(a.handleTop)},
		{Pattern: "/coalesce/streams", Handler: caddy.AdminHandlerFunc(a.handleStreams)},
	}
}

// Bounds of GET /coalesce/inflight?limit=.
const (
	defaultInflightLimit = 100
	maxInflightLimit     = 1000
)

// zoneStats is what /coalesce/stats reports for one zone (or all).
type zoneStats struct {
	// Engines is how many states (registries and caches) the zone has now:
	// 1, or more while a reload that changed its settings lets old requests
	// finish, or when handlers share a zone with different settings. Under
	// "default", one per handler without a zone.
	Engines int `json:"engines"`
	coalesce.Stats
	CacheBudget cacheBudget `json:"cache_budget"`
}

type cacheBudget struct {
	MaxEntries int64 `json:"max_entries"`
	MaxBytes   int64 `json:"max_bytes"`
}

// bypassState is the kill switch as /coalesce/bypass and /coalesce/stats
// report it.
type bypassState struct {
	Enabled bool `json:"enabled"`
	// Changed is when it was last switched through the admin API, if ever
	// since the process started.
	Changed *time.Time `json:"changed,omitempty"`
}

type statsResponse struct {
	Bypass   bypassState          `json:"bypass"`
	Total    zoneStats            `json:"total"`
	Zones    map[string]zoneStats `json:"zones"`
	Breakers *breakerSummary      `json:"breakers,omitempty"`
}

// bypassChanged is when the kill switch was last switched (Unix ns; 0: never).
var bypassChanged atomic.Int64

func currentBypass() bypassState {
	s := bypassState{Enabled: bypassAll.Load()}
	if ns := bypassChanged.Load(); ns != 0 {
		t := time.Unix(0, ns).UTC()
		s.Changed = &t
	}
	return s
}

func (a *adminAPI) handleStats(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	resp := statsResponse{Bypass: currentBypass(), Zones: map[string]zoneStats{}, Breakers: summarizeBreakers()}
	for _, z := range snapshotZones() {
		if len(z.Engines) == 0 {
			continue
		}
		zs := zoneStats{Engines: len(z.Engines), Stats: z.Stats, CacheBudget: cacheBudget{MaxEntries: z.MaxEntries, MaxBytes: z.MaxBytes}}
		resp.Zones[z.Zone] = zs
		resp.Total.Engines += zs.Engines
		resp.Total.Stats = addStats(resp.Total.Stats, zs.Stats)
		resp.Total.CacheBudget.MaxEntries += zs.CacheBudget.MaxEntries
		resp.Total.CacheBudget.MaxBytes += zs.CacheBudget.MaxBytes
	}
	return writeJSON(w, resp)
}

// flightView is one flight in /coalesce/inflight.
type flightView struct {
	Zone string `json:"zone"`
	// Key is a short hash of the key: enough to match log lines and
	// {http.coalesce.key_hash}, never the key itself.
	Key    string `json:"key"`
	Method string `json:"method"`
	// Path has no query string.
	Path string `json:"path"`
	// Refresh: a background stale-while-revalidate refresh, not a client's
	// request.
	Refresh bool `json:"refresh,omitempty"`
	// Variant: the flight of the requests that differ from another flight
	// of the key in a field its responses vary on (Vary).
	Variant bool   `json:"variant,omitempty"`
	AgeNS   int64  `json:"age_ns"`
	Age     string `json:"age"`
	Waiters int    `json:"waiters"`
	// Clients: the waiters, plus the leader (a client's request, or a
	// refresh) while it is there.
	Clients int `json:"clients"`
}

type inflightResponse struct {
	// Total is the number of flights in progress, listed or not.
	Total     int64        `json:"total"`
	Limit     int          `json:"limit"`
	Truncated bool         `json:"truncated"`
	Flights   []flightView `json:"flights"`
}

func (a *adminAPI) handleInflight(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	limit, err := limitParam(r, defaultInflightLimit, maxInflightLimit)
	if err != nil {
		return err
	}
	resp := inflightResponse{Limit: limit, Flights: []flightView{}}
	for _, z := range snapshotZones() {
		resp.Total += z.Stats.Registry.ActiveKeys
		for _, e := range z.Engines {
			for _, f := range e.Inflight(limit) {
				resp.Flights = append(resp.Flights, viewFlight(z.Zone, f))
			}
		}
	}
	// Oldest first: a flight that has run long is what an operator looks for.
	sort.Slice(resp.Flights, func(i, j int) bool { return resp.Flights[i].AgeNS > resp.Flights[j].AgeNS })
	if len(resp.Flights) > limit {
		resp.Flights = resp.Flights[:limit]
	}
	resp.Truncated = int64(len(resp.Flights)) < resp.Total
	return writeJSON(w, resp)
}

// viewFlight is the admin API's view of a flight of zone.
func viewFlight(zone string, f coalesce.FlightInfo) flightView {
	return flightView{Zone: zone, Key: f.Key, Method: f.Method, Path: f.Path, Refresh: f.Refresh, Variant: f.Variant,
		AgeNS: int64(f.Age), Age: f.Age.Round(time.Microsecond).String(), Waiters: f.Waiters, Clients: f.Clients}
}

// bypassRequest is the body of POST /coalesce/bypass.
type bypassRequest struct {
	Enabled *bool `json:"enabled"`
}

// handleBypass reads (GET) or switches (POST {"enabled": true|false}) the
// kill switch. It acts at once on every coalesce handler of every config,
// without a reload.
func (a *adminAPI) handleBypass(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet, http.MethodPost); err != nil {
		return err
	}
	if r.Method == http.MethodGet {
		return writeJSON(w, currentBypass())
	}
	const usage = `the body must be a JSON object {"enabled": true} or {"enabled": false}`
	const maxBody = 1 << 10
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil {
		return apiError(http.StatusBadRequest, "reading the body: %v", err)
	}
	if len(body) > maxBody {
		return apiError(http.StatusRequestEntityTooLarge, "%s: the body is over %d bytes", usage, maxBody)
	}
	switch string(bytes.TrimSpace(body)) {
	case "":
		return apiError(http.StatusBadRequest, "%s: the body is empty", usage)
	case "null":
		return apiError(http.StatusBadRequest, "%s: got a JSON null", usage)
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	var req bypassRequest
	if err := dec.Decode(&req); err != nil {
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			if typeErr.Field == "" {
				return apiError(http.StatusBadRequest, "%s: got a JSON %s", usage, typeErr.Value)
			}
			return apiError(http.StatusBadRequest, "%s: %q must be true or false, not a JSON %s", usage, typeErr.Field, typeErr.Value)
		}
		return apiError(http.StatusBadRequest, "%s: %v", usage, err)
	}
	if req.Enabled == nil {
		return apiError(http.StatusBadRequest, `%s: "enabled" is missing`, usage)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return apiError(http.StatusBadRequest, "%s: unexpected data after the object", usage)
	}
	if was := bypassAll.Swap(*req.Enabled); was != *req.Enabled {
		bypassChanged.Store(time.Now().UnixNano())
		if a.logger != nil {
			if *req.Enabled {
				a.logger.Warn("coalesce kill switch on: every coalesce handler passes requests straight through")
			} else {
				a.logger.Info("coalesce kill switch off: coalesce handlers collapse and cache again")
			}
		}
	}
	return writeJSON(w, currentBypass())
}

// allowMethods answers 405 with an Allow header to other methods.
// limitParam reads the query's limit, from 1 to most; def when absent.
func limitParam(r *http.Request, def, most int) (int, error) {
	v := r.URL.Query().Get("limit")
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > most {
		return 0, apiError(http.StatusBadRequest, "limit must be a whole number from 1 to %d (got %q)", most, v)
	}
	return n, nil
}

func allowMethods(w http.ResponseWriter, r *http.Request, methods ...string) error {
	for _, m := range methods {
		if r.Method == m {
			return nil
		}
	}
	allow := strings.Join(methods, ", ")
	w.Header().Set("Allow", allow)
	return apiError(http.StatusMethodNotAllowed, "method %s not allowed on %s; use %s", r.Method, r.URL.Path, allow)
}

func apiError(status int, format string, args ...any) error {
	err := fmt.Errorf(format, args...)
	return caddy.APIError{HTTPStatus: status, Err: err, Message: err.Error()}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(v)
}

// breakerSummary counts the breakers in each state, for /coalesce/stats.
type breakerSummary struct {
	Closed   int `json:"closed"`
	HalfOpen int `json:"half_open"`
	Open     int `json:"open"`
}

func summarizeBreakers() *breakerSummary {
	var s breakerSummary
	for _, b := range breakers.Snapshot() {
		switch b.State {
		case coalesce.BreakerOpen:
			s.Open++
		case coalesce.BreakerHalfOpen:
			s.HalfOpen++
		default:
			s.Closed++
		}
	}
	return &s
}

// breakerView is one breaker in /coalesce/breakers.
type breakerView struct {
	coalesce.BreakerStatus
	// HalfOpenIn is how long an open breaker still refuses requests before
	// it lets probes through.
	HalfOpenInNS int64  `json:"half_open_in_ns,omitempty"`
	HalfOpenIn   string `json:"half_open_in,omitempty"`
}

type breakersResponse struct {
	Breakers []breakerView `json:"breakers"`
}

// handleBreakers lists every upstream's breaker (one per upstream and
// breaker settings), ordered by upstream.
func (a *adminAPI) handleBreakers(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	now := time.Now()
	resp := breakersResponse{Breakers: []breakerView{}}
	for _, b := range breakers.Snapshot() {
		v := breakerView{BreakerStatus: b}
		if b.OpenUntil != nil {
			left := max(b.OpenUntil.Sub(now), 0)
			v.HalfOpenInNS, v.HalfOpenIn = int64(left), left.Round(time.Millisecond).String()
		}
		resp.Breakers = append(resp.Breakers, v)
	}
	return writeJSON(w, resp)
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
	_ caddy.Provisioner = (*adminAPI)(nil)
)
