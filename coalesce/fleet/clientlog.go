package fleet

import (
	"context"
	"fmt"

	"github.com/redis/go-redis/v9"
)

// SetClientLogger sends the Redis client's own messages (a failed dial, a
// connection dropped from its pool) to log instead of the process's
// standard error, where they would bypass the server's logging. The client
// library has one logger for the whole process: the last call wins.
func SetClientLogger(log func(msg string)) {
	redis.SetLogger(clientLogger(log))
}

type clientLogger func(msg string)

func (l clientLogger) Printf(_ context.Context, format string, v ...any) {
	l(fmt.Sprintf(format, v...))
}
