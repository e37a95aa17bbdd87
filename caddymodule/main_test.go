package caddymodule

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package if any goroutine outlives its tests: handlers,
// breakers and the admin module must start nothing that a test leaves behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
