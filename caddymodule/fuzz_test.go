package caddymodule

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// fuzzDispenser is caddyfile.NewTestDispenser for `coalesce<rest>`, without
// its log.Fatalf on input the lexer rejects (an unterminated quote): such
// input never reaches a directive's parser, so the fuzz target skips it.
// Caddy always hands a directive's parser its own name first, hence the
// prefix.
func fuzzDispenser(rest string) (*caddyfile.Dispenser, bool) {
	tokens, err := caddyfile.Tokenize([]byte("coalesce"+rest), "Testfile")
	if err != nil || len(tokens) == 0 || tokens[0].Text != "coalesce" {
		return nil, false
	}
	return caddyfile.NewDispenser(tokens), true
}

// FuzzCaddyfile: whatever follows `coalesce`, the parser never panics;
// what it rejects is rejected with the file and line; what it accepts
// passes Validate, and survives the JSON round trip Caddy makes with it.
// Seed corpus: testdata/fuzz/FuzzCaddyfile.
func FuzzCaddyfile(f *testing.F) {
	for _, s := range []string{
		"",
		" {\n}",
		" {\n\tttl 50ms\n\tstale 1s\n\tstale_if_error 1m\n\tmax_wait 10s\n}",
		" {\n\tmax_body 1MiB\n\tmax_entries 10000\n\tmax_memory 64MiB\n\tmax_flights 100\n}",
		" {\n\tkey_headers X-Tenant Accept-Language\n\tidentity_headers X-Api-Key\n\tpublic\n\thit_for_miss 5s\n\tzone api\n}",
		" {\n\tttl 2s\n}",
		" {\n\tttl -1s\n}",
		" {\n\tmax_body 0\n}",
		" {\n\tmax_entries 99999999999999999999\n}",
		" extra {\n}",
		" {\n\tttll 1s\n}",
		" {\n\tkey_headers \"X Bad\"\n}",
		" {\n\tbreaker {\n\t\tfailures 5\n\t\tratio 0.5 min 20 window 10s\n\t\topen 10s\n\t\tprobes 1\n\t\tstatus 502 503 504\n\t}\n}",
		" {\n\tbreaker off\n}",
		" {\n\tbreaker {\n\t\tratio 1.5\n\t\tstatus 99 600\n\t}\n}",
		" {\n\tttl {\n\t}\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input string) {
		d, ok := fuzzDispenser(input)
		if !ok {
			return
		}
		h := new(Handler)
		err := h.UnmarshalCaddyfile(d)
		if err != nil {
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("error without file and line: %v", err)
			}
			return
		}
		if err := h.Validate(); err != nil {
			t.Fatalf("accepted by the parser, rejected by Validate: %v\n%s", err, input)
		}
		// Caddy stores the handler as JSON and provisions what it decodes.
		b, err := json.Marshal(h)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		var again Handler
		if err := json.Unmarshal(b, &again); err != nil {
			t.Fatalf("unmarshal %s: %v", b, err)
		}
		if err := again.Validate(); err != nil {
			t.Fatalf("after the JSON round trip Validate fails: %v\n%s", err, b)
		}
		if b2, _ := json.Marshal(&again); string(b2) != string(b) {
			t.Fatalf("JSON round trip changed the handler:\n%s\n%s", b, b2)
		}
	})
}

// FuzzLBPolicyBreaker: `lb_policy breaker<rest>` handed over as
// reverse_proxy hands it (caddyfile.UnmarshalModule: a dispenser of the
// segment from the policy's name on). The parser never panics, rejects
// with the file and line, and what it accepts provisions (inner policy
// loaded) or fails with an error, never a panic.
// Seed corpus: testdata/fuzz/FuzzLBPolicyBreaker.
func FuzzLBPolicyBreaker(f *testing.F) {
	for _, s := range []string{
		"",
		" round_robin",
		" random_choose 2",
		" header X-Upstream",
		" cookie lb secret",
		" query key",
		" first",
		" least_conn",
		" ip_hash",
		" weighted_round_robin 3 1",
		" breaker",
		" no_such_policy",
		" round_robin extra",
		" header",
		" {\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, rest string) {
		tokens, err := caddyfile.Tokenize([]byte("lb_policy breaker"+rest), "Testfile")
		if err != nil || len(tokens) < 2 || tokens[1].Text != "breaker" {
			return
		}
		d := caddyfile.NewDispenser(tokens)
		d.Next() // lb_policy, as reverse_proxy's parser consumes it
		d.NextArg()
		var s BreakerSelection
		if err := s.UnmarshalCaddyfile(d.NewFromNextSegment()); err != nil {
			if !strings.Contains(err.Error(), "Testfile:") {
				t.Fatalf("error without file and line: %v", err)
			}
			return
		}
		b, err := json.Marshal(&s)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		var again BreakerSelection
		if err := json.Unmarshal(b, &again); err != nil {
			t.Fatalf("unmarshal %s: %v", b, err)
		}
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		defer cancel()
		if err := again.Provision(ctx); err == nil && again.inner == nil {
			t.Fatalf("provisioned %s without an inner policy", b)
		}
	})
}
