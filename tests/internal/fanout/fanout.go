// Package fanout is the callback-to-subscriber latency harness of issues #4 and #6 (fan-out):
// the code behind `go run ./tests/latency` and `go run ./tests/bench -scenario fanout`. It measures
// the latency from just before an upstream's progress report (POST /_jobs/{id}/progress) is sent
// to the moment an SSE client over HTTP/2 (or HTTP/3, -protos) has parsed the event that carries
// it, with J jobs each watched by W SSE clients and each reporting R times a second (the shape of
// issue #4: 1000x10x10; of issue #6: 1000x10x1).
//
// Run it from the module root:
//
//	go run ./tests/latency                               # the shapes, plugin and baseline
//	go run ./tests/latency -shapes 100x10x10 -rounds 3
//	go run ./tests/latency -targets caddy -profile       # with a CPU profile of Caddy
//	./xcaddy.sh bench-latency                            # the same as the first line
//
// What runs, all on loopback:
//
//   - Caddy, built by `go build ./tests/caddy` (as tests/bench does), started afresh for every
//     measurement with a new store file (fsync on, as always), its own admin port and folders:
//     https://127.0.0.1:<p> (tls internal, HTTP/2) with progress_api + progress
//     (callback_base http://127.0.0.1:<q>) + reverse_proxy to the upstream, and
//     http://127.0.0.1:<q> with progress_api for the callbacks.
//   - The upstream (the legacy app) is an HTTP server inside this harness: it records the
//     Progress-Job-Id, Progress-Token and Progress-Callback headers of each proxied request and
//     holds the request open, so every job stays running for the whole measurement. The
//     harness's reporters then post the callbacks with those tokens to those URLs, as the app
//     would; being one process, the token reaches them without any IPC, and the send time of
//     each report and the arrival time of its event are read from one monotonic clock.
//   - Reporters: one goroutine per job; at its slot (spread evenly across jobs) it sends
//     {"percent": k%100, "message": "k<k>"} over HTTP/1.1 keep-alive and waits for the 204. t0
//     is taken just before the request is sent.
//   - Subscribers: J×W GET /_jobs/{id}/events streams, HTTP/2 over TLS, -streams per
//     connection (one net/http Transport per connection). Each reads lines; at the blank line
//     that dispatches an event it takes t1 and matches the event to its report by "k<k>" in
//     the document's message (without decoding the rest of the document).
//   - The baseline, in the same run: this program re-executed as `latency __hub`, a minimal
//     memory-only Go SSE hub (hub.go) with the same protocol, measured by the same clients.
//   - -targets caddy-redis3 (issue #8, redis3.go): one redis-server (appendfsync always) and
//     three such Caddys on it with one callback_secret; jobs made on A, each job's watchers
//     going round A, B and C, callbacks to C; the target's CPU is the four processes'.
//
// A measurement: make the jobs, open every stream and wait for each one's first document,
// report for -warmup (samples discarded), then for -window; latencies are kept for the reports
// sent in the window (exact percentiles from the sorted samples), and CPU is read from /proc
// over the window: the target's process, the harness, the machine (busy, softirq, idle), and
// every other process. Before each measurement the harness waits, within -quiet-wait in all,
// for a machine where other processes use less than 25% of a CPU.
//
// Beside each measurement two probes run on the same disk: a 4 KiB write + fdatasync, and one
// raw bbolt db.Update (the store's durable floor), each every 50 ms. Caddy runs with
// GODEBUG=gctrace=1, and the harness reports its GC cycles in the window, and whether slow
// deliveries cluster in time (the largest latency per 100 ms of send time).
//
// Diagnostics: -profile takes a CPU profile of Caddy over the window (admin
// /debug/pprof/profile); -trace a 3 s execution trace (admin /debug/pprof/trace), of which it
// prints where goroutines waited (syscalls such as fdatasync, scheduler latency, sync, net);
// -harness-profile profiles the harness itself; -caddy-bin compares prebuilt Caddy builds
// (A/B of a change to the engine or store) in one run.
//
// The smoke tests (go test ./tests/internal/fanout) run the same code on a small shape against the
// hub and against Caddy (skipped with -short); the heavy shapes run only from this command.
//
// Figures are truncated, never rounded up.
package fanout

import (
	"cmp"
	"context"
	"flag"
	"fmt"
	"io"
	"maps"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/child"
)

// Out receives everything the harness prints (standard output unless the caller changes it).
var Out io.Writer = os.Stdout

// Main runs the harness with command-line args (see the package comment) and returns the exit
// status. The program that calls it must run HubMain when its first argument is "__hub": the
// baseline hub is the same binary re-executed.
func Main(args []string) int {
	fs := flag.NewFlagSet("latency", flag.ContinueOnError)
	shapes := fs.String("shapes", "1000x10x10,1000x10x1,100x10x10", "comma-separated JOBSxWATCHERSxREPORTS_PER_SECOND")
	targets := fs.String("targets", "caddy,hub", "comma-separated: caddy (the plugin), hub (the in-memory baseline), caddy-off (metrics off, no tracing), caddy-on (metrics on, `tracing` on, spans exported over OTLP/HTTP to a sink in this process), caddy-redis3 (issue #8: three Caddys on one redis-server, jobs made on A, watchers spread over A, B and C, callbacks to C; CPU of all four processes)")
	rounds := fs.Int("rounds", 1, "how many times every shape is measured on every target (alternating)")
	warmup := fs.Duration("warmup", 5*time.Second, "reporting before the window (samples discarded)")
	window := fs.Duration("window", 20*time.Second, "the measured window")
	streams := fs.Int("streams", 100, "SSE streams per HTTP/2 connection")
	profile := fs.Bool("profile", false, "take a CPU profile of Caddy over each window (admin /debug/pprof/profile) and print its top")
	serverLines = "" // fs.Func has no default: a flag of an earlier Main must not linger
	fs.Func("caddy-servers", "lines for the global `servers` block of every Caddy, separated by semicolons (e.g. `timeouts {;write_idle -1s;}` turns off Caddy's write idle timeout)", func(v string) error {
		serverLines = strings.ReplaceAll(v, ";", "\n")
		return nil
	})
	fs.StringVar(&profileNode, "profile-node", "A", "caddy-redis3: the instance -profile and -trace look at: A (makes the jobs, watchers), B (watchers) or C (takes every callback, watchers)")
	fs.BoolVar(&profileAllocs, "allocs", false, "with -profile: an allocation profile (admin /debug/pprof/allocs, what was allocated over the window) instead of a CPU profile")
	trace := fs.Bool("trace", false, "take a 3 s execution trace of Caddy in each window (admin /debug/pprof/trace) and print its syscall and scheduler-latency profiles")
	harnessProfile := fs.Bool("harness-profile", false, "take a CPU profile of the harness itself over each window")
	quietWait := fs.Duration("quiet-wait", 3*time.Minute, "how long in all to wait for a quiet machine")
	caddyBins := fs.String("caddy-bin", "", "comma-separated prebuilt Caddy binaries to compare (each measured in turn, labelled caddy, caddy2, …) instead of building ./tests/caddy; `path;option value` adds a line to the global progress block (e.g. `/tmp/caddy;checkpoint_interval 5s`)")
	keep := fs.Bool("keep", false, "keep the temporary folder (Caddyfiles, logs, stores, profiles)")
	redisFsync := fs.String("redis-appendfsync", "always", "caddy-redis3: redis-server's appendfsync (always, everysec or no)")
	protos := fs.String("protos", "h2", "comma-separated subscriber protocols: h2, h3 (h3: Caddy only; the hub serves HTTP/2)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if len(profileNode) != 1 || !strings.Contains("ABC", profileNode) {
		fmt.Fprintf(os.Stderr, "latency: -profile-node %q: want A, B or C\n", profileNode)
		return 2
	}
	var shs []shape
	for _, v := range strings.Split(*shapes, ",") {
		s, err := parseShape(strings.TrimSpace(v))
		if err != nil {
			fmt.Fprintln(os.Stderr, "latency:", err)
			return 2
		}
		shs = append(shs, s)
	}
	tgs := strings.Split(*targets, ",")
	for _, t := range tgs {
		if t != "caddy" && t != "hub" && t != "caddy-off" && t != "caddy-on" && t != redis3Name {
			fmt.Fprintln(os.Stderr, "latency: -targets takes caddy, hub, caddy-off, caddy-on and caddy-redis3")
			return 2
		}
	}
	for _, p := range strings.Split(*protos, ",") {
		if p != "h2" && p != "h3" {
			fmt.Fprintln(os.Stderr, "latency: -protos takes h2 and h3")
			return 2
		}
	}
	if *rounds < 1 || *rounds > 10 || *warmup < 0 || *warmup > time.Minute || *window < 2*time.Second ||
		*window > 5*time.Minute || *streams < 1 || *streams > 1000 || *quietWait < 0 || *quietWait > time.Hour {
		fmt.Fprintln(os.Stderr, "latency: a flag is out of range")
		return 2
	}

	defer child.StopAll()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\nlatency: %v: stopping every process started\n", s)
		child.StopAll()
		os.Exit(130)
	}()

	root, err := moduleRoot()
	if err != nil {
		fmt.Fprintln(os.Stderr, "latency:", err)
		return 1
	}
	dir, err := os.MkdirTemp("", "progress-latency-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "latency:", err)
		return 1
	}
	if *keep {
		defer fmt.Fprintf(Out, "\nkept %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "latency:", err)
		return 1
	}
	fmt.Fprintf(Out, "# latency %s\n# started %s, loadavg %s\n", strings.Join(args, " "), time.Now().UTC().Format(time.RFC3339), loadavg())
	printMachine()
	var caddyBin string
	var extra []string // more Caddy binaries, from -caddy-bin
	if *caddyBins != "" {
		bins := strings.Split(*caddyBins, ",")
		caddyBin, extra = bins[0], bins[1:]
		for i, b := range bins {
			fmt.Fprintf(Out, "# caddy binary %d: %s\n", i+1, b)
		}
	} else if strings.Contains(*targets, "caddy") {
		start := time.Now()
		if caddyBin, err = buildCaddy(root, filepath.Join(dir, "bin")); err != nil {
			fmt.Fprintln(os.Stderr, "latency:", err)
			return 1
		}
		fmt.Fprintf(Out, "# built caddy in %v\n", time.Since(start).Truncate(time.Millisecond))
	}

	quietLeft := *quietWait
	var all []*result
	for r := 1; r <= *rounds; r++ {
		for _, sh := range shs {
			var names []string
			for _, t := range tgs {
				names = append(names, t)
				if t == "caddy" {
					for i := range extra {
						names = append(names, fmt.Sprintf("caddy%d", i+2))
					}
				}
			}
			for _, run := range crossProtos(names, strings.Split(*protos, ",")) {
				tname, proto := run[0], run[1]
				quietLeft = waitQuiet(quietLeft)
				o := runOpts{warmup: *warmup, window: *window, streamsPerConn: *streams, proto: proto, redisFsync: *redisFsync,
					ours: map[int]string{os.Getpid(): "harness", os.Getppid(): "go run"}, probeDir: dir}
				label := fmt.Sprintf("%s-%s-%s-r%d", tname, proto, sh, r)
				bin := caddyBin
				if n, ok := strings.CutPrefix(tname, "caddy"); ok && n != "" && !strings.HasPrefix(n, "-") {
					i, _ := strconv.Atoi(n)
					bin = extra[i-2]
				}
				if *profile && strings.HasPrefix(tname, "caddy") {
					o.profilePath = filepath.Join(dir, label+".pprof")
				}
				if *trace && strings.HasPrefix(tname, "caddy") {
					o.tracePath = filepath.Join(dir, label+".trace")
				}
				if *harnessProfile {
					o.harnessProfile = filepath.Join(dir, label+"-harness.pprof")
				}
				fmt.Fprintf(Out, "\n## %s over %s: %d jobs x %d watchers x %s reports/s (%s reports/s, %s deliveries/s offered), round %d\n",
					tname, proto, sh.jobs, sh.watchers, fmtF(sh.rate), commas(int64(sh.reportsPerSec())), commas(int64(sh.deliveriesPerSec())), r)
				res, err := runOne(tname, bin, self, dir, sh, o)
				if err != nil {
					fmt.Fprintf(Out, "# FAILED: %v\n", err)
					continue
				}
				printResult(res)
				all = append(all, res)
				for _, p := range []string{o.profilePath, o.harnessProfile} {
					if p != "" {
						printProfile(root, bin, self, p)
					}
				}
				if o.tracePath != "" {
					printTrace(root, bin, o.tracePath)
				}
			}
		}
	}
	fmt.Fprintf(Out, "\n# end %s, loadavg %s\n\n", time.Now().UTC().Format(time.RFC3339), loadavg())
	printTable(all)
	printObserveRatios(all)
	lastResults = all
	return 0
}

// lastResults are the measurements of the last Main.
var lastResults []*result

// Summary is one measurement of the last Main, for a caller that judges targets.
type Summary struct {
	Target, Shape       string // e.g. "caddy/h3", "1000x10x1"
	Sent                int64  // reports sent in the window
	Delivered, Expected int64  // deliveries measured; reports sent × watchers
	P50, P99, P999      time.Duration
	CPUPer1000          float64 // % of one CPU the target used per 1,000 deliveries/s
	Errors              int64   // callback and subscriber errors, unmatched events
	OTLPExports         int64   // caddy-on: span exports the harness's OTLP sink received
}

// Summaries returns the measurements of the last Main.
func Summaries() []Summary {
	var out []Summary
	for _, r := range lastResults {
		s := Summary{Target: r.target, Shape: r.shape.String(), Sent: r.sent, Delivered: int64(len(r.lat)),
			Expected: r.sent * int64(r.shape.watchers), P50: time.Duration(pct(r.lat, .5)), P99: time.Duration(pct(r.lat, .99)),
			P999: time.Duration(pct(r.lat, .999)), Errors: r.cbErrors + r.subErrors + r.unmatched, OTLPExports: r.otlpExports}
		if n := float64(len(r.lat)) / r.window.Seconds(); n > 0 {
			s.CPUPer1000 = r.targetCPU / (n / 1000)
		}
		out = append(out, s)
	}
	return out
}

// crossProtos pairs every target with every protocol, except the hub with h3 (it serves
// HTTP/2 only).
func crossProtos(names, protos []string) [][2]string {
	var out [][2]string
	for _, n := range names {
		for _, p := range protos {
			if p == "h3" && n == "hub" {
				continue
			}
			out = append(out, [2]string{n, p})
		}
	}
	return out
}

// runOne starts the target afresh, measures, and stops it.
func runOne(tname, caddyBin, self, dir string, sh shape, o runOpts) (*result, error) {
	ctx := context.Background()
	switch {
	case tname == redis3Name:
		up, err := startUpstream()
		if err != nil {
			return nil, err
		}
		t, err := startRedis3(caddyBin, dir, up, o.proto == "h3", o.redisFsync)
		if err != nil {
			up.Close()
			return nil, err
		}
		maps.Copy(o.ours, t.parts())
		fmt.Fprintf(Out, "# %s (pid %d, appendfsync %s) on %s; caddy A, B, C pids %d, %d, %d\n", t.redis.Version, t.redis.PID(), o.redisFsync, t.redis.Addr,
			t.nodes[0].PID(), t.nodes[1].PID(), t.nodes[2].PID())
		res, err := measure(ctx, t, sh, o)
		if res != nil && o.proto == "h3" {
			res.target += "/h3"
		}
		up.Close()
		t.close()
		if lines := t.errorLines(); len(lines) > 0 {
			fmt.Fprintf(Out, "# caddy logs: %d error lines, first: %s\n", len(lines), clip(lines[0], 300))
		}
		return res, err
	case strings.HasPrefix(tname, "caddy"):
		up, err := startUpstream()
		if err != nil {
			return nil, err
		}
		observe, _ := strings.CutPrefix(tname, "caddy-")
		if !strings.HasPrefix(tname, "caddy-") {
			observe = observeDefault
		}
		c, err := startCaddy(caddyBin, dir, up, o.proto == "h3", observe)
		if err != nil {
			up.Close()
			return nil, err
		}
		c.label = tname
		o.ours[c.pid()] = "caddy"
		res, err := measure(ctx, c, sh, o)
		if res != nil {
			res.target = tname
			if o.proto == "h3" {
				res.target += "/h3"
			}
		}
		up.Close() // the jobs end
		c.close()
		if c.sink != nil {
			// Caddy flushed its batch of spans on the way out.
			reqs, n := c.sink.Counts()
			fmt.Fprintf(Out, "# OTLP sink: %d exports, %s bytes of spans received from caddy\n", reqs, commas(n))
			if res != nil {
				res.otlpExports = reqs
			}
		}
		if lines := c.ErrorLines(); len(lines) > 0 {
			fmt.Fprintf(Out, "# caddy log: %d error lines, first: %s\n", len(lines), clip(lines[0], 300))
		}
		return res, err
	default:
		h, err := startHubProc(self, dir)
		if err != nil {
			return nil, err
		}
		o.ours[h.pid()] = "hub"
		defer h.close()
		return measure(ctx, h, sh, o)
	}
}

// waitQuiet waits until other processes use less than 25% of a CPU in all (2 s samples, every
// 10 s), within the budget left; it returns what is left.
func waitQuiet(left time.Duration) time.Duration {
	start := time.Now()
	ours := map[int]string{os.Getpid(): "harness", os.Getppid(): "go run"}
	for {
		a := takeSnapshot()
		time.Sleep(2 * time.Second)
		_, others := usage(a, takeSnapshot(), ours)
		if sumUse(others) < 25 {
			break
		}
		if time.Since(start)+10*time.Second > left {
			fmt.Fprintf(Out, "# the machine is busy (%s) and the quiet-wait budget is spent; measuring anyway\n", describeOthers(others, 3))
			break
		}
		fmt.Fprintf(Out, "# waiting for a quiet machine: others %.1f%% of a CPU (%s)\n", sumUse(others), describeOthers(others, 3))
		time.Sleep(8 * time.Second)
	}
	return max(0, left-time.Since(start))
}

func printMachine() {
	model := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	nproc, _ := exec.Command("nproc").Output()
	gov, _ := exec.Command("go", "version").Output()
	fmt.Fprintf(Out, "# machine: nproc %s, CPU %s, %s\n", strings.TrimSpace(string(nproc)), model, strings.TrimSpace(string(gov)))
}

func printResult(r *result) {
	w := r.window.Seconds()
	offered := r.shape.deliveriesPerSec()
	fmt.Fprintf(Out, "# setup %v: %d streams on %d HTTP/2 connections\n", r.setup.Truncate(time.Millisecond), r.streams, r.conns)
	fmt.Fprintf(Out, "reports: %d sent in the %v window (%s/s of %s/s offered), %d answered 204, %d late, %d callback errors\n",
		r.sent, r.window, fmtF(float64(r.sent)/w), fmtF(r.shape.reportsPerSec()), r.acked, r.late, r.cbErrors)
	fmt.Fprintf(Out, "deliveries: %d of %d expected (%s/s of %s/s offered); avg event data %d B; %d unmatched, %d subscriber errors\n",
		len(r.lat), r.sent*int64(r.shape.watchers), fmtF(float64(len(r.lat))/w), fmtF(offered), avg(r.eventBytes, r.events), r.unmatched, r.subErrors)
	fmt.Fprintf(Out, "latency callback→event ms: p50 %s p90 %s p99 %s p99.9 %s max %s\n",
		ms(pct(r.lat, .5)), ms(pct(r.lat, .9)), ms(pct(r.lat, .99)), ms(pct(r.lat, .999)), ms(pct(r.lat, 1)))
	fmt.Fprintf(Out, "latency callback→204 ms:   p50 %s p90 %s p99 %s p99.9 %s max %s\n",
		ms(pct(r.ack, .5)), ms(pct(r.ack, .9)), ms(pct(r.ack, .99)), ms(pct(r.ack, .999)), ms(pct(r.ack, 1)))
	fmt.Fprintf(Out, "fsync probe (4 KiB write + fdatasync, every 50 ms, %d samples) ms: p50 %s p90 %s p99 %s max %s\n",
		len(r.fsync), ms(pct(r.fsync, .5)), ms(pct(r.fsync, .9)), ms(pct(r.fsync, .99)), ms(pct(r.fsync, 1)))
	fmt.Fprintf(Out, "bbolt probe (one db.Update of 512 B, every 50 ms, %d samples) ms: p50 %s p90 %s p99 %s max %s\n",
		len(r.boltPut), ms(pct(r.boltPut, .5)), ms(pct(r.boltPut, .9)), ms(pct(r.boltPut, .99)), ms(pct(r.boltPut, 1)))
	fmt.Fprintf(Out, "cpu %% of one CPU over the window: %s %s, harness %s, machine busy %s (softirq %s) idle %s iowait %s of 200; others %s (%s); unaccounted (short-lived processes, softirq) %s; runnable threads %s on average; %d processes started on the machine\n",
		r.target, fmtF(r.targetCPU), fmtF(r.harnessCPU), fmtF(r.machine.Busy), fmtF(r.machine.Softirq), fmtF(r.machine.Idle), fmtF(r.machine.IOWait),
		fmtF(sumUse(r.others)), describeOthers(r.others, 3), fmtF(r.machine.Busy-r.targetCPU-r.harnessCPU-sumUse(r.others)), fmtF(r.runnable), r.forks)
	if len(r.cpuParts) > 0 {
		var parts []string
		for _, p := range r.cpuParts {
			parts = append(parts, fmt.Sprintf("%s (pid %d) %s", p.Comm, p.PID, fmtF(p.Pct)))
		}
		fmt.Fprintf(Out, "cpu of the target's processes: %s\n", strings.Join(parts, ", "))
	}
	printStalls(r)
	if len(r.gcs) > 0 {
		// "gc N @Ts P%: A+B+C ms clock, …": A and C are the stop-the-world phases.
		var maxSTW, sumSTW float64
		for _, line := range r.gcs {
			_, rest, _ := strings.Cut(line, "%: ")
			clock, _, _ := strings.Cut(rest, " ms clock")
			f := strings.Split(clock, "+")
			if len(f) == 3 {
				a, _ := strconv.ParseFloat(f[0], 64)
				c, _ := strconv.ParseFloat(f[2], 64)
				maxSTW, sumSTW = max(maxSTW, a+c), sumSTW+a+c
			}
		}
		fmt.Fprintf(Out, "caddy GC in the window (GODEBUG=gctrace=1): %d cycles, stop-the-world %.3f ms in all, at most %.3f ms; the last: %s\n",
			len(r.gcs), sumSTW, maxSTW, r.gcs[len(r.gcs)-1])
	}
	fmt.Fprintf(Out, "loadavg before %s, after %s\n", r.loadStart, r.loadEnd)
	if r.firstErr != "" {
		fmt.Fprintf(Out, "first error: %s\n", clip(r.firstErr, 300))
	}
}

// printStalls says whether the slow deliveries cluster in time (a stall of the whole target:
// a slow commit, a GC, a busy machine) or spread over the window.
func printStalls(r *result) {
	over := func(limit time.Duration) int {
		n := 0
		for _, v := range r.bucketMax {
			if v > int64(limit) {
				n++
			}
		}
		return n
	}
	type b struct {
		at  time.Duration
		max int64
	}
	var worst []b
	for i, v := range r.bucketMax {
		worst = append(worst, b{time.Duration(i) * bucketWidth, v})
	}
	slices.SortFunc(worst, func(x, y b) int { return cmp.Compare(y.max, x.max) })
	var parts []string
	for _, w := range worst[:min(6, len(worst))] {
		parts = append(parts, fmt.Sprintf("+%v: %s", w.at, ms(w.max)))
	}
	fmt.Fprintf(Out, "stalls: of %d 100-ms slices of the window, %d had a delivery over 2 ms, %d over 10 ms, %d over 50 ms; worst (offset in window: max ms) %s\n",
		len(r.bucketMax), over(2*time.Millisecond), over(10*time.Millisecond), over(50*time.Millisecond), strings.Join(parts, ", "))
}

// printTable prints one Markdown row per measurement.
func printTable(all []*result) {
	fmt.Fprintln(Out, "| target | shape (jobs×watchers×reports/s) | reports/s | deliveries/s (expected) | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | 204 p50 ms | 204 p99 ms | target CPU % | target CPU % per 1,000 deliveries/s | harness CPU % | machine idle % of 200 | others % | unaccounted % | runnable | fsync probe p50/p99 ms | bbolt probe p50/p99 ms |")
	fmt.Fprintln(Out, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, r := range all {
		w := r.window.Seconds()
		perK := "-"
		if n := float64(len(r.lat)) / w; n > 0 {
			perK = fmtF(r.targetCPU / (n / 1000))
		}
		fmt.Fprintf(Out, "| %s | %s | %s | %s (%s) | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %s / %s |\n",
			r.target, strings.ReplaceAll(r.shape.String(), "x", "×"), fmtF(float64(r.sent)/w),
			fmtF(float64(len(r.lat))/w), fmtF(float64(r.sent*int64(r.shape.watchers))/w),
			ms(pct(r.lat, .5)), ms(pct(r.lat, .9)), ms(pct(r.lat, .99)), ms(pct(r.lat, .999)), ms(pct(r.lat, 1)),
			ms(pct(r.ack, .5)), ms(pct(r.ack, .99)), fmtF(r.targetCPU), perK, fmtF(r.harnessCPU), fmtF(r.machine.Idle), fmtF(sumUse(r.others)),
			fmtF(r.machine.Busy-r.targetCPU-r.harnessCPU-sumUse(r.others)), fmtF(r.runnable),
			ms(pct(r.fsync, .5)), ms(pct(r.fsync, .99)), ms(pct(r.boltPut, .5)), ms(pct(r.boltPut, .99)))
	}
}

func printProfile(root, caddyBin, self, path string) {
	caddyBin, _ = splitCaddyBin(caddyBin)
	bin := caddyBin
	if strings.HasSuffix(path, "-harness.pprof") {
		bin = self
	}
	if _, err := os.Stat(path); err != nil {
		return
	}
	for _, extra := range [][]string{{"-nodecount=35"}, {"-cum", "-nodecount=60"}} {
		if profileAllocs && bin == caddyBin {
			// A delta heap profile shows in-use space by default; -allocs asks what was
			// allocated over the window.
			extra = append([]string{"-sample_index=alloc_space"}, extra...)
		}
		args := append([]string{"tool", "pprof", "-top"}, extra...)
		args = append(args, bin, path)
		cmd := exec.Command("go", args...)
		cmd.Dir = root
		out, err := cmd.Output()
		fmt.Fprintf(Out, "$ go tool pprof -top %s %s\n", strings.Join(extra, " "), filepath.Base(path))
		if err != nil {
			fmt.Fprintf(Out, "# pprof: %v\n", err)
			return
		}
		fmt.Fprint(Out, string(out))
	}
}

// printTrace prints where the traced goroutines waited: in system calls (fdatasync among
// them), for a CPU (scheduler latency), on synchronisation and on the network.
func printTrace(root, caddyBin, path string) {
	caddyBin, _ = splitCaddyBin(caddyBin)
	if _, err := os.Stat(path); err != nil {
		return
	}
	for _, kind := range []string{"syscall", "sched", "sync", "net"} {
		prof := path + "." + kind + ".pprof"
		cmd := exec.Command("go", "tool", "trace", "-pprof="+kind, path)
		cmd.Dir = root
		out, err := cmd.Output()
		if err != nil {
			fmt.Fprintf(Out, "# go tool trace -pprof=%s: %v\n", kind, err)
			continue
		}
		if err := os.WriteFile(prof, out, 0o644); err != nil {
			continue
		}
		cmd = exec.Command("go", "tool", "pprof", "-top", "-nodecount=25", caddyBin, prof)
		cmd.Dir = root
		out, err = cmd.Output()
		fmt.Fprintf(Out, "$ go tool trace -pprof=%s %s | go tool pprof -top -nodecount=25\n", kind, filepath.Base(path))
		if err != nil {
			fmt.Fprintf(Out, "# pprof: %v\n", err)
			continue
		}
		fmt.Fprint(Out, string(out))
	}
}

// ms formats nanoseconds as milliseconds with 3 decimals, truncated.
func ms(ns int64) string {
	if ns < 0 {
		return "–"
	}
	return fmt.Sprintf("%d.%03d", ns/1e6, ns%1e6/1e3)
}

// fmtF formats with one decimal, truncated.
func fmtF(x float64) string {
	v := math.Trunc(x*10) / 10
	if v == math.Trunc(v) {
		return commas(int64(v))
	}
	return commas(int64(v)) + fmt.Sprintf(".%d", int64(math.Abs(x*10))%10)
}

func avg(sum, n int64) int64 {
	if n == 0 {
		return 0
	}
	return sum / n
}

func commas(n int64) string {
	neg := n < 0
	if neg {
		n = -n
	}
	s := fmt.Sprint(n)
	var b strings.Builder
	for i, c := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(c)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
