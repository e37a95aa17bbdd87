package tests

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// adaptAndValidate does what `caddy validate --adapter caddyfile` does: adapt
// the Caddyfile, then load and provision the JSON without starting it. It
// returns the first error.
func adaptAndValidate(t *testing.T, caddyfile string) error {
	t.Helper()
	adapter := caddyconfig.GetAdapter("caddyfile")
	if adapter == nil {
		t.Fatal("no caddyfile adapter")
	}
	out, _, err := adapter.Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return err
	}
	var cfg caddy.Config
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatalf("adapted config is not JSON: %v\n%s", err, out)
	}
	return caddy.Validate(&cfg)
}

func TestWrongCaddyfileFailsWithTheLineAndAReason(t *testing.T) {
	// The coalesce option under test is on line 4 of every case.
	const head = "{\n\tadmin off\n}\n"
	for _, c := range []struct {
		name, option string
		reason       []string // all must appear, case-insensitively
	}{
		{"ttl above the 1s maximum", "ttl 2s", []string{"ttl", "at most 1s"}},
		{"negative ttl", "ttl -1s", []string{"ttl", "negative"}},
		{"ttl that is not a duration", "ttl soon", []string{"ttl", "not a duration", "50ms"}},
		{"ttl without a value", "ttl", []string{"ttl", "needs a duration"}},
		{"unknown option", "colapse_everything on", []string{"colapse_everything", "unrecognized"}},
		{"max_body of nothing", "max_body 0", []string{"max_body", "size"}},
		{"max_entries not a number", "max_entries many", []string{"max_entries", "positive whole number"}},
		{"key_headers with a bad field name", "key_headers X-Good Bad:Header", []string{"Bad:Header", "not a valid header"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			caddyfile := head + ":8081 {\n\tcoalesce {\n\t\t" + c.option + "\n\t}\n\treverse_proxy 127.0.0.1:9\n}\n"
			// line 1 {, 2 admin off, 3 }, 4 :8081 {, 5 coalesce {, 6 option
			err := adaptAndValidate(t, caddyfile)
			if err == nil {
				t.Fatalf("%q was accepted", c.option)
			}
			msg := err.Error()
			t.Logf("%q: %s", c.option, msg)
			if !strings.Contains(msg, "Caddyfile:6") {
				t.Errorf("the error does not name the line (Caddyfile:6): %s", msg)
			}
			for _, want := range c.reason {
				if !strings.Contains(strings.ToLower(msg), strings.ToLower(want)) {
					t.Errorf("the error does not say %q: %s", want, msg)
				}
			}
		})
	}
}

func TestValidCaddyfileAdaptsAndValidates(t *testing.T) {
	caddyfile := `{
	admin off
}
:8081 {
	coalesce {
		ttl 1s
		stale 2s
		stale_if_error 1m
		max_wait 5s
		max_body 2MiB
		max_entries 100
		max_memory 16MiB
		key_headers X-Tenant
	}
	reverse_proxy 127.0.0.1:9
}
:8082 {
	coalesce
	reverse_proxy 127.0.0.1:9
}
`
	if err := adaptAndValidate(t, caddyfile); err != nil {
		t.Fatalf("a valid Caddyfile was refused: %v", err)
	}
}
