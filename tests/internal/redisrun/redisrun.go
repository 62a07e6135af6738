// Package redisrun starts Debian's redis-server for the benchmark harnesses (tests/bench,
// tests/latency) as a child process (tests/internal/child, so it goes with the harness): on a
// free loopback port, its data in a folder of its own, the append-only file fsynced on every
// write by default (appendfsync always, so a 202 or a 204 means what it means with the bbolt
// file: on disk; everysec on request, to measure what that fsync costs). Tests use store/redisstore/redistest instead, which ties the server to a testing.TB.
package redisrun

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-progress/progress/store/redisstore/redistest"
	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
)

// ErrNoServer is returned when redis-server is not on the PATH.
var ErrNoServer = errors.New("redis-server not found on PATH (apt-get install redis-server)")

// Server is one running redis-server.
type Server struct {
	Proc    *child.Proc
	Addr    string // 127.0.0.1:port
	Version string // what `redis-server --version` says
}

// Start starts redis-server with its data in dir (created if missing) and returns once it
// answers PING. appendfsync is Redis's setting of that name: "always" (also for ""),
// "everysec" or "no".
func Start(dir, appendfsync string) (*Server, error) {
	switch appendfsync {
	case "":
		appendfsync = "always"
	case "always", "everysec", "no":
	default:
		return nil, fmt.Errorf("redisrun: appendfsync %q: want always, everysec or no", appendfsync)
	}
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return nil, ErrNoServer
	}
	ports, err := caddyrun.FreePorts(1)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	port := strconv.Itoa(ports[0])
	p, err := child.Start("redis", bin, []string{"--port", port, "--bind", "127.0.0.1", "--dir", dir,
		"--appendonly", "yes", "--appendfsync", appendfsync, "--save", "", "--maxmemory-policy", "noeviction"},
		os.Environ(), dir, io.Discard, os.Stderr, nil)
	if err != nil {
		return nil, err
	}
	s := &Server{Proc: p, Addr: "127.0.0.1:" + port}
	deadline := time.Now().Add(30 * time.Second)
	for !redistest.Ping(s.Addr) {
		if p.Exited() {
			return nil, errors.New("redis-server exited at once")
		}
		if time.Now().After(deadline) {
			p.Stop(5 * time.Second)
			return nil, fmt.Errorf("redis-server on %s not ready within 30s", s.Addr)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
	out, _ := exec.Command(bin, "--version").Output()
	s.Version = strings.TrimSpace(string(out))
	return s, nil
}

// URL is the store URL of the server (database 0), for `progress { store … }`.
func (s *Server) URL() string { return "redis://" + s.Addr + "/0" }

// PID is the server's process id.
func (s *Server) PID() int { return s.Proc.PID() }

// Close stops the server.
func (s *Server) Close() { s.Proc.Stop(5 * time.Second) }
