// Package redistest runs a real redis-server for tests, on a free port of
// 127.0.0.1, stopped by its PID when the test ends.
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Server is a redis-server the test started.
type Server struct {
	t    testing.TB
	Port int
	cmd  *exec.Cmd
	dir  string
}

// Binary is the redis-server the tests run.
const Binary = "/usr/bin/redis-server"

// Start starts a redis-server on a free port and waits until it answers
// PING. The test is skipped when redis-server is not installed, unless
// COALESCE_REQUIRE_REDIS is set (as CI does), where it fails.
func Start(t testing.TB) *Server {
	t.Helper()
	if _, err := os.Stat(Binary); err != nil {
		if os.Getenv("COALESCE_REQUIRE_REDIS") != "" {
			t.Fatalf("redis-server is required: %v (apt-get install -y redis-server)", err)
		}
		t.Skipf("redis-server not installed: %v", err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	s := &Server{t: t, Port: port, dir: t.TempDir()}
	s.Restart()
	t.Cleanup(s.Stop)
	return s
}

// URL is the server's redis:// URL.
func (s *Server) URL() string { return "redis://127.0.0.1:" + strconv.Itoa(s.Port) }

// Restart starts the server again on its port (after Stop) and waits until
// it answers PING.
func (s *Server) Restart() {
	s.t.Helper()
	cmd := exec.Command(Binary, "--port", strconv.Itoa(s.Port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--dir", s.dir)
	cmd.Stdout, cmd.Stderr = nil, nil
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("starting redis-server: %v", err)
	}
	s.cmd = cmd
	deadline := time.Now().Add(10 * time.Second)
	for !s.answers() {
		if time.Now().After(deadline) {
			s.Stop()
			s.t.Fatalf("redis-server on port %d did not answer PING within 10s", s.Port)
		}
		time.Sleep(10 * time.Millisecond) // polling a process that is starting
	}
}

// answers reports whether the server answers PING now.
func (s *Server) answers() bool {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(s.Port), 200*time.Millisecond)
	if err != nil {
		return false
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(time.Second))
	if _, err := fmt.Fprint(c, "PING\r\n"); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "+PONG")
}

// Stop kills the server (SIGKILL, as a crash would) and waits for it.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
	s.cmd = nil
}
