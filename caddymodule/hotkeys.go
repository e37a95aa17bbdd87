package caddymodule

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

// Hot keys: GET /coalesce/top, the hot_key_rate alert, its log line and
// its metric. The counting itself is coalesce.HotKeys.

// Bounds of hot_key_rate's window: a shorter one is noise, a longer one
// reports a storm long after it began.
const (
	minHotKeyWindow = time.Second
	maxHotKeyWindow = time.Hour
)

// parseHotKeyRate reads "<n>/<duration>", e.g. "20/1m".
func parseHotKeyRate(s string) (n int, window time.Duration, err error) {
	count, dur, ok := strings.Cut(s, "/")
	if !ok {
		return 0, 0, fmt.Errorf("hot_key_rate is requests per duration, e.g. 20/1m (got %q)", s)
	}
	n, err = strconv.Atoi(count)
	if err != nil || n < 1 {
		return 0, 0, fmt.Errorf("hot_key_rate: %q is not a positive number of requests; write e.g. 20/1m", count)
	}
	window, err = caddy.ParseDuration(dur)
	if err != nil {
		return 0, 0, fmt.Errorf("hot_key_rate: %q is not a duration; write e.g. 20/1m or 5/10s", dur)
	}
	if window < minHotKeyWindow || window > maxHotKeyWindow {
		return 0, 0, fmt.Errorf("hot_key_rate: the window must be from %s to %s (got %s); write e.g. 20/1m", minHotKeyWindow, maxHotKeyWindow, window)
	}
	return n, window, nil
}

// hotKeysConfig is the engine's hot-key configuration for the handler's
// hot_key_rate (already validated).
func (h *Handler) hotKeysConfig() coalesce.HotKeysConfig {
	if h.HotKeyRate == "" {
		return coalesce.HotKeysConfig{}
	}
	n, window, err := parseHotKeyRate(h.HotKeyRate)
	if err != nil {
		return coalesce.HotKeysConfig{}
	}
	return coalesce.HotKeysConfig{Window: window, AlertRate: n}
}

// unmarshalHotKeyRate reads the Caddyfile's `hot_key_rate <n>/<duration>`.
func unmarshalHotKeyRate(d *caddyfile.Dispenser) (string, error) {
	if !d.NextArg() {
		return "", d.Err("hot_key_rate needs requests per duration, e.g. hot_key_rate 20/1m")
	}
	v := d.Val()
	if _, _, err := parseHotKeyRate(v); err != nil {
		return "", d.Err(err.Error())
	}
	if d.NextArg() {
		return "", d.Errf("hot_key_rate takes one value such as 20/1m, got another argument %q; remove it", d.Val())
	}
	return v, nil
}

// hotKeyAlert logs and counts one key past hot_key_rate.
func (h *Handler) hotKeyAlert(row coalesce.HotKey) {
	metrics.hotKeyAlerts.WithLabelValues(zoneName(h.Zone)).Inc()
	h.logger.Warn("hot key: requests for one key passed hot_key_rate",
		zap.String("zone", zoneName(h.Zone)),
		zap.String("hot_key_rate", h.HotKeyRate),
		zap.String("method", row.Method),
		zap.String("host", row.Host),
		zap.String("path", row.Path),
		zap.Float64("requests_per_minute", row.Requests),
		zap.Float64("upstream_per_minute", row.Upstream),
		zap.Float64("hit_share", row.Hit),
		zap.Float64("collapsed_share", row.Collapsed),
		zap.Float64("stale_share", row.Stale),
		zap.Int("identities", row.Identities),
	)
}

// Bounds of GET /coalesce/top?limit=.
const (
	defaultTopLimit = 20
	maxTopLimit     = 1000
)

// topRow is one row of /coalesce/top: a key of one zone.
type topRow struct {
	Zone string `json:"zone"`
	coalesce.HotKey
}

// handleTop lists the keys asked for most right now, over every zone.
func (a *adminAPI) handleTop(w http.ResponseWriter, r *http.Request) error {
	if err := allowMethods(w, r, http.MethodGet); err != nil {
		return err
	}
	limit, err := limitParam(r, defaultTopLimit, maxTopLimit)
	if err != nil {
		return err
	}
	rows := []topRow{}
	for _, z := range snapshotZones() {
		for _, e := range z.Engines {
			for _, k := range e.Top(limit) {
				rows = append(rows, topRow{Zone: z.Zone, HotKey: k})
			}
		}
	}
	slices.SortStableFunc(rows, func(a, b topRow) int {
		switch {
		case a.Requests > b.Requests:
			return -1
		case a.Requests < b.Requests:
			return 1
		}
		return 0
	})
	if len(rows) > limit {
		rows = rows[:limit]
	}
	return writeJSON(w, map[string]any{"keys": rows})
}
