// Command bench measures the two throughput targets of issue #3: what the `progress` handler
// costs a request that does not ask for a job (passthrough), and how fast it creates jobs
// (create). It compares, in the same run and the same Caddy process, two HTTPS sites in front of
// the same instant upstream:
//
//	A  reverse_proxy <upstream>
//	B  progress_api + progress (async prefer, the default) + reverse_proxy <upstream>
//
// Run it from the module root:
//
//	go run ./tests/bench                       # tune, passthrough, create; print the report
//	go run ./tests/bench -write                # the same, and write the "Caddy plugin (issue 3)"
//	                                           # section of BENCHMARKS.md (./xcaddy.sh bench)
//	go run ./tests/bench -scenario passthrough -conns 2 -streams 16
//	go run ./tests/bench -scenario create -rounds 1 -duration 5s
//	go run ./tests/bench -scenario tune
//
// Scenarios (-scenario):
//
//	tune         plain reverse_proxy (A) under several connection × stream combinations; the
//	             chosen one is the fastest, or of those within 3% of the fastest the one with the
//	             lowest p99 (so that queueing does not inflate latency for nothing)
//	passthrough  GET without Prefer, to A then B, -rounds times (default 5: A B A B …); target
//	             B/A ≥ 0.97 on the medians
//	create       POST of a small JSON body: without Prefer to A (200 from the upstream), with
//	             `Prefer: respond-async` to B (counting only 202s), A B alternated -rounds
//	             times; targets ≥ 10,000 202/s, p99 < 20 ms, B/A ≥ 0.5. The jobs also run
//	             against the upstream in the background: that is part of the cost. Afterwards it
//	             follows one job to its end and, once Caddy has stopped, counts the jobs in the
//	             store file
//	sweep        create on B alone, under every combination the tuning tries (-tune-warmup,
//	             -tune-duration): how job creation scales with concurrency; informational, not
//	             used for the targets
//	all          tune (unless -conns and -streams are given), passthrough, create, sweep
//	             (default)
//
// The scenario of issue #5 (observability overhead; observe.go; "## Observability overhead
// (issue 5)" with -write; ./xcaddy.sh bench-observe):
//
//	observe      job creation on B with tracing and metrics off, then on (one Caddy reloaded
//	             through the admin /load between rounds, spans exported over OTLP/HTTP to a sink
//	             in this process), alternated -rounds times; then fan-out latency (tests/
//	             internal/fanout, targets caddy-off and caddy-on, -obs-fan-shapes); on÷off ratios
//
// The scenarios of issue #6 (scale), each with its own flags (-idle-*, -lp-*) and its own
// section of BENCHMARKS.md ("## Scale (issue 6)", with -write; ./xcaddy.sh bench-scale):
//
//	idle         100,000 idle SSE subscribers over HTTP/2: resident memory per subscriber of
//	             Caddy with the plugin against a bare net/http server and a Caddy floor, fresh
//	             and after one event on every stream (idle.go)
//	longpoll     10,000 long-pollers on 1,000 reporting jobs: wake-up latency (longpoll.go)
//	restart      start to first answer with 1,000,000 finished jobs in the store (restart.go)
//	fanout       10,000 SSE subscribers on 1,000 jobs, 10,000 deliveries/s, over HTTP/2 and
//	             HTTP/3: callback-to-delivery latency (fanout.go, tests/internal/fanout)
//	scale        idle, longpoll, restart, fanout
//
// What runs, all on loopback, each as its own process (and process group, stopped at the end,
// also on failure or Ctrl-C; the kernel kills them if the harness dies):
//
//   - Caddy, built by `go build ./tests/caddy` into a temporary folder, with its own admin port,
//     HOME, XDG_DATA_HOME, XDG_CONFIG_HOME, certificate storage and store file in that folder.
//     Both sites serve HTTPS (`tls internal`) over HTTP/1.1 and HTTP/2; HTTP/3 is off, since
//     the load is TCP only.
//   - The instant upstream: this program re-executed as `bench __upstream`, which answers 200
//     with a 29-byte JSON body at once.
//   - The load generator: this program re-executed as `bench __load` for every measurement: N
//     HTTP/2 connections (one net/http Transport each, HTTP/2 only, TLS not verified on
//     loopback) × M closed-loop request loops per connection, a warm-up, then a fixed window in
//     which every latency is kept (the percentiles are exact). It prints its result as JSON.
//
// The machine may be shared. Before it starts (looking every 30 s) and before every measurement
// (every 10 s), the harness waits until no other process uses more than 10% of a CPU, all of
// them together less than 25%; all these waits share one budget, -quiet-wait (default 10m).
// During every measurement it samples, from /proc, the CPU use of Caddy, the upstream, the load
// generator and every other process, the machine's busy, softirq, idle and iowait time, and
// what Caddy wrote to storage. A measurement in whose window other processes used more than
// 15% of a CPU is measured again, at most twice. After every measurement the harness waits
// until Caddy is idle again (the jobs of a create run finish in the background), so that one
// measurement does not eat into the next.
//
// When a target is missed (-profile auto; or always), it runs the missed scenario once more on
// both sites while taking a 10 s CPU profile of Caddy through the admin endpoint
// (/debug/pprof/profile?seconds=10), and prints `go tool pprof -top` of it. With -keep the
// profiles, the Caddyfile, Caddy's log and the store file stay in the temporary folder.
//
// -write replaces the "## Caddy plugin (issue 3)" section of BENCHMARKS.md (or appends it): the
// machine, the commands, the tables, whether each target is met, and the raw output. A
// hand-written "### Analysis" part of the old section is kept.
//
// Figures are truncated, never rounded up. Whether a target is met is decided on the exact
// figure.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
	"github.com/caddy-progress/progress/tests/internal/fanout"
)

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "__load":
			os.Exit(loadMain(os.Args[2:]))
		case "__upstream":
			os.Exit(upstreamMain(os.Args[2:]))
		case "__bare":
			os.Exit(bareMain(os.Args[2:]))
		case "__idle":
			os.Exit(idleLoadMain(os.Args[2:]))
		case "__fill":
			os.Exit(fillMain(os.Args[2:]))
		case "__hub":
			os.Exit(fanout.HubMain(os.Args[2:]))
		}
	}
	os.Exit(harnessMain(os.Args[1:]))
}

// options are the harness's flags.
type options struct {
	scenario     string
	conns        int
	streams      int
	rounds       int
	warmup       time.Duration
	duration     time.Duration
	tuneWarmup   time.Duration
	tuneDuration time.Duration
	write        bool
	benchFile    string
	profile      string
	quietWait    time.Duration
	keep         bool
	store        string
	args         []string

	idleSubs      int
	idleStreams   int
	idleSources   int
	idleJobs      int
	idleHeartbeat time.Duration
	idleCaddyBins []string

	lpPollers int
	lpJobs    int
	lpRates   []float64
	lpStreams int
	lpWarmup  time.Duration
	lpWindow  time.Duration

	restartJobs   int
	restartRounds int

	fanShape  string
	fanWarmup time.Duration
	fanWindow time.Duration
	fanRounds int

	obsFanShapes string
	obsFanRounds int
	obsEnv       []string
	obsOnGlobal  []string // global progress options added to the "on" configuration
}

func harnessMain(args []string) int {
	var o options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.StringVar(&o.scenario, "scenario", "all", "tune | passthrough | create | sweep | all (issue 3) | idle | longpoll | restart | fanout | scale (issue 6: all four) | observe (issue 5)")
	fs.IntVar(&o.conns, "conns", 0, "HTTP/2 connections of the load generator (0: tune, or 2 without tuning)")
	fs.IntVar(&o.streams, "streams", 0, "concurrent streams per connection (0: tune, or 16 without tuning)")
	fs.IntVar(&o.rounds, "rounds", 5, "how many times A and B are measured, alternately")
	fs.DurationVar(&o.warmup, "warmup", 3*time.Second, "warm-up before each measured window")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured window")
	fs.DurationVar(&o.tuneWarmup, "tune-warmup", 2*time.Second, "warm-up of each tuning measurement")
	fs.DurationVar(&o.tuneDuration, "tune-duration", 5*time.Second, "window of each tuning measurement")
	fs.BoolVar(&o.write, "write", false, `write the "Caddy plugin (issue 3)" section of BENCHMARKS.md, or with idle, longpoll, scale the "Scale (issue 6)" one`)
	fs.StringVar(&o.benchFile, "benchmarks", "", "the file -write updates (default BENCHMARKS.md at the module root)")
	fs.StringVar(&o.profile, "profile", "auto", "auto (profile Caddy when a target is missed) | always | never")
	fs.DurationVar(&o.quietWait, "quiet-wait", 10*time.Minute, "how long, in all, to wait for a quiet machine (before the start and before measurements)")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary folder (Caddyfile, logs, store, profiles)")
	fs.IntVar(&o.idleSubs, "idle-subscribers", 100000, "idle: concurrent SSE subscribers")
	fs.IntVar(&o.idleStreams, "idle-streams", 200, "idle: streams per HTTP/2 connection (under the servers' 250)")
	fs.IntVar(&o.idleSources, "idle-sources", 4, "idle: loopback source addresses of the client (127.0.0.1 …)")
	fs.IntVar(&o.idleJobs, "idle-jobs", 1000, "idle: running jobs the subscribers are spread over")
	fs.DurationVar(&o.idleHeartbeat, "idle-heartbeat", 15*time.Second, "idle: Caddy's heartbeat setting")
	fs.IntVar(&o.lpPollers, "lp-pollers", 10000, "longpoll: concurrent long-pollers")
	fs.IntVar(&o.lpJobs, "lp-jobs", 1000, "longpoll: running jobs the pollers are spread over")
	lpRates := fs.String("lp-rates", "0.1,1", "longpoll: progress reports per second per job, comma-separated (each measured on a fresh Caddy)")
	fs.IntVar(&o.lpStreams, "lp-streams", 100, "longpoll: long-polls per HTTP/2 connection")
	fs.DurationVar(&o.lpWarmup, "lp-warmup", 5*time.Second, "longpoll: reporting before the window")
	fs.DurationVar(&o.lpWindow, "lp-window", 20*time.Second, "longpoll: the measured window")
	fs.IntVar(&o.restartJobs, "restart-jobs", 1000000, "restart: finished jobs in the full store")
	fs.IntVar(&o.restartRounds, "restart-rounds", 3, "restart: starts on each store, alternated")
	fs.StringVar(&o.fanShape, "fan-shape", "1000x10x1", "fanout: JOBSxSUBSCRIBERSxREPORTS_PER_SECOND (comma-separated for several)")
	fs.DurationVar(&o.fanWarmup, "fan-warmup", 5*time.Second, "fanout: reporting before the window")
	fs.DurationVar(&o.fanWindow, "fan-window", 20*time.Second, "fanout: the measured window")
	fs.IntVar(&o.fanRounds, "fan-rounds", 1, "fanout: rounds (every target and protocol in each)")
	fs.StringVar(&o.obsFanShapes, "obs-fan-shapes", "1000x10x1,100x10x10", "observe: fan-out shapes measured with tracing and metrics off and on (comma-separated; empty: none); -fan-warmup and -fan-window apply")
	fs.IntVar(&o.obsFanRounds, "obs-fan-rounds", 3, "observe: fan-out rounds (off and on alternated in each)")
	fs.Func("obs-env", "observe: KEY=VALUE added to Caddy's environment for the job-creation part (e.g. OTEL_TRACES_SAMPLER=parentbased_traceidratio); repeatable", func(v string) error {
		if !strings.Contains(v, "=") {
			return errors.New("want KEY=VALUE")
		}
		o.obsEnv = append(o.obsEnv, v)
		return nil
	})
	fs.Func("obs-on-global", `observe: a global progress option added to the "on" configuration, e.g. "traces off" (with "metrics off" too, "on" is Caddy's tracing directive alone); repeatable`, func(v string) error {
		o.obsOnGlobal = append(o.obsOnGlobal, v)
		return nil
	})
	fs.Func("idle-caddy-bin", "idle: also measure this prebuilt Caddy (e.g. of another commit), as caddy2, caddy3, …; repeatable", func(v string) error {
		o.idleCaddyBins = append(o.idleCaddyBins, v)
		return nil
	})
	fs.StringVar(&o.store, "store", "file", "file (a bbolt file, the default) | redis (a redis-server the harness starts; see redis.go)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	o.args = args
	for _, v := range strings.Split(*lpRates, ",") {
		rate, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil || rate <= 0 || rate > 100 {
			fmt.Fprintln(os.Stderr, "bench: -lp-rates takes numbers in (0, 100]")
			return 2
		}
		o.lpRates = append(o.lpRates, rate)
	}
	switch {
	case !oneOf(o.scenario, "tune", "passthrough", "create", "sweep", "all", "idle", "longpoll", "restart", "fanout", "scale", "observe"):
		fmt.Fprintln(os.Stderr, "bench: -scenario must be tune, passthrough, create, sweep, all, idle, longpoll, restart, fanout, scale or observe")
		return 2
	case !oneOf(o.store, "file", "redis"):
		fmt.Fprintln(os.Stderr, "bench: -store must be file or redis")
		return 2
	case o.store == "redis" && o.write:
		fmt.Fprintln(os.Stderr, "bench: -write records the bbolt figures; run -store redis without it")
		return 2
	case !oneOf(o.profile, "auto", "always", "never"):
		fmt.Fprintln(os.Stderr, "bench: -profile must be auto, always or never")
		return 2
	case o.rounds < 1 || o.rounds > 20, o.conns < 0 || o.streams < 0, o.conns*o.streams > 4096,
		o.duration <= 0 || o.duration > 5*time.Minute, o.warmup < 0 || o.warmup > time.Minute,
		o.tuneDuration <= 0 || o.tuneDuration > time.Minute, o.tuneWarmup < 0 || o.tuneWarmup > time.Minute,
		o.quietWait < 0 || o.quietWait > time.Hour,
		o.idleSubs < 1 || o.idleSubs > 1000000, o.idleStreams < 1 || o.idleStreams > 250,
		o.idleSources < 1 || o.idleSources > 250, o.idleJobs < 1 || o.idleJobs > 100000,
		o.idleHeartbeat < time.Second || o.idleHeartbeat > time.Hour,
		o.lpJobs < 1 || o.lpPollers < o.lpJobs || o.lpPollers > 200000,
		o.lpStreams < 1 || o.lpStreams > 250, o.lpWarmup < 0 || o.lpWarmup > time.Minute, o.lpWindow < time.Second || o.lpWindow > 5*time.Minute,
		o.restartJobs < 2 || o.restartJobs > 5000000, o.restartRounds < 1 || o.restartRounds > 10,
		o.fanWarmup < 0 || o.fanWarmup > time.Minute, o.fanWindow < 2*time.Second || o.fanWindow > 5*time.Minute, o.fanRounds < 1 || o.fanRounds > 10, o.obsFanRounds < 1 || o.obsFanRounds > 10:
		fmt.Fprintln(os.Stderr, "bench: a flag is out of range")
		return 2
	}
	if (o.conns == 0) != (o.streams == 0) {
		fmt.Fprintln(os.Stderr, "bench: give both -conns and -streams, or neither")
		return 2
	}

	// Every child is stopped however the harness ends: normal return, error, or a signal.
	defer child.StopAll()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	go func() {
		s := <-sigs
		fmt.Fprintf(os.Stderr, "\nbench: %v: stopping every process started\n", s)
		child.StopAll()
		os.Exit(130)
	}()

	h := &harness{opts: o}
	if err := h.run(); err != nil {
		h.logf("\nbench: FAILED: %v", err)
		if h.caddy != nil {
			h.dumpCaddyLog(60)
		}
		return 1
	}
	return 0
}

func oneOf(s string, list ...string) bool {
	for _, v := range list {
		if s == v {
			return true
		}
	}
	return false
}

// harness is one run.
type harness struct {
	opts    options
	root    string // module root
	dir     string // temporary folder of the run
	self    string // this program, re-executed as load generator and upstream
	goBin   string
	raw     bytes.Buffer // everything logged, for the raw output
	started time.Time

	caddyBin  string
	caddy     *child.Proc
	caddyLog  string
	upstream  *child.Proc
	upAddr    string
	admin     string
	portA     int
	portB     int
	storePath string
	storeURL  string      // with -store redis
	redis     *child.Proc // with -store redis
	caddyfile string

	machine     []kv
	quietBefore string
	conns       int
	streams     int
	tune        []*measurement
	tuneChoice  *measurement
	pass        [][2]*measurement // per round: A, B
	create      [][2]*measurement
	sweep       []*measurement
	checks      []string // results of the functional checks
	jobs202     int      // every 202 any client got from B, warm-up and checks included
	buckets     map[string]int
	profiles    []string
	caddyErrors []string
	finished    time.Time
	quietLeft   time.Duration     // what is left of the -quiet-wait budget
	quietWaited time.Duration     // waited before measurements
	repeated    []string          // measurements repeated because other processes disturbed them
	idle        []*idleResult     // bare, then caddy
	longpoll    []*longpollResult // per -lp-rates
	restart     []*restartResult  // 1 job, then -restart-jobs
	fanout      []fanout.Summary
	fanoutArgs  []string
	observe     *observeRun // -scenario observe (observe.go)
}

// kv is one row of a two-column table.
type kv struct{ k, v string }

// logf prints a line and keeps it for the raw output.
func (h *harness) logf(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	fmt.Println(line)
	h.raw.WriteString(line)
	h.raw.WriteByte('\n')
}

func (h *harness) run() error {
	h.started = time.Now()
	var err error
	if h.goBin, err = exec.LookPath("go"); err != nil {
		return fmt.Errorf("the go command is not on PATH: %w", err)
	}
	if h.self, err = os.Executable(); err != nil {
		return err
	}
	out, err := exec.Command(h.goBin, "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(out)) == "" || strings.TrimSpace(string(out)) == os.DevNull {
		return fmt.Errorf("run it inside the module (go env GOMOD: %q, %v)", out, err)
	}
	h.root = filepath.Dir(strings.TrimSpace(string(out)))
	if h.dir, err = os.MkdirTemp("", "progress-bench-"); err != nil {
		return err
	}
	if h.opts.keep {
		defer fmt.Printf("\nkept %s\n", h.dir)
	} else {
		defer os.RemoveAll(h.dir)
	}
	h.logf("# bench %s, started %s, loadavg %s", strings.Join(h.opts.args, " "), h.started.UTC().Format(time.RFC3339), loadavg())
	h.collectMachine()
	if err := h.waitQuiet(); err != nil {
		return err
	}
	if err := h.build(); err != nil {
		return err
	}
	if oneOf(h.opts.scenario, "idle", "longpoll", "restart", "fanout", "scale") {
		return h.runScale()
	}
	if h.opts.scenario == "observe" {
		return h.runObserve()
	}
	if err := h.startUpstream(); err != nil {
		return err
	}
	if h.opts.store == "redis" {
		if err := h.startRedis(); err != nil {
			return err
		}
	}
	if err := h.startCaddy(); err != nil {
		return err
	}
	if err := h.sanity(); err != nil {
		return err
	}
	s := h.opts.scenario
	h.conns, h.streams = h.opts.conns, h.opts.streams
	if s == "tune" || (s == "all" && h.conns == 0) {
		if err := h.runTune(); err != nil {
			return err
		}
	}
	if h.conns == 0 {
		h.conns, h.streams = 2, 16
	}
	if s == "passthrough" || s == "all" {
		if err := h.runPassthrough(); err != nil {
			return err
		}
	}
	if s == "create" || s == "all" {
		if err := h.runCreate(); err != nil {
			return err
		}
	}
	if s == "sweep" || s == "all" {
		if err := h.runSweep(); err != nil {
			return err
		}
	}
	if err := h.maybeProfile(); err != nil {
		return err
	}
	if err := h.stopCaddy(); err != nil {
		return err
	}
	h.upstream.Stop(5 * time.Second)
	if h.redis != nil {
		h.redis.Stop(5 * time.Second)
	}
	if h.redis == nil && (len(h.create) > 0 || len(h.sweep) > 0) {
		if err := h.countStore(); err != nil {
			return err
		}
	}
	h.finished = time.Now()
	h.logf("# end %s, loadavg %s", h.finished.UTC().Format(time.RFC3339), loadavg())
	report := h.report()
	fmt.Println()
	fmt.Println(report.tables)
	if h.opts.write {
		path := h.opts.benchFile
		if path == "" {
			path = filepath.Join(h.root, "BENCHMARKS.md")
		}
		if err := writeSection(path, sectionTitle, h.section(report)); err != nil {
			return err
		}
		fmt.Printf("wrote the %q section of %s\n", sectionTitle, path)
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// The machine

func (h *harness) collectMachine() {
	cpuModel := "?"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpuModel = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := "?"
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(line, "MemTotal:") {
				f := strings.Fields(line)
				if len(f) >= 2 {
					if n, err := strconv.ParseInt(f[1], 10, 64); err == nil {
						mem = commas(n) + " kB (`MemTotal`)"
					}
				}
			}
		}
	}
	kernel := "?"
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		kernel = strings.TrimSpace(string(b))
	}
	fsys := "?"
	if out, err := exec.Command("df", "-T", h.dir).Output(); err == nil {
		lines := strings.Split(strings.TrimSpace(string(out)), "\n")
		if f := strings.Fields(lines[len(lines)-1]); len(f) >= 2 {
			fsys = fmt.Sprintf("`%s`, %s (`df -T %s`), kernel %s", f[0], f[1], os.TempDir(), kernel)
		}
	}
	nproc := "?"
	if out, err := exec.Command("nproc").Output(); err == nil {
		nproc = strings.TrimSpace(string(out))
	}
	goVersion := "?"
	if out, err := exec.Command(h.goBin, "version").Output(); err == nil {
		goVersion = strings.TrimPrefix(strings.TrimSpace(string(out)), "go version ")
	}
	caddyVersion := "?"
	if out, err := h.goCmd("list", "-m", "-f", "{{.Version}}", "github.com/caddyserver/caddy/v2"); err == nil {
		caddyVersion = strings.TrimSpace(out)
	}
	bboltVersion := "?"
	if out, err := h.goCmd("list", "-m", "-f", "{{.Version}}", "go.etcd.io/bbolt"); err == nil {
		bboltVersion = strings.TrimSpace(out)
	}
	code := "?"
	if out, err := h.gitCmd("log", "-1", "--format=%h (\"%s\")"); err == nil {
		code = "commit `" + strings.TrimSpace(out)
		code = strings.Replace(code, " (", "` (", 1)
		if st, err := h.gitCmd("status", "--porcelain", "--", "engine", "store", "caddymodule", "progress.go"); err == nil {
			var dirty []string
			for _, line := range strings.Split(strings.TrimRight(st, "\n"), "\n") {
				if len(line) > 3 {
					dirty = append(dirty, "`"+strings.TrimSpace(line[3:])+"`")
				}
			}
			if len(dirty) > 0 {
				code += ", plus uncommitted changes to " + strings.Join(dirty, ", ")
			}
		}
	}
	h.machine = []kv{
		{"CPUs (`nproc`)", nproc},
		{"CPU (`/proc/cpuinfo` model name)", cpuModel},
		{"RAM", mem},
		{"Go", goVersion},
		{"Caddy", caddyVersion + " (`tests/caddy`: standard modules + this plugin, built by the harness)"},
		{"bbolt", bboltVersion},
		{"Temp dir filesystem (store file, certificates, logs)", fsys},
		{"Plugin code measured", code},
	}
	for _, r := range h.machine {
		h.logf("# %s: %s", r.k, r.v)
	}
}

func (h *harness) goCmd(args ...string) (string, error) {
	cmd := exec.Command(h.goBin, args...)
	cmd.Dir = h.root
	out, err := cmd.Output()
	return string(out), err
}

func (h *harness) gitCmd(args ...string) (string, error) {
	cmd := exec.Command("git", args...)
	cmd.Dir = h.root
	out, err := cmd.Output()
	return string(out), err
}

// ourPids are the processes of this run, by pid: they are not "other" load.
func (h *harness) ourPids() map[int]string {
	m := map[int]string{os.Getpid(): "harness", os.Getppid(): "go run"}
	if h.caddy != nil {
		m[h.caddy.PID()] = "caddy"
	}
	if h.upstream != nil {
		m[h.upstream.PID()] = "upstream"
	}
	if h.redis != nil {
		m[h.redis.PID()] = "redis-server"
	}
	return m
}

// Quiet means no other process used more than 10% of a CPU, and all of them together less
// than 25%, over a sample. A measurement whose window saw other processes use more than
// noisyPct of a CPU in all is disturbed: it is repeated, at most maxRepeats times.
const (
	quietEachPct  = 10
	quietTotalPct = 25
	noisyPct      = 15
	maxRepeats    = 2
)

// sampleOthers measures the other processes' CPU use over d.
func (h *harness) sampleOthers(d time.Duration) []procUse {
	a := takeSnapshot()
	time.Sleep(d)
	_, others := usage(a, takeSnapshot(), h.ourPids())
	return others
}

func isQuiet(others []procUse) bool {
	return (len(others) == 0 || others[0].Pct <= quietEachPct) && sumUse(others) < quietTotalPct
}

// waitQuiet waits until the machine is quiet (2 s samples, every 30 s). All waits of a run,
// this one and those before each measurement (gate), share one budget: -quiet-wait.
func (h *harness) waitQuiet() error {
	h.quietLeft = h.opts.quietWait
	start := time.Now()
	for attempt := 1; ; attempt++ {
		others := h.sampleOthers(2 * time.Second)
		total := sumUse(others)
		h.logf("# quiet check %d: other processes %s%% of a CPU in all, busiest: %s", attempt, trunc(total, 1), describeOthers(others, 4))
		if isQuiet(others) {
			h.quietBefore = fmt.Sprintf("yes, after waiting %v (other processes: %s%% of a CPU in all over a 2 s sample)",
				time.Since(start).Truncate(time.Second), trunc(total, 1))
			break
		}
		if time.Since(start)+30*time.Second > h.quietLeft {
			h.quietBefore = fmt.Sprintf("NO: still busy after waiting %v (other processes: %s%% of a CPU; %s)",
				time.Since(start).Truncate(time.Second), trunc(total, 1), describeOthers(others, 4))
			h.logf("# the machine did not become quiet within %v; measuring anyway", h.quietLeft)
			break
		}
		time.Sleep(30 * time.Second)
	}
	h.quietLeft -= time.Since(start)
	return nil
}

// gate waits, before a measurement, until the machine is quiet (1 s samples, every 10 s), out
// of what is left of the -quiet-wait budget.
func (h *harness) gate(name string) {
	start := time.Now()
	for {
		others := h.sampleOthers(time.Second)
		if isQuiet(others) {
			break
		}
		if time.Since(start)+10*time.Second > h.quietLeft {
			h.logf("# %s: the machine is busy (%s) and the -quiet-wait budget is spent; measuring anyway", name, describeOthers(others, 3))
			break
		}
		h.logf("# %s: waiting for a quiet machine: other processes %s%% of a CPU (%s)", name, trunc(sumUse(others), 1), describeOthers(others, 3))
		time.Sleep(10 * time.Second)
	}
	if waited := time.Since(start); waited > 2*time.Second {
		h.quietLeft -= waited
		h.quietWaited += waited
	}
}

// ---------------------------------------------------------------------------------------------
// Processes

func (h *harness) build() error {
	bin := filepath.Join(h.dir, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return err
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, h.goBin, "build", "-o", bin+string(filepath.Separator), "./tests/caddy")
	cmd.Dir = h.root
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build ./tests/caddy: %v\n%s", err, out)
	}
	h.caddyBin = filepath.Join(bin, "caddy")
	h.logf("# built %s in %v", h.caddyBin, time.Since(start).Truncate(time.Millisecond))
	return nil
}

func (h *harness) startUpstream() error {
	var out child.Output
	p, err := child.Start("upstream", h.self, []string{"__upstream", "-addr", "127.0.0.1:0"}, os.Environ(), h.dir, &out, os.Stderr, nil)
	if err != nil {
		return err
	}
	h.upstream = p
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if line, ok := out.FirstLine(); ok {
			if _, _, err := net.SplitHostPort(line); err != nil {
				return fmt.Errorf("upstream printed %q, not an address", line)
			}
			h.upAddr = line
			h.logf("# upstream (pid %d) on %s", p.PID(), line)
			return nil
		}
		if p.Exited() {
			return errors.New("the upstream exited at once")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("the upstream printed no address within 30s")
}

func (h *harness) startCaddy() error {
	ports, err := caddyrun.FreePorts(3)
	if err != nil {
		return err
	}
	h.admin = "127.0.0.1:" + strconv.Itoa(ports[0])
	h.portA, h.portB = ports[1], ports[2]
	h.storePath = filepath.Join(h.dir, "progress.db")
	h.caddyfile = h.benchCaddyfile("", "")
	if h.observe != nil {
		h.caddyfile = h.observeCaddyfile(observeOff)
	}
	configPath := filepath.Join(h.dir, "Caddyfile")
	if err := os.WriteFile(configPath, []byte(h.caddyfile), 0o600); err != nil {
		return err
	}
	env := []string{}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") || k == "CADDY_ADMIN" {
			continue
		}
		env = append(env, kv)
	}
	for _, d := range []string{"home", "data", "config"} {
		if err := os.MkdirAll(filepath.Join(h.dir, d), 0o700); err != nil {
			return err
		}
	}
	env = append(env, "HOME="+filepath.Join(h.dir, "home"), "XDG_DATA_HOME="+filepath.Join(h.dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(h.dir, "config"))
	if h.observe != nil {
		env = append(env, h.observe.sink.Env()...)
		env = append(env, h.opts.obsEnv...)
	}
	h.caddyLog = filepath.Join(h.dir, "caddy.log")
	logFile, err := os.Create(h.caddyLog)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child keeps its own descriptor
	p, err := child.Start("caddy", h.caddyBin, []string{"run", "--config", configPath, "--adapter", "caddyfile"}, env, h.dir, logFile, logFile, nil)
	if err != nil {
		return err
	}
	h.caddy = p
	// Ready when both sites answer over HTTP/2: the certificates of `tls internal` are issued
	// in the background after start.
	c := h.client()
	deadline := time.Now().Add(60 * time.Second)
	var lastErr error
	for attempt := 0; attempt < 600 && time.Now().Before(deadline); attempt++ {
		if p.Exited() {
			return errors.New("caddy exited at once")
		}
		lastErr = nil
		for _, port := range []int{h.portA, h.portB} {
			resp, err := c.Get(fmt.Sprintf("https://127.0.0.1:%d/ready", port))
			if err != nil {
				lastErr = err
				break
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
				lastErr = fmt.Errorf("port %d: %s over %s", port, resp.Status, resp.Proto)
				break
			}
		}
		if lastErr == nil {
			h.logf("# caddy (pid %d): admin %s, A https://127.0.0.1:%d, B https://127.0.0.1:%d, store %s",
				p.PID(), h.admin, h.portA, h.portB, h.storeLocation())
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("caddy's sites were not ready within 60s: %v", lastErr)
}

// benchCaddyfile is the Caddyfile of the two sites; global and siteB are extra lines (each
// ending in a newline, indented) for the global progress block and for site B.
func (h *harness) benchCaddyfile(global, siteB string) string {
	return fmt.Sprintf(`{
	admin %[1]s
	skip_install_trust
	auto_https disable_redirects
	storage file_system %[2]s
	servers {
		protocols h1 h2
	}
	progress {
		store %[3]s
%[7]s	}
}

# A: plain reverse proxy
https://127.0.0.1:%[4]d {
	bind 127.0.0.1
	tls internal
	reverse_proxy %[6]s
}

# B: the same, with the progress plugin (async prefer, the default)
https://127.0.0.1:%[5]d {
	bind 127.0.0.1
	tls internal
%[8]s	progress_api
	progress
	reverse_proxy %[6]s
}
`, h.admin, filepath.Join(h.dir, "storage"), h.storeLocation(), h.portA, h.portB, h.upAddr, global, siteB)
}

// client is the harness's own HTTP/2 client for checks.
func (h *harness) client() *http.Client {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

func (h *harness) stopCaddy() error {
	if h.caddy == nil {
		return nil
	}
	start := time.Now()
	h.caddy.Stop(20 * time.Second)
	h.logf("# caddy stopped in %v", time.Since(start).Truncate(time.Millisecond))
	b, err := os.ReadFile(h.caddyLog)
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `"level":"error"`) || strings.HasPrefix(line, "panic:") || strings.Contains(line, "fatal error:") {
			h.caddyErrors = append(h.caddyErrors, line)
		}
	}
	h.logf("# caddy log: %d error lines", len(h.caddyErrors))
	for i, line := range h.caddyErrors {
		if i == 5 {
			h.logf("#   …")
			break
		}
		h.logf("#   %s", clip(line, 300))
	}
	return nil
}

func (h *harness) dumpCaddyLog(n int) {
	b, err := os.ReadFile(h.caddyLog)
	if err != nil {
		return
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	fmt.Fprintf(os.Stderr, "last %d lines of %s:\n%s\n", len(lines), h.caddyLog, strings.Join(lines, "\n"))
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// ---------------------------------------------------------------------------------------------
// Functional checks

// requestBody is what the create scenario posts.
const requestBody = `{"report":"quarterly","year":2025}`

func (h *harness) urlA(path string) string {
	return fmt.Sprintf("https://127.0.0.1:%d%s", h.portA, path)
}
func (h *harness) urlB(path string) string {
	return fmt.Sprintf("https://127.0.0.1:%d%s", h.portB, path)
}

func (h *harness) sanity() error {
	c := h.client()
	defer c.CloseIdleConnections()
	for _, u := range []string{h.urlA("/report"), h.urlB("/report")} {
		resp, err := c.Get(u)
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(b) != upstreamBody || resp.Header.Get("Location") != "" {
			return fmt.Errorf("GET %s without Prefer: %s %q, want the upstream's 200", u, resp.Status, b)
		}
	}
	loc, err := h.createOne(c)
	if err != nil {
		return err
	}
	doc, err := h.followJob(c, loc)
	if err != nil {
		return err
	}
	h.check(fmt.Sprintf("before the load: GET without Prefer answers the upstream's 200 on A and B; a POST with `Prefer: respond-async` to B answers 202, and its job %s ends %s", loc, doc))
	return nil
}

// createOne posts one job to B and returns its Location.
func (h *harness) createOne(c *http.Client) (string, error) {
	req, _ := http.NewRequest(http.MethodPost, h.urlB("/reports/generate"), strings.NewReader(requestBody))
	req.Header.Set("Prefer", "respond-async")
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || resp.Header.Get("Location") == "" || resp.Header.Get("Preference-Applied") != "respond-async" {
		return "", fmt.Errorf("POST with Prefer: respond-async to B: %s %q, want 202 with Location", resp.Status, b)
	}
	h.jobs202++
	return resp.Header.Get("Location"), nil
}

// followJob polls a job (at most 30 s) until it has ended and checks its result.
func (h *harness) followJob(c *http.Client, location string) (string, error) {
	deadline := time.Now().Add(30 * time.Second)
	for attempt := 0; attempt < 300 && time.Now().Before(deadline); attempt++ {
		resp, err := c.Get(h.urlB(location))
		if err != nil {
			return "", err
		}
		var doc struct {
			ID       string `json:"id"`
			State    string `json:"state"`
			Seq      int    `json:"seq"`
			Response *struct {
				Status int `json:"status"`
			} `json:"response"`
		}
		err = json.NewDecoder(resp.Body).Decode(&doc)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || err != nil {
			return "", fmt.Errorf("GET %s: %s (%v)", location, resp.Status, err)
		}
		switch doc.State {
		case "queued", "running":
			time.Sleep(100 * time.Millisecond)
			continue
		case "succeeded":
		default:
			return "", fmt.Errorf("job %s ended %s", location, doc.State)
		}
		resp, err = c.Get(h.urlB(location + "/result"))
		if err != nil {
			return "", err
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != upstreamBody {
			return "", fmt.Errorf("GET %s/result: %s %q, want the upstream's body", location, resp.Status, b)
		}
		status := 0
		if doc.Response != nil {
			status = doc.Response.Status
		}
		return fmt.Sprintf("`succeeded` (seq %d, response status %d, `/result` replays the upstream's %d-byte body)", doc.Seq, status, len(b)), nil
	}
	return "", fmt.Errorf("job %s did not end within 30s", location)
}

func (h *harness) check(s string) {
	h.checks = append(h.checks, s)
	h.logf("# check: %s", s)
}

// ---------------------------------------------------------------------------------------------
// Measurements

// measurement is one load generator run against one site.
type measurement struct {
	name      string // e.g. "passthrough A round 2"
	site      string // A or B
	res       *loadResult
	cpu       map[string]float64 // % of one CPU over the window: caddy, upstream, load, harness
	others    []procUse          // other processes over the window
	machine   machineUse         // the whole machine over the window
	settle    time.Duration      // from the load generator's exit until Caddy was idle
	storeGrw  int64              // growth of the store file, bytes
	diskWrite int64              // bytes Caddy wrote to storage in the window (-1: unknown)
}

// loadSpec is the request a scenario sends to a site.
type loadSpec struct {
	url    string
	method string
	prefer string
	body   string
	expect int
}

func (h *harness) spec(scenario, site string) loadSpec {
	u := h.urlA
	if site == "B" {
		u = h.urlB
	}
	switch scenario {
	case "create":
		s := loadSpec{url: u("/reports/generate"), method: http.MethodPost, body: requestBody, expect: http.StatusOK}
		if site == "B" {
			s.prefer, s.expect = "respond-async", http.StatusAccepted
		}
		return s
	default:
		return loadSpec{url: u("/report"), method: http.MethodGet, expect: http.StatusOK}
	}
}

// measure waits for a quiet machine and runs the load generator; a run that other processes
// disturbed is repeated, at most maxRepeats times (the disturbed runs stay in the raw output).
// onWindow, if set, runs (on its own goroutine) when the window starts.
func (h *harness) measure(name, scenario, site string, conns, streams int, warmup, window time.Duration, onWindow func()) (*measurement, error) {
	for attempt := 0; ; attempt++ {
		h.gate(name)
		m, err := h.measureOnce(name, scenario, site, conns, streams, warmup, window, onWindow)
		if err != nil {
			return nil, err
		}
		if m.cpu == nil || sumUse(m.others) <= noisyPct || attempt == maxRepeats || onWindow != nil {
			return m, nil
		}
		h.repeated = append(h.repeated, fmt.Sprintf("%s (other processes %s%% of a CPU: %s)", name, trunc(sumUse(m.others), 1), describeOthers(m.others, 2)))
		h.logf("# %s was disturbed by other processes (%s%% of a CPU): measuring it again", name, trunc(sumUse(m.others), 1))
	}
}

func (h *harness) measureOnce(name, scenario, site string, conns, streams int, warmup, window time.Duration, onWindow func()) (*measurement, error) {
	if h.caddy.Exited() {
		return nil, errors.New("caddy has exited")
	}
	sp := h.spec(scenario, site)
	args := []string{"__load", "-url", sp.url, "-method", sp.method, "-expect", strconv.Itoa(sp.expect),
		"-conns", strconv.Itoa(conns), "-streams", strconv.Itoa(streams),
		"-warmup", warmup.String(), "-duration", window.String()}
	if sp.prefer != "" {
		args = append(args, "-prefer", sp.prefer)
	}
	if sp.body != "" {
		args = append(args, "-body", sp.body)
	}
	sizeBefore := fileSize(h.storePath)
	var stdout child.Output
	snaps := make(chan cpuSnapshot, 2)
	writes := make(chan int64, 2)
	caddyPid := h.caddy.PID()
	var stderr bytes.Buffer
	var loadPid int
	onLine := func(line string) {
		switch line {
		case markWindowStart:
			writes <- writeBytes(caddyPid)
			snaps <- takeSnapshot()
			if onWindow != nil {
				go onWindow()
			}
		case markWindowEnd:
			snaps <- takeSnapshot()
			writes <- writeBytes(caddyPid)
		}
	}
	p, err := child.Start("load "+name, h.self, args, os.Environ(), h.dir, &stdout, &stderr, onLine)
	if err != nil {
		return nil, err
	}
	loadPid = p.PID()
	if err := p.Wait(warmup + window + 90*time.Second); err != nil {
		return nil, fmt.Errorf("%v\n%s", err, stderr.String())
	}
	res := new(loadResult)
	if err := json.Unmarshal(stdout.Bytes(), res); err != nil {
		return nil, fmt.Errorf("load %s printed no result (%v):\n%s", name, err, stderr.String())
	}
	m := &measurement{name: name, site: site, res: res}
	if len(snaps) == 2 {
		a, b := <-snaps, <-snaps
		ours := h.ourPids()
		ours[loadPid] = "load"
		m.cpu, m.others = usage(a, b, ours)
		m.machine = machineUsage(a, b)
	}
	m.diskWrite = -1
	if len(writes) == 2 {
		if a, b := <-writes, <-writes; a >= 0 && b >= 0 {
			m.diskWrite = b - a
		}
	}
	m.settle = h.settle()
	m.storeGrw = fileSize(h.storePath) - sizeBefore
	h.logf("%s", m.summary())
	line, _ := json.Marshal(res)
	h.logf("  %s", line)
	if site == "B" && sp.prefer != "" {
		for s, n := range res.AllStatuses {
			if s == "202" {
				h.jobs202 += n
			}
		}
	}
	if res.Dials != conns {
		h.logf("  NOTE: %d connections were opened, %d intended", res.Dials, conns)
	}
	if caddyGone := h.caddy.Exited(); caddyGone {
		return nil, errors.New("caddy exited during the measurement")
	}
	return m, nil
}

func (m *measurement) summary() string {
	r := m.res
	cpu := "?"
	if m.cpu != nil {
		cpu = fmt.Sprintf("caddy %s%%, upstream %s%%, load %s%%, others %s%% (%s); machine busy %s%% (softirq %s%%), idle %s%%, iowait %s%%, steal %s%%",
			trunc(m.cpu["caddy"], 1), trunc(m.cpu["upstream"], 1), trunc(m.cpu["load"], 1),
			trunc(sumUse(m.others), 1), describeOthers(m.others, 3),
			trunc(m.machine.Busy, 1), trunc(m.machine.Softirq, 1), trunc(m.machine.Idle, 1), trunc(m.machine.IOWait, 1), trunc(m.machine.Steal, 1))
	}
	return fmt.Sprintf("%-24s %dx%d  %s %d/s  p50 %s  p90 %s  p99 %s  p99.9 %s  max %s ms  errors %d  statuses %v  | cpu %s | caddy wrote %s B to storage in the window%s | settle %v, store +%s B",
		m.name, r.Conns, r.Streams, strconv.Itoa(r.Expect), int64(r.RPS), trunc(r.P50, 3), trunc(r.P90, 3), trunc(r.P99, 3),
		trunc(r.P999, 3), trunc(r.Max, 3), r.Errors, r.Statuses, cpu, commas(m.diskWrite), m.perResponse(),
		m.settle.Truncate(time.Millisecond), commas(m.storeGrw))
}

// perResponse is the storage written per expected response, when anything was written.
func (m *measurement) perResponse() string {
	if m.diskWrite <= 0 || m.res.OK == 0 {
		return ""
	}
	return fmt.Sprintf(" (%s B per %d)", commas(m.diskWrite/int64(m.res.OK)), m.res.Expect)
}

// settle waits until Caddy has been idle (under 2% of a CPU) for two 250 ms samples in a row,
// at most 2 minutes, and returns how long that took.
func (h *harness) settle() time.Duration {
	start := time.Now()
	idle := 0
	_, last, err := procCPU(h.caddy.PID())
	if err != nil {
		return 0
	}
	for time.Since(start) < 2*time.Minute {
		time.Sleep(250 * time.Millisecond)
		_, now, err := procCPU(h.caddy.PID())
		if err != nil {
			break
		}
		if now-last <= 5*time.Millisecond {
			idle++
			if idle == 2 {
				return time.Since(start)
			}
		} else {
			idle = 0
		}
		last = now
	}
	h.logf("  NOTE: caddy was still busy 2 minutes after the load ended")
	return time.Since(start)
}

func fileSize(path string) int64 {
	fi, err := os.Stat(path)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// tuneCombos are the connection × stream combinations the tuning tries.
var tuneCombos = [][2]int{{1, 8}, {1, 32}, {2, 16}, {2, 64}, {4, 8}, {4, 32}, {8, 16}, {16, 16}}

func (h *harness) runTune() error {
	h.logf("\n## tune: plain reverse_proxy (A), GET, %v warm-up + %v window each", h.opts.tuneWarmup, h.opts.tuneDuration)
	for _, c := range tuneCombos {
		m, err := h.measure(fmt.Sprintf("tune A %dx%d", c[0], c[1]), "passthrough", "A", c[0], c[1], h.opts.tuneWarmup, h.opts.tuneDuration, nil)
		if err != nil {
			return err
		}
		h.tune = append(h.tune, m)
	}
	best := 0.0
	for _, m := range h.tune {
		best = max(best, m.res.RPS)
	}
	for _, m := range h.tune {
		if m.res.RPS < 0.97*best || m.res.Errors > 0 {
			continue
		}
		if h.tuneChoice == nil || m.res.P99 < h.tuneChoice.res.P99 {
			h.tuneChoice = m
		}
	}
	if h.tuneChoice == nil {
		return errors.New("tuning: every combination had errors")
	}
	h.conns, h.streams = h.tuneChoice.res.Conns, h.tuneChoice.res.Streams
	h.logf("# chosen: %d connections x %d streams (%d/s, p99 %s ms; fastest %d/s)",
		h.conns, h.streams, int64(h.tuneChoice.res.RPS), trunc(h.tuneChoice.res.P99, 3), int64(best))
	return nil
}

func (h *harness) runPassthrough() error {
	h.logf("\n## passthrough: GET without Prefer, %dx%d, %v warm-up + %v window, A and B alternated %d times",
		h.conns, h.streams, h.opts.warmup, h.opts.duration, h.opts.rounds)
	sizeBefore := fileSize(h.storePath)
	jobsBefore := h.jobs202
	for i := 1; i <= h.opts.rounds; i++ {
		var pair [2]*measurement
		for j, site := range []string{"A", "B"} {
			m, err := h.measure(fmt.Sprintf("passthrough %s round %d", site, i), "passthrough", site, h.conns, h.streams, h.opts.warmup, h.opts.duration, nil)
			if err != nil {
				return err
			}
			pair[j] = m
		}
		h.pass = append(h.pass, pair)
	}
	grew := fileSize(h.storePath) - sizeBefore
	h.check(fmt.Sprintf("passthrough: the store file grew by %s bytes over all passthrough rounds (no job, no disk write expected); %d jobs were created then",
		commas(grew), h.jobs202-jobsBefore))
	return nil
}

func (h *harness) runCreate() error {
	h.logf("\n## create: POST %d-byte JSON body; A without Prefer (200), B with Prefer: respond-async (202); %dx%d, %v warm-up + %v window, alternated %d times",
		len(requestBody), h.conns, h.streams, h.opts.warmup, h.opts.duration, h.opts.rounds)
	var last string
	for i := 1; i <= h.opts.rounds; i++ {
		var pair [2]*measurement
		for j, site := range []string{"A", "B"} {
			m, err := h.measure(fmt.Sprintf("create %s round %d", site, i), "create", site, h.conns, h.streams, h.opts.warmup, h.opts.duration, nil)
			if err != nil {
				return err
			}
			pair[j] = m
			if site == "B" && m.res.Location != "" {
				last = m.res.Location
			}
		}
		h.create = append(h.create, pair)
	}
	if last == "" {
		return errors.New("create: B answered no 202 with a Location")
	}
	c := h.client()
	defer c.CloseIdleConnections()
	doc, err := h.followJob(c, last)
	if err != nil {
		return fmt.Errorf("create: following a job created under load: %w", err)
	}
	h.check(fmt.Sprintf("create: a job created under load (%s, from the last B round) ends %s", last, doc))
	if h.redis == nil {
		h.check(fmt.Sprintf("create: store file %s bytes after the create rounds", commas(fileSize(h.storePath))))
	}
	return nil
}

// runSweep measures job creation on B alone under every combination the tuning tries.
func (h *harness) runSweep() error {
	h.logf("\n## sweep: create on B alone (Prefer: respond-async), %v warm-up + %v window each; informational", h.opts.tuneWarmup, h.opts.tuneDuration)
	for _, c := range tuneCombos {
		m, err := h.measure(fmt.Sprintf("sweep B %dx%d", c[0], c[1]), "create", "B", c[0], c[1], h.opts.tuneWarmup, h.opts.tuneDuration, nil)
		if err != nil {
			return err
		}
		h.sweep = append(h.sweep, m)
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// Profiles

func (h *harness) maybeProfile() error {
	var scenarios []string
	t := h.targets()
	for _, sc := range []string{"passthrough", "create"} {
		missed := false
		for _, tg := range t {
			if tg.scenario == sc && tg.measured && !tg.met {
				missed = true
			}
		}
		ran := (sc == "passthrough" && len(h.pass) > 0) || (sc == "create" && len(h.create) > 0)
		if ran && (h.opts.profile == "always" || (h.opts.profile == "auto" && missed)) {
			scenarios = append(scenarios, sc)
		}
	}
	for _, sc := range scenarios {
		for _, site := range []string{"A", "B"} {
			if err := h.profileOne(sc, site); err != nil {
				return err
			}
		}
	}
	return nil
}

// profileOne runs a scenario against one site once more, taking a 10 s CPU profile of Caddy in
// the window, and logs `go tool pprof -top` of it.
func (h *harness) profileOne(scenario, site string) error {
	path := filepath.Join(h.dir, fmt.Sprintf("caddy-%s-%s.pprof", scenario, site))
	errc := make(chan error, 1)
	fetch := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+h.admin+"/debug/pprof/profile?seconds=10", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			errc <- err
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			errc <- fmt.Errorf("admin pprof: %s %s", resp.Status, b)
			return
		}
		f, err := os.Create(path)
		if err != nil {
			errc <- err
			return
		}
		_, err = io.Copy(f, resp.Body)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		errc <- err
	}
	h.logf("\n## profile: %s %s, 10 s CPU profile of Caddy from %s/debug/pprof/profile?seconds=10", scenario, site, h.admin)
	if _, err := h.measure(fmt.Sprintf("profiled %s %s", scenario, site), scenario, site, h.conns, h.streams, h.opts.warmup, 12*time.Second, fetch); err != nil {
		return err
	}
	select {
	case err := <-errc:
		if err != nil {
			return err
		}
	case <-time.After(30 * time.Second):
		return errors.New("the profile did not arrive")
	}
	for _, args := range [][]string{
		{"tool", "pprof", "-top", "-nodecount=30", h.caddyBin, path},
		{"tool", "pprof", "-top", "-cum", "-nodecount=45", h.caddyBin, path},
	} {
		out, err := h.goCmd(args...)
		if err != nil {
			return fmt.Errorf("go %s: %v", strings.Join(args, " "), err)
		}
		h.logf("$ go %s", strings.Join(args[:len(args)-2], " ")+" caddy "+filepath.Base(path))
		h.logf("%s", strings.TrimRight(out, "\n"))
	}
	h.profiles = append(h.profiles, path)
	if h.opts.keep {
		h.logf("# profile kept: %s", path)
	}
	return nil
}

// ---------------------------------------------------------------------------------------------
// Figures

// trunc formats x with d decimals, cut toward zero: never rounded up.
func trunc(x float64, d int) string {
	p := math.Pow(10, float64(d))
	v := math.Trunc(x*p+math.Copysign(1e-9, x)) / p
	return strconv.FormatFloat(v, 'f', d, 64)
}

// commas writes n with thousands separators.
func commas(n int64) string {
	neg := n < 0
	if neg {
		n = -n
	}
	s := strconv.FormatInt(n, 10)
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

func rate(x float64) string { return commas(int64(math.Floor(x))) }

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
