package fanout

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"path/filepath"
	"strings"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/redisrun"
)

// redis3Target is the fan-out of issue #8: one redis-server (AOF, appendfsync always unless
// -redis-appendfsync says otherwise) and
// three Caddy instances A, B and C on it, sharing a callback_secret so that a token minted by
// one verifies on every one. Jobs are created on A; each job's watchers go round A, B and C
// (jobState.eventsFor), so every instance holds a third of the streams; every callback goes to
// C, so a report reaches most watchers through Redis. Its CPU is the three Caddys' and
// redis-server's together.
type redis3Target struct {
	redis *redisrun.Server
	nodes []*caddyrun.Caddy // A, B, C
}

const redis3Name = "caddy-redis3"

// startRedis3 starts redis-server in a folder under parent, then the three Caddys on it.
func startRedis3(bin, parent string, up *caddyrun.Upstream, h3 bool, appendfsync string) (*redis3Target, error) {
	rs, err := redisrun.Start(filepath.Join(parent, fmt.Sprintf("redis-%s", rand.Text()[:8])), appendfsync)
	if err != nil {
		return nil, err
	}
	t := &redis3Target{redis: rs}
	secret := make([]byte, 32)
	rand.Read(secret)
	bin, progress := splitCaddyBin(bin)
	o := caddyrun.Options{Env: []string{"GODEBUG=gctrace=1"}, HTTP3: h3, Store: rs.URL(), Servers: serverLines,
		Progress: "\t\tcallback_secret " + hex.EncodeToString(secret) + "\n" + progress}
	for range 3 {
		c, err := caddyrun.Start(bin, parent, up, o)
		if err != nil {
			t.close()
			return nil, err
		}
		t.nodes = append(t.nodes, c)
	}
	return t, nil
}

func (t *redis3Target) name() string { return redis3Name }
func (t *redis3Target) pid() int     { return t.nodes[0].PID() }

// parts labels every process whose CPU counts as the target's.
func (t *redis3Target) parts() map[int]string {
	out := map[int]string{t.redis.PID(): "redis-server"}
	for i, c := range t.nodes {
		out[c.PID()] = fmt.Sprintf("caddy %c", 'A'+i)
	}
	return out
}

func (t *redis3Target) close() {
	for _, c := range t.nodes {
		c.Close()
	}
	t.redis.Close()
}

// makeJobs creates the jobs on A, points their callbacks at C and adds B's and C's event
// streams as mirrors.
func (t *redis3Target) makeJobs(ctx context.Context, n int) ([]job, error) {
	a, c := t.nodes[0], t.nodes[len(t.nodes)-1]
	jobs, err := a.MakeJobs(ctx, n)
	if err != nil {
		return nil, err
	}
	aTLS, aCB := fmt.Sprintf("127.0.0.1:%d/", a.TLSPort), fmt.Sprintf("127.0.0.1:%d/", a.CBPort)
	for i := range jobs {
		j := &jobs[i]
		if !strings.Contains(j.Callback, aCB) || !strings.Contains(j.Events, aTLS) {
			return nil, fmt.Errorf("job %s: callback %q or events %q not on instance A", j.ID, j.Callback, j.Events)
		}
		j.Callback = strings.Replace(j.Callback, aCB, fmt.Sprintf("127.0.0.1:%d/", c.CBPort), 1)
		for _, m := range t.nodes[1:] {
			j.Mirrors = append(j.Mirrors, strings.Replace(j.Events, aTLS, fmt.Sprintf("127.0.0.1:%d/", m.TLSPort), 1))
		}
	}
	return jobs, nil
}

func (t *redis3Target) profile(ctx context.Context, seconds int, path string) error {
	n := t.profiled()
	if profileAllocs {
		return n.Allocs(ctx, seconds, path)
	}
	return n.Profile(ctx, seconds, path)
}

// profileNode names the instance that -profile and -trace look at (-profile-node).
var profileNode = "A"

// profiled is the instance -profile-node names (Main has checked it is A, B or C).
func (t *redis3Target) profiled() *caddyrun.Caddy {
	return t.nodes[strings.Index("ABC", profileNode)]
}

func (t *redis3Target) trace(ctx context.Context, seconds int, path string) error {
	return t.profiled().Trace(ctx, seconds, path)
}

// errorLines are the error lines of the three Caddys' logs, each prefixed with its instance.
func (t *redis3Target) errorLines() []string {
	var out []string
	for i, c := range t.nodes {
		for _, l := range c.ErrorLines() {
			out = append(out, fmt.Sprintf("%c: %s", 'A'+i, l))
		}
	}
	return out
}
