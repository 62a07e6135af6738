package fanout

import (
	"fmt"
	"io"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
)

// The heavy measurement is the program itself (go run ./tests/latency, or ./xcaddy.sh
// bench-latency); these smoke tests run the same code on a small shape, so `go test ./...`
// stays quick and notices when the harness breaks: every report must reach every watcher with a
// sane latency and nothing unmatched.

var smokeShape = shape{jobs: 5, watchers: 2, rate: 5}

func smokeOpts() runOpts {
	return runOpts{warmup: 500 * time.Millisecond, window: 2 * time.Second, streamsPerConn: 4,
		ours: map[int]string{os.Getpid(): "harness"}}
}

func checkSmoke(t *testing.T, r *result) {
	t.Helper()
	expected := r.sent * int64(r.shape.watchers)
	t.Logf("%s: %d reports, %d/%d deliveries, p50 %s ms, max %s ms, 204 p50 %s ms",
		r.target, r.sent, len(r.lat), expected, ms(pct(r.lat, .5)), ms(pct(r.lat, 1)), ms(pct(r.ack, .5)))
	// 5 jobs × 5 reports/s over a 2 s window is about 50 reports, but how many go out depends
	// on how busy the machine is (rates are the benchmark's to measure, not this test's): every
	// job must have reported, and every report sent must have been acknowledged.
	if r.sent < int64(r.shape.jobs) || r.acked != r.sent || r.cbErrors != 0 {
		t.Errorf("reports: %d sent, %d acknowledged, %d errors (%s)", r.sent, r.acked, r.cbErrors, r.firstErr)
	}
	// A watcher that falls behind gets the newest document (progress is state), so a few
	// deliveries may be skipped on a busy machine; some must arrive, none unmatched.
	if len(r.lat) == 0 || int64(len(r.lat)) > expected {
		t.Errorf("deliveries: %d, expected up to %d", len(r.lat), expected)
	}
	if r.unmatched != 0 || r.subErrors != 0 {
		t.Errorf("%d unmatched events, %d subscriber errors (%s)", r.unmatched, r.subErrors, r.firstErr)
	}
	if p50, top := pct(r.lat, .5), pct(r.lat, 1); p50 <= 0 || p50 > int64(2*time.Second) || top > int64(10*time.Second) {
		t.Errorf("latencies not sane: p50 %s ms, max %s ms", ms(p50), ms(top))
	}
}

func TestSmokeHub(t *testing.T) {
	h, err := startHubInProcess()
	if err != nil {
		t.Fatal(err)
	}
	defer h.close()
	r, err := measure(t.Context(), h, smokeShape, smokeOpts())
	if err != nil {
		t.Fatal(err)
	}
	checkSmoke(t, r)
}

func TestSmokeCaddy(t *testing.T) { smokeCaddy(t, "h2", observeDefault) }

// TestSmokeCaddyH3 runs the same over HTTP/3 (quic-go's client against Caddy's h3).
func TestSmokeCaddyH3(t *testing.T) { smokeCaddy(t, "h3", observeDefault) }

// TestSmokeCaddyObserveOn runs the same with `tracing` on both sites: Caddy must export the
// spans to the harness's OTLP sink (the overhead comparison of issue #5 measures a real export).
func TestSmokeCaddyObserveOn(t *testing.T) { smokeCaddy(t, "h2", observeOn) }

// TestSmokeCaddyObserveOff runs the same with `metrics off`: no caddy_progress_ metrics.
func TestSmokeCaddyObserveOff(t *testing.T) { smokeCaddy(t, "h2", observeOff) }

// smokeSetup builds Caddy and starts the upstream; every child process stops when the test
// ends.
func smokeSetup(t *testing.T) (bin, dir string, up *caddyrun.Upstream) {
	if testing.Short() {
		t.Skip("builds Caddy; skipped with -short")
	}
	root, err := moduleRoot()
	if err != nil {
		t.Skip(err)
	}
	dir = t.TempDir()
	t.Cleanup(child.StopAll) // before the folder goes (cleanups run last first)
	if bin, err = buildCaddy(root, filepath.Join(dir, "bin")); err != nil {
		t.Fatal(err)
	}
	if up, err = startUpstream(); err != nil {
		t.Fatal(err)
	}
	return bin, dir, up
}

func smokeCaddy(t *testing.T, proto, observe string) {
	bin, dir, up := smokeSetup(t)
	c, err := startCaddy(bin, dir, up, proto == "h3", observe)
	if err != nil {
		up.Close()
		t.Fatal(err)
	}
	o := smokeOpts()
	o.proto = proto
	o.ours[c.pid()] = "caddy"
	r, err := measure(t.Context(), c, smokeShape, o)
	metrics, merr := adminMetrics(c.Admin)
	up.Close()
	c.close()
	if err != nil {
		t.Fatal(err)
	}
	checkSmoke(t, r)
	if merr != nil {
		t.Fatal(merr)
	}
	if has := strings.Contains(metrics, "caddy_progress_jobs_created_total"); has != (observe != observeOff) {
		t.Errorf("observe %q: /metrics has caddy_progress_jobs_created_total: %v", observe, has)
	}
	if c.sink != nil {
		// Caddy exports its last batch when it stops (close above).
		if reqs, n := c.sink.Counts(); reqs == 0 || n == 0 {
			t.Errorf("the OTLP sink received %d exports (%d bytes): Caddy's tracing exported nothing", reqs, n)
		}
	}
	if lines := c.ErrorLines(); len(lines) > 0 {
		t.Errorf("caddy logged %d errors, first: %s", len(lines), lines[0])
	}
}

// adminMetrics reads Caddy's admin /metrics.
func adminMetrics(admin string) (string, error) {
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = fmt.Errorf("GET /metrics: %s", resp.Status)
	}
	return string(b), err
}

func TestObserveRatios(t *testing.T) {
	sh := shape{jobs: 10, watchers: 2, rate: 1}
	mk := func(target string, lat ...int64) *result {
		return &result{target: target, shape: sh, window: 2 * time.Second, lat: lat, sent: int64(len(lat)) / 2, otlpExports: 3}
	}
	all := []*result{
		mk("caddy-off", 100, 200, 300, 1000), mk("caddy-on", 110, 220, 330, 1100), mk("hub", 1, 2),
		mk("caddy-off", 100, 200, 300, 3000), mk("caddy-on", 120, 240, 360, 900),
		mk("caddy-on/h3", 5, 6),
	}
	got := observeRatios(all)
	if len(got) != 1 {
		t.Fatalf("%d ratios, want 1 (h3 has no caddy-off to compare with): %+v", len(got), got)
	}
	o := got[0]
	// The percentiles follow samples.Pct.
	offP50 := time.Duration(pct([]int64{100, 200, 300, 1000}, .5))
	onP50a, onP50b := time.Duration(pct([]int64{110, 220, 330, 1100}, .5)), time.Duration(pct([]int64{120, 240, 360, 900}, .5))
	if o.Rounds != 2 || o.MedOffP50 != offP50 || o.MedOnP50 != (onP50a+onP50b)/2 {
		t.Errorf("rounds %d, p50 off %v on %v; want 2, %v, %v", o.Rounds, o.MedOffP50, o.MedOnP50, offP50, (onP50a+onP50b)/2)
	}
	if want := float64(o.MedOnP50) / float64(o.MedOffP50); o.RatioP50 != want || want <= 1 {
		t.Errorf("p50 ratio %v, want %v (> 1)", o.RatioP50, want)
	}
	if o.MedOffRate != 1 || o.MedOnRate != 1 || o.RatioRate != 1 || o.Offered != 10 {
		t.Errorf("reports/s off %v on %v (ratio %v) of %v offered; want 1, 1, 1, 10", o.MedOffRate, o.MedOnRate, o.RatioRate, o.Offered)
	}
	if o.OnExports != 6 || o.Delivered != 16 || o.Expected != 16 {
		t.Errorf("exports %d delivered %d expected %d; want 6, 16, 16", o.OnExports, o.Delivered, o.Expected)
	}
}

// TestSmokeCaddyRedis3 runs the fan-out of issue #8 on a small shape: three Caddys on one
// redis-server, jobs made on A, each job's three watchers on A, B and C, callbacks to C.
func TestSmokeCaddyRedis3(t *testing.T) {
	if testing.Short() {
		t.Skip("builds Caddy; skipped with -short")
	}
	if _, err := exec.LookPath("redis-server"); err != nil {
		msg := "redis-server not found: install Debian's redis-server (apt-get install redis-server) to run the Redis fan-out smoke test"
		if os.Getenv("CI") == "true" {
			t.Fatal(msg)
		}
		t.Skip("SKIPPED LOUDLY: " + msg)
	}
	bin, dir, up := smokeSetup(t)
	tg, err := startRedis3(bin, dir, up, false, "always")
	if err != nil {
		up.Close()
		t.Fatal(err)
	}
	o := smokeOpts()
	o.window = 3 * time.Second
	o.proto = "h2"
	maps.Copy(o.ours, tg.parts())
	sh := shape{jobs: 10, watchers: 3, rate: 2}
	r, err := measure(t.Context(), tg, sh, o)
	up.Close()
	tg.close()
	if err != nil {
		t.Fatal(err)
	}
	checkSmoke(t, r)
	// Every job has one watcher on each of A, B and C, and its reports go to C: if they did not
	// cross instances through Redis, at most a third of the deliveries would arrive.
	if expected := r.sent * int64(sh.watchers); int64(len(r.lat))*3 <= expected*2 {
		t.Errorf("deliveries: %d of %d expected; the instances other than C delivered too few", len(r.lat), expected)
	}
	// The target's CPU is that of its four processes together (each alone may be under the
	// clock tick in so short a window).
	if len(r.cpuParts) != 4 || r.targetCPU <= 0 {
		t.Errorf("CPU %v%% of %d processes, want > 0 of 4 (redis-server, caddy A, B, C): %+v", r.targetCPU, len(r.cpuParts), r.cpuParts)
	}
	if lines := tg.errorLines(); len(lines) > 0 {
		t.Errorf("caddy logged %d errors, first: %s", len(lines), lines[0])
	}
}
