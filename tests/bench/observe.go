package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/fanout"
)

// The observability overhead scenario (issue #5): "with tracing and metrics on, job creation
// throughput and callback-to-delivery latency stay within 5% of the same benchmark with them
// off (ratio measured in one run)".
//
// Job creation: one Caddy, site B (progress_api + progress + reverse_proxy to the instant
// upstream) loaded in turn with two configurations through the admin endpoint (POST /load; the
// store and the engine are shared across reloads, so nothing else changes):
//
//	off  the global `progress { metrics off }`, no `tracing`
//	on   metrics on (the default), `tracing` on site B
//
// Caddy always runs with OTEL_TRACES_EXPORTER=otlp, OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf
// and the endpoint of an OTLP/HTTP sink in this process (caddyrun.OTLPSink: reads, counts and
// discards every export), so "on" pays a real export of every span over loopback. The create
// load (POST with Prefer: respond-async, only 202s counted) runs off then on, -rounds times;
// the medians of 202/s and p99 are compared. After the rounds, both configurations are run once
// more with a 10 s CPU profile of Caddy.
//
// Callback-to-delivery latency: tests/internal/fanout with targets caddy-off and caddy-on (the
// same two configurations; a fresh Caddy per measurement), -obs-fan-shapes, -obs-fan-rounds.

// observeTitle is the heading of the BENCHMARKS.md section -write replaces.
const observeTitle = "## Observability overhead (issue 5)"

// The configurations compared.
const (
	observeOff = "off"
	observeOn  = "on"
)

// The target: on ÷ off within 5%.
const observeTolerance = 0.05

// observeRun is what the observe scenario keeps.
type observeRun struct {
	sink     *caddyrun.OTLPSink
	loaded   string            // the configuration Caddy runs now
	rounds   [][2]*measurement // per round: off, on
	exports  [][2]int64        // per round: span exports received while off, while on (counted at the next reload)
	metrics  [][2]bool         // per round: whether /metrics had caddy_progress_ series, off and on
	reloads  []time.Duration   // how long each POST /load took
	fanout   []fanout.ObserveRatio
	fanArgs  []string
	fanSums  []fanout.Summary
	lastLoad int64 // sink exports when the current configuration was loaded
}

// observeCaddyfile is the Caddyfile of one configuration: the create scenario's (site A for the
// readiness and sanity checks), with `metrics off` or `tracing` on site B.
func (h *harness) observeCaddyfile(mode string) string {
	metricsLine, tracing := "\t\tmetrics off\n", ""
	if mode == observeOn {
		metricsLine, tracing = "", "\ttracing\n"
		for _, opt := range h.opts.obsOnGlobal {
			metricsLine += "\t\t" + opt + "\n"
		}
	}
	return h.benchCaddyfile(metricsLine, tracing)
}

// loadObserve loads configuration mode into the running Caddy (admin POST /load), waits until
// site B answers, and checks that /metrics has the plugin's series exactly when mode is on.
func (h *harness) loadObserve(mode string) (hasMetrics bool, err error) {
	o := h.observe
	if o.loaded == mode {
		return h.hasProgressMetrics()
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+h.admin+"/load", strings.NewReader(h.observeCaddyfile(mode)))
	req.Header.Set("Content-Type", "text/caddyfile")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return false, fmt.Errorf("loading %q: %w", mode, err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("loading %q: %s %s", mode, resp.Status, bytes.TrimSpace(b))
	}
	o.reloads = append(o.reloads, time.Since(start))
	o.loaded = mode
	c := h.client()
	defer c.CloseIdleConnections()
	if _, err := h.createOne(c); err != nil {
		return false, fmt.Errorf("after loading %q: %w", mode, err)
	}
	has, err := h.hasProgressMetrics()
	if err != nil {
		return false, err
	}
	if want := mode == observeOn && !slices.Contains(h.opts.obsOnGlobal, "metrics off"); has != want {
		return false, fmt.Errorf("after loading %q, admin /metrics has caddy_progress_jobs_created_total: %v", mode, has)
	}
	return has, nil
}

func (h *harness) hasProgressMetrics() (bool, error) {
	resp, err := http.Get("http://" + h.admin + "/metrics")
	if err != nil {
		return false, err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		return false, fmt.Errorf("admin /metrics: %s %v", resp.Status, err)
	}
	return strings.Contains(string(b), "caddy_progress_jobs_created_total"), nil
}

// exportsSinceLoad is how many span exports arrived since the current configuration was
// loaded (a reload away from "on" shuts Caddy's tracer provider down, which flushes it).
func (o *observeRun) exportsSinceLoad() int64 {
	n, _ := o.sink.Counts()
	d := n - o.lastLoad
	o.lastLoad = n
	return d
}

func (h *harness) runObserve() error {
	sink, err := caddyrun.StartOTLPSink()
	if err != nil {
		return err
	}
	defer sink.Close()
	h.observe = &observeRun{sink: sink}
	o := h.observe
	if err := h.startUpstream(); err != nil {
		return err
	}
	if err := h.startCaddy(); err != nil {
		return err
	}
	o.loaded = observeOff
	if err := h.sanity(); err != nil {
		return err
	}
	h.conns, h.streams = h.opts.conns, h.opts.streams
	if h.conns == 0 {
		h.conns, h.streams = 2, 16
	}
	h.logf("\n## observe create: POST %d-byte JSON body with Prefer: respond-async to B (202s counted); %dx%d, %v warm-up + %v window; off and on alternated %d times (POST /load between)",
		len(requestBody), h.conns, h.streams, h.opts.warmup, h.opts.duration, h.opts.rounds)
	// Each measurement's span exports are counted at the next reload (which flushes them).
	o.exports = make([][2]int64, h.opts.rounds)
	var pending *int64
	reload := func(mode string) (bool, error) {
		n := o.exportsSinceLoad()
		if pending != nil {
			*pending = n
		}
		return h.loadObserve(mode)
	}
	for i := 1; i <= h.opts.rounds; i++ {
		var pair [2]*measurement
		var metrics [2]bool
		for j, mode := range []string{observeOff, observeOn} {
			has, err := reload(mode)
			if err != nil {
				return err
			}
			metrics[j] = has
			pending = &o.exports[i-1][j]
			m, err := h.measure(fmt.Sprintf("observe %s round %d", mode, i), "create", "B", h.conns, h.streams, h.opts.warmup, h.opts.duration, nil)
			if err != nil {
				return err
			}
			pair[j] = m
		}
		o.rounds = append(o.rounds, pair)
		o.metrics = append(o.metrics, metrics)
	}
	if _, err := reload(observeOff); err != nil { // flushes the last "on" round's spans
		return err
	}
	reqs, n := sink.Counts()
	h.check(fmt.Sprintf("observe: the OTLP sink received %d span exports (%s bytes of protobuf) in all; per round (off, on): %v", reqs, commas(n), o.exports))
	if err := h.observeProfiles(); err != nil {
		return err
	}
	if err := h.stopCaddy(); err != nil {
		return err
	}
	h.upstream.Stop(5 * time.Second)
	if h.opts.obsFanShapes != "" {
		if err := h.runObserveFanout(); err != nil {
			return err
		}
	}
	h.finished = time.Now()
	h.logf("# end %s, loadavg %s", h.finished.UTC().Format(time.RFC3339), loadavg())
	fmt.Println()
	fmt.Println(h.observeTables())
	if h.opts.write {
		return h.writeBenchSection(observeTitle, h.observeSection())
	}
	return nil
}

// observeProfiles runs the create load once more in each configuration (on first) with a
// 10 s CPU profile of Caddy, and prints where the "on" profile spends in OpenTelemetry,
// Prometheus and the plugin's own observability code.
func (h *harness) observeProfiles() error {
	if h.opts.profile == "never" {
		return nil
	}
	for _, mode := range []string{observeOn, observeOff} {
		if _, err := h.loadObserve(mode); err != nil {
			return err
		}
		if err := h.profileOne("create", "B"); err != nil {
			return err
		}
		from := h.profiles[len(h.profiles)-1]
		to := filepath.Join(h.dir, "caddy-observe-"+mode+".pprof")
		if err := os.Rename(from, to); err != nil {
			return err
		}
		h.profiles[len(h.profiles)-1] = to
		h.logf("# that profile was of configuration %q (now %s)", mode, filepath.Base(to))
		if mode != observeOn {
			continue
		}
		for _, focus := range []string{ourObservability, otelSDK} {
			args := []string{"tool", "pprof", "-top", "-cum", "-nodecount=25", "-focus=" + focus, h.caddyBin, to}
			out, err := h.goCmd(args...)
			if err != nil {
				h.logf("# go tool pprof -focus=%s: %v", focus, err)
				continue
			}
			h.logf("$ go tool pprof -top -cum -nodecount=25 -focus='%s' caddy %s", focus, filepath.Base(to))
			h.logf("%s", strings.TrimRight(out, "\n"))
		}
	}
	return nil
}

// Profile filters (pprof -focus regular expressions): the plugin's own tracing, metrics and
// transition logs; and the OpenTelemetry SDK and OTLP exporter, whoever calls them (the
// plugin's spans and the `tracing` directive's request spans alike).
const (
	ourObservability = `progress/engine\.(startJobTrace|requestTracer|propagate|jobLink|startRequestSpan|\(\*jobTrace\)|\(\*Metrics\)|\(\*routeMetrics\)|\(\*Engine\)\.(logCreated|logStarted|ended|endTrace))`
	otelSDK          = `go\.opentelemetry\.io/otel/sdk|go\.opentelemetry\.io/otel/exporters|go\.opentelemetry\.io/proto`
)

// runObserveFanout runs tests/internal/fanout on caddy-off and caddy-on with this run's Caddy.
func (h *harness) runObserveFanout() error {
	o := h.observe
	h.logf("\n# observe fanout: tests/internal/fanout, shapes %s, targets caddy-off,caddy-on, h2, %d rounds, window %v after %v of warm-up",
		h.opts.obsFanShapes, h.opts.obsFanRounds, h.opts.fanWindow, h.opts.fanWarmup)
	args, err := h.fanoutMain(h.opts.obsFanShapes, "caddy-off,caddy-on", "h2", h.opts.obsFanRounds)
	if err != nil {
		return err
	}
	o.fanout = fanout.ObserveRatios()
	o.fanSums = fanout.Summaries()
	o.fanArgs = args
	return nil
}

// observeCreateRatios are the medians of 202/s and p99 off and on, and on ÷ off.
func (o *observeRun) createRatios() (offRPS, onRPS, offP99, onP99, rpsRatio, p99Ratio float64) {
	var rps, p99 [2][]float64
	for _, pair := range o.rounds {
		for j, m := range pair {
			rps[j] = append(rps[j], m.res.RPS)
			p99[j] = append(p99[j], m.res.P99)
		}
	}
	offRPS, onRPS, offP99, onP99 = median(rps[0]), median(rps[1]), median(p99[0]), median(p99[1])
	return offRPS, onRPS, offP99, onP99, onRPS / offRPS, onP99 / offP99
}

// observeTables are the tables and verdicts (Markdown).
func (h *harness) observeTables() string {
	o := h.observe
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	if len(o.rounds) > 0 {
		w("#### Job creation through Caddy (202/s, Prefer: respond-async)\n\n")
		w("| round | configuration | 202/s | p50 ms | p99 ms | p99.9 ms | errors / other statuses | CPU %% caddy / upstream / load | others %% | span exports received | /metrics has caddy_progress_ |\n|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|\n")
		for i, pair := range o.rounds {
			for j, m := range pair {
				r := m.res
				w("| %d | %s | %s | %s | %s | %s | %d / %d | %s | %s | %d | %s |\n", i+1, []string{observeOff, observeOn}[j], rate(r.RPS),
					trunc(r.P50, 3), trunc(r.P99, 3), trunc(r.P999, 3), r.Errors, nonExpected(r), cpuCell(m), trunc(sumUse(m.others), 1),
					o.exports[i][j], yesNo(o.metrics[i][j]))
			}
		}
		offRPS, onRPS, offP99, onP99, rr, pr := o.createRatios()
		w("\nMedians over %d rounds: off %s 202/s, p99 %s ms; on %s 202/s, p99 %s ms.\n\n", len(o.rounds), rate(offRPS), trunc(offP99, 3), rate(onRPS), trunc(onP99, 3))
		w("Target (job creation within 5%%): 202/s on÷off **%s** (needs ≥ 0.95): %s; p99 on÷off **%s** (needs ≤ 1.05): %s.\n\n",
			trunc(rr, 3), metOrMissed(rr >= 1-observeTolerance), trunc(pr, 3), metOrMissed(pr <= 1+observeTolerance))
	}
	for _, r := range o.fanout {
		w("#### Callback-to-delivery latency, %s over %s\n\n", r.Shape, r.Proto)
		w("| round | off p50 | on p50 | off p99 | on p99 | off reports/s | on reports/s |\n|---|--:|--:|--:|--:|--:|--:|\n")
		for i := range r.Rounds {
			w("| %d | %s | %s | %s | %s | %s | %s |\n", i+1, msStr(int64(r.OffP50[i])), msStr(int64(r.OnP50[i])), msStr(int64(r.OffP99[i])), msStr(int64(r.OnP99[i])),
				rate(r.OffRate[i]), rate(r.OnRate[i]))
		}
		w("\nMedians over %d rounds: p50 off %s, on %s; p99 off %s, on %s; reports sent off %s/s, on %s/s of %s/s offered (on÷off %s; below the offered rate Caddy was saturated and the latencies are its queue); %s of %s deliveries measured; errors off %d, on %d; %d span exports received over the on measurements.\n\n",
			r.Rounds, msStr(int64(r.MedOffP50)), msStr(int64(r.MedOnP50)), msStr(int64(r.MedOffP99)), msStr(int64(r.MedOnP99)),
			rate(r.MedOffRate), rate(r.MedOnRate), rate(r.Offered), trunc(r.RatioRate, 3),
			commas(r.Delivered), commas(r.Expected), r.OffErrors, r.OnErrors, r.OnExports)
		w("Target (latency within 5%%): p50 on÷off **%s**: %s; p99 on÷off **%s**: %s.\n\n",
			trunc(r.RatioP50, 3), metOrMissed(r.RatioP50 <= 1+observeTolerance), trunc(r.RatioP99, 3), metOrMissed(r.RatioP99 <= 1+observeTolerance))
	}
	return b.String()
}

func metOrMissed(ok bool) string {
	if ok {
		return "met"
	}
	return "MISSED"
}

// observeSection is the whole BENCHMARKS.md section of an observe run.
func (h *harness) observeSection() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("%s\n\n", observeTitle)
	w("Issue #5's target: with tracing and metrics on, job creation throughput and callback-to-delivery latency\n")
	w("stay within 5%% of the same benchmark with them off, measured in one run. `tests/bench -scenario observe`\n")
	w("(`tests/bench/observe.go`): **off** is the global `progress { metrics off }` and no `tracing`; **on** is\n")
	w("metrics on (the default) and Caddy's `tracing` directive on the plugin's site(s), exporting every span\n")
	w("with OTLP/HTTP protobuf (`OTEL_TRACES_EXPORTER=otlp`, `OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`) to a\n")
	w("sink in the harness process that reads, counts and discards each export (its CPU counts as the harness's,\n")
	w("not Caddy's). Job creation: one Caddy, reloaded with the other configuration (admin `POST /load`) before\n")
	w("each measurement, off and on alternated; the load generator is its own process (HTTP/2, %dx%d\n", h.conns, h.streams)
	w("closed loop, %v warm-up + %v window, every latency kept). Fan-out: `tests/internal/fanout` with\n", h.opts.warmup, h.opts.duration)
	w("targets caddy-off and caddy-on (a fresh Caddy and store per measurement, both sites traced in \"on\").\n\n")
	w("### Machine\n\n| | |\n|---|---|\n")
	for _, row := range h.machine {
		w("| %s | %s |\n", row.k, row.v)
	}
	w("| Machine quiet before the run | %s |\n", h.quietBefore)
	w("| Waits for a quiet machine between measurements | %v in all |\n", h.quietWaited.Truncate(time.Second))
	if len(h.repeated) > 0 {
		w("| Measurements repeated (disturbed) | %s |\n", strings.Join(h.repeated, "; "))
	}
	w("| Run | %s to %s (UTC) |\n\n", h.started.UTC().Format("2006-01-02 15:04:05"), h.finished.UTC().Format("15:04:05"))
	w("### Commands\n\n```\ncd %s && go run ./tests/bench %s\n```\n\n", h.root, strings.Join(h.opts.args, " "))
	w("(`./xcaddy.sh bench-observe` runs `go run ./tests/bench -scenario observe -write`.) The run took %v.\n\n", h.finished.Sub(h.started).Truncate(time.Second))
	w("### Results\n\n%s", h.observeTables())
	if len(h.checks) > 0 {
		w("Checks:\n\n")
		for _, c := range h.checks {
			w("- %s\n", c)
		}
		w("\n")
	}
	w("%s\n\n", analysisTitle)
	w("%s", analysisPlaceholder)
	w("### Raw output\n\n```\n%s```\n", h.raw.String())
	return b.String()
}
