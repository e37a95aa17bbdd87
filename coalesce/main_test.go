package coalesce

import (
	"testing"
	"time"

	"go.uber.org/goleak"
)

// The engine starts goroutines (background refreshes, the registry's
// context watches): every test must leave none behind. Tests that build an
// engine call Close in a cleanup, which waits for refreshes.
func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// bound is how long a test waits for something that should be prompt. It is
// generous so that a loaded CI machine under -race does not fail the test.
const bound = 2 * time.Second
