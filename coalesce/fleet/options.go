package fleet

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// Options configure a Tier. Zero fields take their defaults.
type Options struct {
	// URL is redis://[user:password@]host:port[/db], or rediss:// for TLS.
	URL string
	// Prefix starts every Redis key and channel. "": "coalesce:".
	Prefix string
	// Timeout bounds each Redis operation. 0: 50ms.
	Timeout time.Duration
	// Zone keeps apart the keys of handlers that must not share entries;
	// every server of the fleet must give the same handler the same zone.
	Zone string
	// OnState is told each change of the tier's state, once per change
	// (not for every failed operation). nil: nobody.
	OnState func(State, error)
	// OnBreakerOpen is told when any server of the fleet opened the breaker
	// of upstream until the given time (this server included).
	OnBreakerOpen func(upstream string, until time.Time)
}

// DefaultPrefix and DefaultTimeout are the defaults of Options.
const (
	DefaultPrefix  = "coalesce:"
	DefaultTimeout = 50 * time.Millisecond
)

// MaxTimeout is the longest timeout allowed: a request may wait for Redis
// this long before its server acts alone.
const MaxTimeout = 10 * time.Second

// Validate explains what is wrong with o, in words for an operator.
func (o Options) Validate() error {
	if _, err := ParseURL(o.URL); err != nil {
		return err
	}
	if o.Timeout < 0 || (o.Timeout > 0 && o.Timeout < time.Millisecond) || o.Timeout > MaxTimeout {
		return fmt.Errorf("shared: timeout is the longest one Redis operation may take, from 1ms to %s (got %s); default 50ms", MaxTimeout, o.Timeout)
	}
	if strings.ContainsAny(o.Prefix, " \t\r\n") {
		return fmt.Errorf("shared: prefix %q must not contain white space", o.Prefix)
	}
	return nil
}

// ParseURL parses a redis:// or rediss:// URL, and says what is wrong with
// a bad one in words for an operator.
func ParseURL(u string) (*redis.Options, error) {
	if !strings.HasPrefix(u, "redis://") && !strings.HasPrefix(u, "rediss://") {
		return nil, fmt.Errorf("shared: %q is not a Redis URL; write redis://[user:password@]host:port[/db] (rediss:// for TLS)", redact(u))
	}
	ro, err := redis.ParseURL(u)
	if err != nil {
		return nil, fmt.Errorf("shared: %q: %v", redact(u), err)
	}
	// The client dials whatever port it is given, and a port out of range
	// would only fail at the first request.
	if _, port, err := net.SplitHostPort(ro.Addr); err == nil {
		if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("shared: %q: port %q is not a port from 1 to 65535", redact(u), port)
		}
	}
	return ro, nil
}

// redact hides a URL's password.
func redact(u string) string {
	at := strings.LastIndex(u, "@")
	scheme := strings.Index(u, "://")
	if at < 0 || scheme < 0 || at < scheme {
		return u
	}
	cred := u[scheme+3 : at]
	if i := strings.Index(cred, ":"); i >= 0 {
		cred = cred[:i+1] + "xxxxx"
	}
	return u[:scheme+3] + cred + u[at:]
}
