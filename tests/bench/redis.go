package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-progress/progress/store/redisstore/redistest"
	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
)

// With -store redis the harness starts Debian's redis-server on a free loopback port, with
// its append-only file fsynced on every write (appendfsync always, so a 202 means what it
// means with the bbolt file: the job is on disk), and gives Caddy `store redis://…`. The
// -write figures stay those of the bbolt store.

// startRedis starts the redis-server and sets the store location to its URL.
func (h *harness) startRedis() error {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return errors.New("-store redis needs redis-server on PATH (apt-get install redis-server)")
	}
	ports, err := caddyrun.FreePorts(1)
	if err != nil {
		return err
	}
	dir := filepath.Join(h.dir, "redis")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	port := strconv.Itoa(ports[0])
	p, err := child.Start("redis", bin, []string{"--port", port, "--bind", "127.0.0.1", "--dir", dir,
		"--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"},
		os.Environ(), dir, io.Discard, os.Stderr, nil)
	if err != nil {
		return err
	}
	h.redis = p
	addr := "127.0.0.1:" + port
	deadline := time.Now().Add(30 * time.Second)
	for !redistest.Ping(addr) {
		if p.Exited() {
			return errors.New("redis-server exited at once")
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on %s not ready within 30s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	h.storeURL = "redis://" + addr + "/0"
	out, _ := exec.Command(bin, "--version").Output()
	h.logf("# redis-server (pid %d) on %s, appendonly yes, appendfsync always: %s", p.PID(), addr, strings.TrimSpace(string(out)))
	return nil
}

// storeLocation is what the Caddyfile's `store` names.
func (h *harness) storeLocation() string {
	if h.storeURL != "" {
		return h.storeURL
	}
	return h.storePath
}
