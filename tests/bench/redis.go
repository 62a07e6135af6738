package main

import (
	"fmt"
	"path/filepath"

	"github.com/caddy-progress/progress/tests/internal/redisrun"
)

// With -store redis the harness starts Debian's redis-server (tests/internal/redisrun: a free
// loopback port, the append-only file fsynced on every write, so a 202 means what it means
// with the bbolt file: the job is on disk), and gives Caddy `store redis://…`. The
// -write figures stay those of the bbolt store.

// startRedis starts the redis-server and sets the store location to its URL.
func (h *harness) startRedis() error {
	s, err := redisrun.Start(filepath.Join(h.dir, "redis"), "always")
	if err != nil {
		return fmt.Errorf("-store redis: %w", err)
	}
	h.redis = s.Proc
	h.storeURL = s.URL()
	h.logf("# redis-server (pid %d) on %s, appendonly yes, appendfsync always: %s", s.PID(), s.Addr, s.Version)
	return nil
}

// storeLocation is what the Caddyfile's `store` names.
func (h *harness) storeLocation() string {
	if h.storeURL != "" {
		return h.storeURL
	}
	return h.storePath
}
