// Package redistest runs a real redis-server for tests: on a free loopback port, with its
// data in the test's temporary folder and the append-only file fsynced on every write, so
// that a restart keeps every acknowledged write.
package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Server is one redis-server process.
type Server struct {
	Addr string
	dir  string
	bin  string
	cmd  *exec.Cmd
	exit chan struct{}
	t    testing.TB
}

// Start starts a redis-server for the test and stops it when the test ends. Without
// redis-server on the PATH the test is skipped, loudly, unless CI=true, where it fails:
// CI installs it (.ci/run).
func Start(t testing.TB) *Server {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		msg := "redis-server not found: install Debian's redis-server (apt-get install redis-server) to run the Redis store tests"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip("SKIPPED LOUDLY: " + msg)
	}
	s := &Server{dir: t.TempDir(), bin: bin, t: t}
	s.Addr = "127.0.0.1:" + freePort(t)
	s.start()
	t.Cleanup(s.Stop)
	return s
}

// URL is the store URL of the server (database 0).
func (s *Server) URL() string { return "redis://" + s.Addr + "/0" }

func (s *Server) start() {
	s.t.Helper()
	_, port, _ := net.SplitHostPort(s.Addr)
	s.cmd = exec.Command(s.bin,
		"--port", port, "--bind", "127.0.0.1", "--dir", s.dir,
		"--appendonly", "yes", "--appendfsync", "always", "--save", "",
		"--daemonize", "no", "--protected-mode", "yes", "--logfile", filepath.Join(s.dir, "redis.log"))
	if err := s.cmd.Start(); err != nil {
		s.t.Fatalf("starting redis-server: %v", err)
	}
	s.exit = make(chan struct{})
	cmd, exit := s.cmd, s.exit
	go func() {
		cmd.Wait()
		close(exit)
	}()
	// Ready once it answers PING with its data loaded.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if Ping(s.Addr) {
			return
		}
		select {
		case <-exit:
			log, _ := os.ReadFile(filepath.Join(s.dir, "redis.log"))
			s.t.Fatalf("redis-server exited at start:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("redis-server on %s not ready after 30 s", s.Addr)
		}
		time.Sleep(10 * time.Millisecond) // polling a condition, with a deadline
	}
}

// Ping reports whether a redis-server answers PING on addr, within a second.
func Ping(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return false
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return err == nil && strings.HasPrefix(line, "+PONG")
}

// Stop kills the server (SIGKILL: as a crash would) and waits for it to end.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGKILL)
	<-s.exit
	s.cmd = nil
}

// Resume starts a stopped server again on the same port and data.
func (s *Server) Resume() {
	s.t.Helper()
	if s.cmd == nil {
		s.start()
	}
}

// Restart kills the server and starts it again on the same port and data: what was
// acknowledged is read back from the append-only file.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	s.start()
}

func freePort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
}
