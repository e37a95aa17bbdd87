package caddymodule

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/edge-coalesce/caddy-coalesce/coalesce"
)

func parseCoalesce(t *testing.T, input string) (*Handler, error) {
	t.Helper()
	h := new(Handler)
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
	return h, err
}

func TestCaddyfileBreakerBlock(t *testing.T) {
	h, err := parseCoalesce(t, `coalesce {
		breaker {
			failures 3
			open 30s
			probes 2
			status 500 502
		}
	}`)
	if err != nil {
		t.Fatal(err)
	}
	got := h.Breaker.config()
	want := coalesce.DefaultBreakerConfig()
	want.Failures, want.Open, want.Probes, want.Statuses = 3, 30*time.Second, 2, []int{500, 502}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %+v\nwant %+v", got, want)
	}

	h, err = parseCoalesce(t, `coalesce {
		breaker {
			ratio 0.5 min 40 window 1m
		}
	}`)
	if err != nil {
		t.Fatal(err)
	}
	got = h.Breaker.config()
	if got.Ratio != 0.5 || got.MinRequests != 40 || got.Window != time.Minute || got.Failures != 0 {
		t.Errorf("ratio alone: %+v (consecutive failures should not trip it too)", got)
	}

	h, err = parseCoalesce(t, `coalesce {
		breaker {
			ratio 0.25
			failures 10
		}
	}`)
	if err != nil {
		t.Fatal(err)
	}
	if got = h.Breaker.config(); got.Ratio != 0.25 || got.Failures != 10 || got.MinRequests != 20 || got.Window != 30*time.Second {
		t.Errorf("ratio and failures: %+v", got)
	}

	h, err = parseCoalesce(t, "coalesce {\n\tbreaker off\n}")
	if err != nil || !h.Breaker.config().Disabled {
		t.Errorf("breaker off: %v %+v", err, h.Breaker)
	}
	if h, err := parseCoalesce(t, "coalesce"); err != nil || h.Breaker.config().Disabled || h.Breaker.config().Failures != 5 {
		t.Errorf("a bare coalesce should have the default breaker: %v", err)
	}
}

// An option given twice would silently lose its first value: it is an error
// naming both lines, except for the field lists, which add up.
func TestCaddyfileOptionGivenTwice(t *testing.T) {
	for input, want := range map[string]string{
		"ttl 50ms\nttl 100ms":         "ttl is given twice (first at Testfile:2); keep one of them, at Testfile:3",
		"public\nmax_wait 1s\npublic": "public is given twice (first at Testfile:2)",
		"zone a\nzone b":              "zone is given twice",
	} {
		if _, err := parseCoalesce(t, "coalesce {\n"+input+"\n}"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error saying %q", input, err, want)
		}
	}
	h, err := parseCoalesce(t, "coalesce {\nkey_headers X-A\nkey_headers X-B X-C\nidentity_headers X-K\nidentity_headers X-L\n}")
	if err != nil || strings.Join(h.KeyHeaders, " ") != "X-A X-B X-C" || strings.Join(h.IdentityHeaders, " ") != "X-K X-L" {
		t.Errorf("repeated field lists: %v, key_headers %v, identity_headers %v; want them added up", err, h.KeyHeaders, h.IdentityHeaders)
	}
}

// Errors found by validating a parsed value read like the parser's own: the
// option, the reason, the advice and the line, with no package prefix.
func TestCaddyfileValueErrorsCarryNoPrefix(t *testing.T) {
	_, err := parseCoalesce(t, "coalesce {\nttl 2s\n}")
	if err == nil || !strings.HasPrefix(err.Error(), "ttl must be at most 1s") || !strings.HasSuffix(err.Error(), "at Testfile:2") {
		t.Errorf("ttl 2s: got %v", err)
	}
}

func TestCaddyfileBreakerErrorsSayWhatIsWrong(t *testing.T) {
	for input, want := range map[string]string{
		"breaker {\n ratio 1.5\n}":               "not a fraction",
		"breaker {\n ratio 0\n}":                 "not a fraction",
		"breaker {\n ratio 0.5 min 0\n}":         "positive whole number",
		"breaker {\n ratio 0.5 every 3\n}":       "unexpected",
		"breaker {\n ratio 0.5 window -1s\n}":    "not a positive duration",
		"breaker {\n open -1s\n}":                "open must be a positive duration (got -1s), e.g. open 10s",
		"breaker {\n open 0s\n}":                 "positive duration",
		"breaker {\n probes 0\n}":                "positive whole number",
		"breaker {\n failures -2\n}":             "positive whole number",
		"breaker {\n status 502 700\n}":          `"700" is not an HTTP status code`,
		"breaker {\n status teapot\n}":           "not an HTTP status code",
		"breaker {\n status\n}":                  "at least one",
		"breaker {\n trip 3\n}":                  `unrecognized breaker option "trip"`,
		"breaker on":                             "takes a block, or `off`",
		"breaker off {\n failures 3\n}":          "takes no block",
		"breaker off\nbreaker {\nfailures 2\n}":  "breaker is given twice (first at Testfile:2); keep one of them",
		"breaker {\n failures 2\n failures 3\n}": "failures is given twice (first at Testfile:3)",
	} {
		_, err := parseCoalesce(t, "coalesce {\n"+input+"\n}")
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error saying %q", input, err, want)
		}
	}
}

func TestJSONBreakerNonsenseFailsValidation(t *testing.T) {
	for raw, want := range map[string]string{
		`{"breaker":{"ratio":2}}`:               "between 0 and 1",
		`{"breaker":{"open":-1000000000}}`:      "open must not be negative",
		`{"breaker":{"probes":-1}}`:             "probes",
		`{"breaker":{"status":[42]}}`:           "status 42",
		`{"breaker":{"ratio":0.5,"min":-3}}`:    "minimum sample",
		`{"breaker":{"window":-1,"ratio":0.5}}`: "window must not be negative",
	} {
		var h Handler
		if err := json.Unmarshal([]byte(raw), &h); err != nil {
			t.Fatal(err)
		}
		if err := h.Validate(); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", raw, err, want)
		}
	}
}

func TestUpstreamFailedCountsTransportErrorsNotClientsThatLeft(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{caddyhttp.Error(http.StatusBadGateway, errors.New("dial tcp 127.0.0.1:1: connect: connection refused")), true},
		{caddyhttp.Error(http.StatusGatewayTimeout, errors.New("i/o timeout")), true},
		{caddyhttp.Error(499, context.Canceled), false},
		{caddyhttp.Error(499, errors.New("operation was canceled")), false},
		{caddyhttp.Error(http.StatusNotFound, errors.New("no such file")), false},
		{fmt.Errorf("wrapped: %w", caddyhttp.Error(http.StatusBadGateway, errors.New("EOF"))), true},
		{context.Canceled, false},
		{errors.New("something broke"), true},
	} {
		if got := upstreamFailed(tc.err); got != tc.want {
			t.Errorf("upstreamFailed(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestLBPolicyBreakerParsesTheInnerPolicy(t *testing.T) {
	var s BreakerSelection
	if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser("breaker")); err != nil || s.InnerRaw != nil {
		t.Fatalf("bare breaker: %v %s", err, s.InnerRaw)
	}
	s = BreakerSelection{}
	if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser("breaker header X-Upstream")); err != nil {
		t.Fatal(err)
	}
	if got := string(s.InnerRaw); !strings.Contains(got, `"policy":"header"`) || !strings.Contains(got, `"field":"X-Upstream"`) {
		t.Errorf("inner policy JSON %s", got)
	}
	s = BreakerSelection{}
	if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser("breaker breaker")); err == nil {
		t.Error("breaker inside breaker accepted")
	}
	if err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser("breaker no_such_policy")); err == nil {
		t.Error("an unknown inner policy accepted")
	}
}

func TestBreakerStateChangesAreLoggedOnceEach(t *testing.T) {
	core, logs := observer.New(zapcore.DebugLevel)
	prev := breakerLogger.Swap(zap.New(core))
	t.Cleanup(func() { breakerLogger.Store(prev) })

	cfg := coalesce.DefaultConfig()
	// open is long enough that no stall of a loaded machine ends it between
	// the requests that meet the open breaker.
	cfg.Breaker.Failures, cfg.Breaker.Open = 2, 500*time.Millisecond
	cfg.Breakers = breakers
	cfg.Hooks.Upstream = func(*http.Request) string { return "log-test.internal:8080" }
	e, err := coalesce.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	status := http.StatusBadGateway
	next := func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(status)
		return nil
	}
	serve := func(path string) {
		_ = e.Serve(httptest.NewRecorder(), httptest.NewRequest("GET", "http://api.example"+path, nil), next)
	}
	for i := range 4 {
		serve(fmt.Sprintf("/fail%d", i)) // 2 trip it, 2 are answered as open
	}
	// The open period is over when the breaker turns half-open.
	b := breakers.Breaker("log-test.internal:8080", cfg.Breaker)
	for deadline := time.Now().Add(2 * time.Second); b.State() != coalesce.BreakerHalfOpen; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the breaker is %s 2s after it opened for %s", b.State(), cfg.Breaker.Open)
		}
	}
	status = http.StatusOK
	serve("/probe")
	serve("/closed")

	var got []string
	for _, entry := range logs.All() {
		got = append(got, entry.Level.String()+" "+entry.Message)
	}
	want := []string{
		"warn circuit breaker opened: answering for the upstream without calling it",
		"info circuit breaker half-open: probing the upstream",
		"info circuit breaker closed: the upstream answers again",
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("logged\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	opened := logs.All()[0].ContextMap()
	if opened["upstream"] != "log-test.internal:8080" || opened["consecutive_failures"] != uint32(2) || opened["failures"] != uint32(2) {
		t.Errorf("the opening line does not say which upstream and what tripped it: %v", opened)
	}
}

func TestCaddyfileBreakerTimeout(t *testing.T) {
	for input, want := range map[string]time.Duration{
		"breaker {\n timeout 750ms\n}": 750 * time.Millisecond,
		"breaker {\n timeout 0\n}":     coalesce.Off,
	} {
		h, err := parseCoalesce(t, "coalesce {\n"+input+"\n}")
		if err != nil {
			t.Fatalf("%q: %v", input, err)
		}
		if got := h.Breaker.config().Timeout; got != want {
			t.Errorf("%q: timeout %s, want %s", input, got, want)
		}
	}
	if h, _ := parseCoalesce(t, "coalesce {\n breaker {\n failures 3\n }\n}"); h.Breaker.config().Timeout != 30*time.Second {
		t.Errorf("a breaker block without timeout: %s, want the default 30s", h.Breaker.config().Timeout)
	}
	for input, want := range map[string]string{
		"breaker {\n timeout -1s\n}":             "timeout must not be negative",
		"breaker {\n timeout 2h\n}":              "timeout must be at most 1h (got 2h)",
		"breaker {\n timeout\n}":                 "timeout needs a duration, e.g. timeout 30s",
		"breaker {\n timeout 1s 2s\n}":           `timeout takes one duration, got another argument "2s"`,
		"breaker {\n timeout later\n}":           `timeout: "later" is not a duration`,
		"breaker {\n timeout 1s\n timeout 2s\n}": "timeout is given twice (first at Testfile:3)",
	} {
		if _, err := parseCoalesce(t, "coalesce {\n"+input+"\n}"); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: got %v, want an error saying %q", input, err, want)
		}
	}
	for raw, want := range map[string]time.Duration{
		`{}`:                           30 * time.Second,
		`{"breaker":{}}`:               30 * time.Second,
		`{"breaker":{"timeout":"5s"}}`: 5 * time.Second,
		`{"breaker":{"timeout":0}}`:    30 * time.Second,
		`{"breaker":{"timeout":-1}}`:   coalesce.Off,
	} {
		var h Handler
		if err := json.Unmarshal([]byte(raw), &h); err != nil {
			t.Fatal(err)
		}
		if got := h.config().Breaker.Timeout; got != want || h.Validate() != nil {
			t.Errorf("%s: timeout %s (%v), want %s", raw, got, h.Validate(), want)
		}
	}
	var h Handler
	if err := json.Unmarshal([]byte(`{"breaker":{"timeout":"2h"}}`), &h); err != nil {
		t.Fatal(err)
	}
	if err := h.Validate(); err == nil || !strings.Contains(err.Error(), "timeout must be at most 1h") {
		t.Errorf("a timeout of 2h in JSON: %v", err)
	}
}
