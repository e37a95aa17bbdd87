package coalesce

import (
	"testing"
	"time"
)

func TestCacheStatusWritesParametersInTheRFCsOrder(t *testing.T) {
	for _, c := range []struct {
		cs   cacheStatus
		want string
	}{
		{cacheStatus{hit: true, ttl: 1500 * time.Millisecond, withTTL: true, detailTTL: true}, `caddy-coalesce; hit; ttl=1; detail="ttl-ms=1500"`},
		{cacheStatus{hit: true, fwd: fwdStale, ttl: -300 * time.Millisecond, withTTL: true, detail: detailStaleWhileRevalidate}, `caddy-coalesce; hit; fwd=stale; ttl=-1; detail=stale-while-revalidate`},
		{cacheStatus{fwd: fwdURIMiss, fwdStatus: 200, stored: true}, `caddy-coalesce; fwd=uri-miss; fwd-status=200; stored`},
		{cacheStatus{fwd: fwdVaryMiss, fwdStatus: 200, collapsed: true}, `caddy-coalesce; fwd=vary-miss; fwd-status=200; collapsed`},
		{cacheStatus{fwd: fwdStale, ttl: -3 * time.Second, withTTL: true, collapsed: true, detail: detailStaleIfError}, `caddy-coalesce; fwd=stale; ttl=-3; collapsed; detail=stale-if-error`},
		{cacheStatus{fwd: fwdBypass, detail: "range"}, `caddy-coalesce; fwd=bypass; detail=range`},
		{cacheStatus{fwd: fwdURIMiss, detail: `a "b" c`}, `caddy-coalesce; fwd=uri-miss; detail="a \"b\" c"`},
		{cacheStatus{}, `caddy-coalesce`},
	} {
		if got := c.cs.String(); got != c.want {
			t.Errorf("%+v: %s, want %s", c.cs, got, c.want)
		}
	}
}

func TestStaleEntryNeverShowsANonNegativeTTL(t *testing.T) {
	now := time.Now()
	ent := &entry{fresh: now}
	if got := ttlSeconds(ent.ttlLeft(now)); got != -1 {
		t.Errorf("ttl at the end of freshness: %d, want -1", got)
	}
	if got := ttlSeconds(ent.ttlLeft(now.Add(-2500 * time.Millisecond))); got != 2 {
		t.Errorf("ttl 2.5s before the end: %d, want 2", got)
	}
}
