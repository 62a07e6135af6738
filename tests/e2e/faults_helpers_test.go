package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Helpers of the fault tests (reload, upstream faults, slow clients): Caddyfiles that differ
// from the shared one, and what the kernel and the runtime say about the Caddy process.

// startCaddyWith starts a Caddy as startCaddy does, with the shared test Caddyfile changed by
// edit (see editConfig), for options caddyOptions does not have: limits read once when the
// store opens, the write timeout, a known callback secret.
func startCaddyWith(t *testing.T, opts caddyOptions, edit func(string) string) *caddyProc {
	t.Helper()
	needBinaries(t)
	dir := t.TempDir()
	c := &caddyProc{
		t: t, dir: dir,
		configPath: filepath.Join(dir, "Caddyfile"),
		storePath:  filepath.Join(dir, "progress.db"),
		admin:      "127.0.0.1:" + strconv.Itoa(freePort(t, false)),
		httpPort:   freePort(t, false),
		httpsPort:  freePort(t, true),
		closedAddr: "127.0.0.1:" + strconv.Itoa(freePort(t, false)),
	}
	if err := os.WriteFile(c.configPath, []byte(edit(c.caddyfile(opts))), 0o600); err != nil {
		t.Fatal(err)
	}
	c.start()
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			c.dumpLog()
		}
	})
	return c
}

// editConfig replaces old, which must occur exactly once in the Caddyfile, by new: a change
// of the shared Caddyfile that breaks an edit fails the test instead of testing nothing.
func editConfig(t *testing.T, config, old, new string) string {
	t.Helper()
	if n := strings.Count(config, old); n != 1 {
		t.Fatalf("the test Caddyfile has %q %d times, want once:\n%s", old, n, config)
	}
	return strings.Replace(config, old, new, 1)
}

// withGlobal adds lines to the global progress block.
func withGlobal(t *testing.T, lines ...string) func(string) string {
	return func(config string) string {
		return editConfig(t, config, "\t\tmax_wait 30s\n", "\t\tmax_wait 30s\n\t\t"+strings.Join(lines, "\n\t\t")+"\n")
	}
}

// reloadConfig writes config as the Caddyfile and runs `caddy reload`, bounded by bound; it
// returns how long the reload took.
func (c *caddyProc) reloadConfig(config string, bound time.Duration) (time.Duration, error) {
	if err := os.WriteFile(c.configPath, []byte(config), 0o600); err != nil {
		return 0, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), bound)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "reload", "--config", c.configPath, "--adapter", "caddyfile", "--address", c.admin)
	cmd.Dir = c.dir
	cmd.Env = c.env()
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	if err != nil {
		return took, fmt.Errorf("caddy reload: %v (after %v)\n%s", err, took, out)
	}
	return took, nil
}

func (c *caddyProc) pid() int { return c.cmd.Process.Pid }

// goroutineCount is the number of goroutines in Caddy; -1 if the admin endpoint does not
// answer.
func (c *caddyProc) goroutineCount() int {
	n, err := c.goroutineTotal()
	if err != nil {
		return -1
	}
	return n
}

// goroutineGroups is Caddy's goroutine profile grouped by stack (debug=1), for a report.
func (c *caddyProc) goroutineGroups() string {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.admin+"/debug/pprof/goroutine?debug=1", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "(no goroutine profile: " + err.Error() + ")"
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	return string(b)
}

// rssKiB is Caddy's resident memory (VmRSS) in KiB.
func (c *caddyProc) rssKiB(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.pid()))
	if err != nil {
		t.Fatalf("reading caddy's memory: %v", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, err := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
			if err != nil {
				t.Fatalf("VmRSS line %q: %v", line, err)
			}
			return n
		}
	}
	t.Fatal("no VmRSS in /proc/<caddy>/status")
	return 0
}

// fdCount is the number of file descriptors Caddy holds open.
func (c *caddyProc) fdCount(t *testing.T) int {
	t.Helper()
	entries, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", c.pid()))
	if err != nil {
		t.Fatalf("listing caddy's file descriptors: %v", err)
	}
	return len(entries)
}

// settle waits, polling every 100ms for at most bound, until measure() is at most want, and
// returns the last value. Used for counts that fall back once connections and goroutines
// have wound down, which nothing signals from outside the process.
func settle(bound time.Duration, want int, measure func() int) int {
	deadline := time.Now().Add(bound)
	for {
		got := measure()
		if got <= want && got >= 0 || time.Now().After(deadline) {
			return got
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// checkNoLeaks compares Caddy's goroutines and file descriptors with a baseline taken before
// the scenario, allowing for the few that come and go on their own (the admin endpoint's own
// connection, timers). Keep-alive connections to the upstream are counted apart: after a
// reload, the replaced config's reverse_proxy transport keeps the idle connections its last
// requests returned (Caddy does not close them on reload) until its idle timeout, 2 minutes
// by default. They are reported, bounded by maxUpstreamConns, and not counted as leaks.
func (c *caddyProc) checkNoLeaks(t *testing.T, name string, goroutines, fds, maxUpstreamConns int) {
	t.Helper()
	const slack = 30
	var upstreamConns int
	measure := func() int {
		total, conns := c.goroutineTally()
		upstreamConns = conns
		if total < 0 {
			return total
		}
		return total - 2*conns // a readLoop and a writeLoop each
	}
	g := settle(30*time.Second, goroutines+slack, measure)
	f := settle(30*time.Second, fds+slack+upstreamConns, func() int { return c.fdCount(t) })
	t.Logf("%s: caddy goroutines %d -> %d (besides %d idle keep-alive connections to the upstream), file descriptors %d -> %d",
		name, goroutines, g, upstreamConns, fds, f)
	if g > goroutines+slack || g < 0 {
		t.Errorf("%s: caddy has %d goroutines, %d before the scenario: a leak\n%s", name, g, goroutines, c.goroutineGroups())
	}
	if f > fds+slack+upstreamConns {
		t.Errorf("%s: caddy holds %d file descriptors, %d before the scenario (and %d upstream connections): a leak", name, f, fds, upstreamConns)
	}
	if upstreamConns > maxUpstreamConns {
		t.Errorf("%s: caddy keeps %d connections to the upstream, want at most %d", name, upstreamConns, maxUpstreamConns)
	}
}

// goroutineTally counts Caddy's goroutines, and among them the client connections of
// net/http transports (persistConn: reverse_proxy's connections to the upstream).
func (c *caddyProc) goroutineTally() (total, conns int) {
	prof := c.goroutineGroups()
	first, rest, _ := strings.Cut(prof, "\n")
	total, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(first, "goroutine profile: total")))
	if err != nil {
		return -1, 0
	}
	for _, group := range strings.Split(rest, "\n\n") {
		n, _, ok := strings.Cut(strings.TrimSpace(group), " @ ")
		count, err := strconv.Atoi(n)
		if ok && err == nil && strings.Contains(group, "net/http.(*persistConn).readLoop") {
			conns += count
		}
	}
	return total, conns
}

// durations summarizes a sample of durations.
type durations []time.Duration

func (d durations) pct(p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := append(durations(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(p/100*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func (d durations) String() string {
	r := func(x time.Duration) time.Duration { return x.Round(100 * time.Microsecond) }
	return fmt.Sprintf("n=%d p50=%v p95=%v p99=%v max=%v", len(d), r(d.pct(50)), r(d.pct(95)), r(d.pct(99)), r(d.pct(100)))
}
