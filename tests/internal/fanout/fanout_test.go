package fanout

import (
	"os"
	"path/filepath"
	"testing"
	"time"

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

func TestSmokeCaddy(t *testing.T) { smokeCaddy(t, "h2") }

// TestSmokeCaddyH3 runs the same over HTTP/3 (quic-go's client against Caddy's h3).
func TestSmokeCaddyH3(t *testing.T) { smokeCaddy(t, "h3") }

func smokeCaddy(t *testing.T, proto string) {
	if testing.Short() {
		t.Skip("builds Caddy; skipped with -short")
	}
	defer child.StopAll()
	root, err := moduleRoot()
	if err != nil {
		t.Skip(err)
	}
	dir := t.TempDir()
	bin, err := buildCaddy(root, filepath.Join(dir, "bin"))
	if err != nil {
		t.Fatal(err)
	}
	up, err := startUpstream()
	if err != nil {
		t.Fatal(err)
	}
	c, err := startCaddy(bin, dir, up, proto == "h3")
	if err != nil {
		up.Close()
		t.Fatal(err)
	}
	o := smokeOpts()
	o.proto = proto
	o.ours[c.pid()] = "caddy"
	r, err := measure(t.Context(), c, smokeShape, o)
	up.Close()
	c.close()
	if err != nil {
		t.Fatal(err)
	}
	checkSmoke(t, r)
	if lines := c.ErrorLines(); len(lines) > 0 {
		t.Errorf("caddy logged %d errors, first: %s", len(lines), lines[0])
	}
}
