package tests

import (
	"regexp"
	"strings"
	"testing"
)

// Every value `caddy validate` must refuse, beyond the ones
// TestWrongCaddyfileFailsWithTheLineAndAReason covers: the error names the
// file and line, says what is wrong, and says what to write instead.
func TestBadConfigFailsValidateWithTheLineAndWhatToDo(t *testing.T) {
	for _, c := range []struct {
		name      string
		directive string // the coalesce line; default "coalesce {"
		option    string // line 6, inside the coalesce block
		proxy     string // line 9, inside the reverse_proxy block
		line      string
		says      []string // what is wrong: all must appear, case-insensitively
		advice    []string // what to do instead: one must appear
	}{
		// Durations: negative, huge, over their limits.
		{name: "negative stale", option: "stale -1s", line: "Caddyfile:6", says: []string{"stale", "negative"}, advice: []string{"write 0 or a positive duration"}},
		{name: "negative max_wait", option: "max_wait -5s", line: "Caddyfile:6", says: []string{"max_wait", "negative"}, advice: []string{"write 0 or a positive duration"}},
		{name: "negative hit_for_miss", option: "hit_for_miss -1ms", line: "Caddyfile:6", says: []string{"hit_for_miss", "negative"}, advice: []string{"write 0 or a positive duration"}},
		{name: "duration that overflows", option: "max_wait 9999999999h", line: "Caddyfile:6", says: []string{"max_wait", "not a duration"}, advice: []string{"write e.g."}},
		{name: "ttl of a day", option: "ttl 24h", line: "Caddyfile:6", says: []string{"ttl", "at most 1s"}, advice: []string{"use a real cache"}},
		{name: "stale over its limit", option: "stale 2h", line: "Caddyfile:6", says: []string{"stale", "at most 1h"}, advice: []string{"write"}},
		{name: "stale_if_error over its limit", option: "stale_if_error 48h", line: "Caddyfile:6", says: []string{"stale_if_error", "at most 24h"}, advice: []string{"write"}},
		{name: "huge max_wait", option: "max_wait 100000h", line: "Caddyfile:6", says: []string{"max_wait", "at most 1h"}, advice: []string{"0 for no bound"}},
		{name: "huge hit_for_miss", option: "hit_for_miss 8760h", line: "Caddyfile:6", says: []string{"hit_for_miss", "at most 1h"}, advice: []string{"write"}},
		// Sizes.
		{name: "negative max_body", option: "max_body -1", line: "Caddyfile:6", says: []string{"max_body", "-1"}, advice: []string{"write e.g."}},
		{name: "max_memory with an unknown unit", option: "max_memory 64XB", line: "Caddyfile:6", says: []string{"max_memory", "64XB"}, advice: []string{"write e.g."}},
		{name: "max_memory of two terabytes", option: "max_memory 2TiB", line: "Caddyfile:6", says: []string{"max_memory", "1TiB"}, advice: []string{"write e.g."}},
		{name: "max_flight_memory with an unknown unit", option: "max_flight_memory 32XB", line: "Caddyfile:6", says: []string{"max_flight_memory", "32XB"}, advice: []string{"write e.g."}},
		{name: "max_flight_memory below max_body", option: "max_body 4MiB\n\t\tmax_flight_memory 1MiB", line: "Caddyfile:7", says: []string{"max_flight_memory", "smaller than max_body"}, advice: []string{"write at least max_body"}},
		// hot_key_rate.
		{name: "hot_key_rate without a window", option: "hot_key_rate 20", line: "Caddyfile:6", says: []string{"hot_key_rate", "requests per duration"}, advice: []string{"e.g. 20/1m"}},
		{name: "hot_key_rate of no requests", option: "hot_key_rate 0/1m", line: "Caddyfile:6", says: []string{"hot_key_rate", "positive number"}, advice: []string{"write e.g. 20/1m"}},
		{name: "hot_key_rate over a day", option: "hot_key_rate 20/24h", line: "Caddyfile:6", says: []string{"hot_key_rate", "window"}, advice: []string{"write e.g. 20/1m"}},
		// Counts.
		{name: "max_entries of 0", option: "max_entries 0", line: "Caddyfile:6", says: []string{"max_entries", `"0"`}, advice: []string{"must be a positive whole number"}},
		{name: "negative max_flights", option: "max_flights -3", line: "Caddyfile:6", says: []string{"max_flights", `"-3"`}, advice: []string{"must be a positive whole number"}},
		{name: "max_flights in scientific notation", option: "max_flights 1e3", line: "Caddyfile:6", says: []string{"max_flights", `"1e3"`}, advice: []string{"must be a positive whole number"}},
		{name: "max_entries beyond any integer", option: "max_entries 99999999999999999999", line: "Caddyfile:6", says: []string{"max_entries"}, advice: []string{"must be a positive whole number"}},
		// Arguments where none, one or some are expected.
		{name: "argument on the directive line", directive: "coalesce extra {", line: "Caddyfile:5", says: []string{"extra"}, advice: []string{"put options in a block"}},
		{name: "two durations", option: "ttl 1s 2s", line: "Caddyfile:6", says: []string{"ttl", `"2s"`}, advice: []string{"remove"}},
		{name: "two sizes", option: "max_body 1MiB 2MiB", line: "Caddyfile:6", says: []string{"max_body", `"2MiB"`}, advice: []string{"remove"}},
		{name: "two counts", option: "max_entries 5 6", line: "Caddyfile:6", says: []string{"max_entries", `"6"`}, advice: []string{"remove"}},
		{name: "public with a value", option: "public yes", line: "Caddyfile:6", says: []string{"public", `"yes"`}, advice: []string{"write just `public`"}},
		{name: "zone without a name", option: "zone", line: "Caddyfile:6", says: []string{"zone", "name"}, advice: []string{"e.g."}},
		{name: "zone with two names", option: "zone a b", line: "Caddyfile:6", says: []string{"zone", `"b"`}, advice: []string{"one name"}},
		{name: "key_headers without a field", option: "key_headers", line: "Caddyfile:6", says: []string{"key_headers", "at least one"}, advice: []string{"e.g."}},
		{name: "identity_headers with a bad field name", option: `identity_headers "X Api Key"`, line: "Caddyfile:6", says: []string{"X Api Key", "not a valid header"}, advice: []string{"write a header name such as"}},
		// Unknown options.
		{name: "misspelt option", option: "ttll 50ms", line: "Caddyfile:6", says: []string{"ttll", "unrecognized"}, advice: []string{"ttl, stale"}},
		{name: "option of another module", option: "lb_policy round_robin", line: "Caddyfile:6", says: []string{"lb_policy", "unrecognized"}, advice: []string{"ttl, stale"}},
		// The breaker.
		{name: "breaker status below 100", option: "breaker {\n\t\t\tstatus 99 502\n\t\t}", line: "Caddyfile:7", says: []string{"status", `"99"`}, advice: []string{"between 100 and 599"}},
		{name: "breaker status above 599", option: "breaker {\n\t\t\tstatus 502 600\n\t\t}", line: "Caddyfile:7", says: []string{"status", `"600"`}, advice: []string{"between 100 and 599"}},
		{name: "breaker ratio above 1", option: "breaker {\n\t\t\tratio 1.5\n\t\t}", line: "Caddyfile:7", says: []string{"ratio", `"1.5"`}, advice: []string{"e.g. 0.5"}},
		{name: "negative breaker ratio", option: "breaker {\n\t\t\tratio -0.1\n\t\t}", line: "Caddyfile:7", says: []string{"ratio", `"-0.1"`}, advice: []string{"e.g. 0.5"}},
		{name: "breaker ratio that is not a number", option: "breaker {\n\t\t\tratio half\n\t\t}", line: "Caddyfile:7", says: []string{"ratio", `"half"`}, advice: []string{"e.g. 0.5"}},
		{name: "zero breaker failures", option: "breaker {\n\t\t\tfailures 0\n\t\t}", line: "Caddyfile:7", says: []string{"failures", `"0"`}, advice: []string{"must be a positive whole number"}},
		{name: "negative breaker timeout", option: "breaker {\n\t\t\ttimeout -1s\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", "negative"}, advice: []string{"write 0 or a positive duration"}},
		{name: "breaker timeout that is not a duration", option: "breaker {\n\t\t\ttimeout soon\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", `"soon"`, "not a duration"}, advice: []string{"write e.g."}},
		{name: "breaker timeout without a value", option: "breaker {\n\t\t\ttimeout\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", "needs a duration"}, advice: []string{"e.g. timeout 30s"}},
		{name: "breaker timeout of a day", option: "breaker {\n\t\t\ttimeout 24h\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", "at most 1h"}, advice: []string{"0 to turn it off"}},
		{name: "breaker timeout with two values", option: "breaker {\n\t\t\ttimeout 1s 2s\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", `"2s"`}, advice: []string{"remove"}},
		// lb_policy breaker.
		{name: "unknown inner lb_policy", option: "ttl 50ms", proxy: "lb_policy breaker round_robbin", line: "Caddyfile:9", says: []string{"round_robbin", "unknown"}, advice: []string{"round_robin"}},
		{name: "breaker inside breaker", option: "ttl 50ms", proxy: "lb_policy breaker breaker", line: "Caddyfile:9", says: []string{"breaker", "cannot be breaker again"}, advice: []string{"e.g.", "lb_policy breaker round_robin"}},
		{name: "inner lb_policy missing its argument", option: "ttl 50ms", proxy: "lb_policy breaker header", line: "Caddyfile:9", says: []string{"lb_policy breaker header", "wrong argument count"}, advice: []string{"e.g. lb_policy breaker header X-User-Id"}},
		{name: "inner lb_policy with an extra argument", option: "ttl 50ms", proxy: "lb_policy breaker round_robin extra", line: "Caddyfile:9", says: []string{"lb_policy breaker round_robin", "extra"}, advice: []string{"e.g. lb_policy breaker round_robin"}},
		{name: "inner lb_policy with a bad fallback", option: "ttl 50ms", proxy: "lb_policy breaker header X-Up {\n\t\t\tfallback nonsense\n\t\t}", line: "Caddyfile:10", says: []string{"lb_policy breaker header", "nonsense"}, advice: []string{"the form is e.g."}},
		// shared.
		{name: "shared without a URL", option: "shared", line: "Caddyfile:6", says: []string{"shared", "Redis URL"}, advice: []string{"e.g. shared redis://"}},
		{name: "shared with an http URL", option: "shared http://app:hunter2@10.0.0.5:6379", line: "Caddyfile:6", says: []string{"not a Redis URL", "xxxxx"}, advice: []string{"write redis://"}},
		{name: "shared with a bad database", option: "shared redis://127.0.0.1:6379/x", line: "Caddyfile:6", says: []string{"database"}, advice: []string{"redis://127.0.0.1:6379/x"}},
		{name: "shared timeout of a minute", option: "shared redis://127.0.0.1:6379 {\n\t\t\ttimeout 1m\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", "1m0s"}, advice: []string{"from 1ms to 10s"}},
		{name: "shared timeout below a millisecond", option: "shared redis://127.0.0.1:6379 {\n\t\t\ttimeout 500us\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", "500µs"}, advice: []string{"from 1ms to 10s"}},
		{name: "shared URL with a port out of range", option: "shared redis://127.0.0.1:99999", line: "Caddyfile:6", says: []string{"port", "99999"}, advice: []string{"from 1 to 65535"}},
		{name: "shared timeout of 0", option: "shared redis://127.0.0.1:6379 {\n\t\t\ttimeout 0\n\t\t}", line: "Caddyfile:7", says: []string{"timeout", "positive"}, advice: []string{"e.g. timeout 50ms"}},
		{name: "shared option misspelt", option: "shared redis://127.0.0.1:6379 {\n\t\t\tprefx a:\n\t\t}", line: "Caddyfile:7", says: []string{"prefx", "unrecognized"}, advice: []string{"prefix and timeout"}},
		// sse.
		{name: "sse with an argument", option: "sse on", line: "Caddyfile:6", says: []string{"sse", `"on"`}, advice: []string{"e.g. sse { replay 256 }"}},
		{name: "sse buffer of 0", option: "sse {\n\t\t\tbuffer 0\n\t\t}", line: "Caddyfile:7", says: []string{"buffer", `"0"`}, advice: []string{"at least 1"}},
		{name: "negative sse replay", option: "sse {\n\t\t\treplay -5\n\t\t}", line: "Caddyfile:7", says: []string{"replay", `"-5"`}, advice: []string{"at least 0"}},
		{name: "huge sse replay", option: "sse {\n\t\t\treplay 10000000\n\t\t}", line: "Caddyfile:7", says: []string{"replay", "at most 100000"}, advice: []string{"at most"}},
		{name: "sse heartbeat too short", option: "sse {\n\t\t\theartbeat 1ms\n\t\t}", line: "Caddyfile:7", says: []string{"heartbeat", "1ms"}, advice: []string{"0 (off) or from 100ms"}},
		{name: "sse linger too long", option: "sse {\n\t\t\tlinger 1h\n\t\t}", line: "Caddyfile:7", says: []string{"linger", "at most 10m"}, advice: []string{"at most"}},
		{name: "misspelt sse option", option: "sse {\n\t\t\treplays 5\n\t\t}", line: "Caddyfile:7", says: []string{"replays", "unrecognized"}, advice: []string{"replay, buffer, linger"}},
		{name: "sse option given twice", option: "sse {\n\t\t\tbuffer 8\n\t\t\tbuffer 9\n\t\t}", line: "Caddyfile:8", says: []string{"buffer", "given twice"}, advice: []string{"keep one of them"}},
		// Options given twice.
		{name: "ttl given twice", option: "ttl 50ms\n\t\tttl 100ms", line: "Caddyfile:7", says: []string{"ttl", "given twice", "Caddyfile:6"}, advice: []string{"keep one of them"}},
		{name: "breaker open of 0", option: "breaker {\n\t\t\topen 0s\n\t\t}", line: "Caddyfile:7", says: []string{"open", "positive duration"}, advice: []string{"e.g. open 10s"}},
		{name: "negative breaker open", option: "breaker {\n\t\t\topen -1s\n\t\t}", line: "Caddyfile:7", says: []string{"open", "positive duration", "-1s"}, advice: []string{"e.g. open 10s"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			directive := c.directive
			if directive == "" {
				directive = "coalesce {"
			}
			// line 1 {, 2 admin off, 3 }, 4 :8081 {, 5 coalesce {, 6 option,
			// 7 }, 8 reverse_proxy {, 9 proxy option (lines shift when the
			// option spans several)
			caddyfile := "{\n\tadmin off\n}\n:8081 {\n\t" + directive + "\n\t\t" + c.option + "\n\t}\n\treverse_proxy 127.0.0.1:9 127.0.0.1:10 {\n\t\t" + c.proxy + "\n\t}\n}\n"
			err := adaptAndValidate(t, caddyfile)
			if err == nil {
				t.Fatalf("accepted:\n%s", caddyfile)
			}
			msg := err.Error()
			t.Logf("%s", msg)
			if !regexp.MustCompile(regexp.QuoteMeta(c.line) + `(\D|$)`).MatchString(msg) {
				t.Errorf("the error does not name the line (%s): %s", c.line, msg)
			}
			lower := strings.ToLower(msg)
			for _, want := range c.says {
				if !strings.Contains(lower, strings.ToLower(want)) {
					t.Errorf("the error does not say %q: %s", want, msg)
				}
			}
			advised := false
			for _, a := range c.advice {
				advised = advised || strings.Contains(lower, strings.ToLower(a))
			}
			if !advised {
				t.Errorf("the error does not say what to do (%q): %s", c.advice, msg)
			}
		})
	}
}
