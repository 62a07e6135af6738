package main

import (
	"fmt"
	"os"
	"runtime"
	"sort"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// sectionTitle is the heading of the section -write replaces in BENCHMARKS.md.
const sectionTitle = "## Caddy plugin (issue 3)"

// analysisTitle is the heading of the hand-written part of the section: -write keeps it.
const analysisTitle = "### Analysis"

// target is one of issue #3's targets, as measured.
type target struct {
	scenario string
	name     string
	want     string
	figure   string
	rounds   string // the figure of every round
	measured bool
	met      bool
	every    bool // every round met it, not only the median
}

func (h *harness) targets() []target {
	var t []target
	if len(h.pass) > 0 {
		a, b, ratios := h.series(h.pass, func(r *loadResult) float64 { return r.RPS })
		ratio := median(b) / median(a)
		t = append(t, target{scenario: "passthrough", name: "passthrough: B req/s ÷ A req/s (medians)", want: "≥ 0.97",
			figure: trunc(ratio, 3), rounds: joinF(ratios, 3), measured: true, met: ratio >= 0.97, every: allAtLeast(ratios, 0.97)},
			target{scenario: "passthrough-paired", name: "passthrough: median of the per-round B ÷ A (each B beside its A; informational)", want: "≥ 0.97",
				figure: trunc(median(ratios), 3), rounds: joinF(ratios, 3), measured: true, met: median(ratios) >= 0.97, every: allAtLeast(ratios, 0.97)})
	}
	if len(h.create) > 0 {
		a, b, ratios := h.series(h.create, func(r *loadResult) float64 { return r.RPS })
		p99b := make([]float64, len(h.create))
		for i, pair := range h.create {
			p99b[i] = pair[1].res.P99
		}
		var perRound []string
		for _, x := range b {
			perRound = append(perRound, rate(x))
		}
		t = append(t,
			target{scenario: "create", name: "create: 202/s on B (median)", want: "≥ 10,000", figure: rate(median(b)),
				rounds: strings.Join(perRound, ", "), measured: true, met: median(b) >= 10000, every: allAtLeast(b, 10000)},
			target{scenario: "create", name: "create: p99 latency of the 202s (median of the rounds)", want: "< 20 ms",
				figure: trunc(median(p99b), 3) + " ms", rounds: joinF(p99b, 3), measured: true, met: median(p99b) < 20, every: allBelow(p99b, 20)},
			target{scenario: "create", name: "create: B 202/s ÷ A 200/s (medians)", want: "≥ 0.5", figure: trunc(median(b)/median(a), 3),
				rounds: joinF(ratios, 3), measured: true, met: median(b)/median(a) >= 0.5, every: allAtLeast(ratios, 0.5)})
	}
	return t
}

// series splits pairs into the A figures, the B figures and the per-round B/A ratios.
func (h *harness) series(pairs [][2]*measurement, f func(*loadResult) float64) (a, b, ratio []float64) {
	for _, p := range pairs {
		x, y := f(p[0].res), f(p[1].res)
		a, b, ratio = append(a, x), append(b, y), append(ratio, y/x)
	}
	return a, b, ratio
}

func joinF(xs []float64, d int) string {
	var s []string
	for _, x := range xs {
		s = append(s, trunc(x, d))
	}
	return strings.Join(s, ", ")
}

func allAtLeast(xs []float64, v float64) bool {
	for _, x := range xs {
		if x < v {
			return false
		}
	}
	return true
}

func allBelow(xs []float64, v float64) bool {
	for _, x := range xs {
		if x >= v {
			return false
		}
	}
	return true
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "**no**"
}

// report is the run's tables, as markdown.
type report struct {
	tables string
}

func (h *harness) report() report {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	if len(h.tune) > 0 {
		w("**Load generator concurrency** (plain `reverse_proxy`, site A, GET; %v warm-up + %v window each)\n\n", h.opts.tuneWarmup, h.opts.tuneDuration)
		w("| connections × streams | req/s | p50 | p99 | p99.9 | errors | caddy / upstream / load CPU | chosen |\n|---|---:|---:|---:|---:|---:|---|---|\n")
		for _, m := range h.tune {
			chosen := ""
			if m == h.tuneChoice {
				chosen = "**chosen**"
			}
			w("| %d × %d | %s | %s ms | %s ms | %s ms | %d | %s | %s |\n", m.res.Conns, m.res.Streams, rate(m.res.RPS),
				trunc(m.res.P50, 3), trunc(m.res.P99, 3), trunc(m.res.P999, 3), m.res.Errors+nonExpected(m.res), cpuCell(m), chosen)
		}
		w("\n")
	}
	pairTable := func(title, desc string, pairs [][2]*measurement, unitA, unitB string) {
		if len(pairs) == 0 {
			return
		}
		w("**%s**: %s (%d connections × %d streams, %v warm-up + %v window per measurement, A then B in each round)\n\n",
			title, desc, h.conns, h.streams, h.opts.warmup, h.opts.duration)
		w("| round | A %s | A p50 | A p99 | A p99.9 | A errors | B %s | B p50 | B p99 | B p99.9 | B errors | B ÷ A |\n", unitA, unitB)
		w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
		for i, p := range pairs {
			a, bb := p[0].res, p[1].res
			w("| %d | %s | %s ms | %s ms | %s ms | %d | %s | %s ms | %s ms | %s ms | %d | %s |\n", i+1,
				rate(a.RPS), trunc(a.P50, 3), trunc(a.P99, 3), trunc(a.P999, 3), a.Errors+nonExpected(a),
				rate(bb.RPS), trunc(bb.P50, 3), trunc(bb.P99, 3), trunc(bb.P999, 3), bb.Errors+nonExpected(bb), trunc(bb.RPS/a.RPS, 3))
		}
		col := func(site int, f func(*loadResult) float64) float64 {
			var xs []float64
			for _, p := range pairs {
				xs = append(xs, f(p[site].res))
			}
			return median(xs)
		}
		rps := func(r *loadResult) float64 { return r.RPS }
		p50 := func(r *loadResult) float64 { return r.P50 }
		p99 := func(r *loadResult) float64 { return r.P99 }
		p999 := func(r *loadResult) float64 { return r.P999 }
		w("| **median** | **%s** | %s ms | %s ms | %s ms | | **%s** | %s ms | %s ms | %s ms | | **%s** |\n\n",
			rate(col(0, rps)), trunc(col(0, p50), 3), trunc(col(0, p99), 3), trunc(col(0, p999), 3),
			rate(col(1, rps)), trunc(col(1, p50), 3), trunc(col(1, p99), 3), trunc(col(1, p999), 3),
			trunc(col(1, rps)/col(0, rps), 3))
	}
	pairTable("Passthrough", "GET without `Prefer`; A = plain `reverse_proxy`, B = `progress_api` + `progress` + `reverse_proxy`",
		h.pass, "req/s", "req/s")
	pairTable("Create", fmt.Sprintf("POST of a %d-byte JSON body; A without `Prefer` (the upstream's 200), B with `Prefer: respond-async` (only 202s counted)", len(requestBody)),
		h.create, "200/s", "202/s")
	if len(h.sweep) > 0 {
		w("**Create on B alone at other concurrency** (informational, not used for the targets: the targets are measured at the combination chosen for A; %v warm-up + %v window each)\n\n", h.opts.tuneWarmup, h.opts.tuneDuration)
		w("| connections × streams | 202/s | p50 | p99 | p99.9 | errors | caddy / upstream / load CPU | settle |\n|---|---:|---:|---:|---:|---:|---|---:|\n")
		for _, m := range h.sweep {
			w("| %d × %d | %s | %s ms | %s ms | %s ms | %d | %s | %v |\n", m.res.Conns, m.res.Streams, rate(m.res.RPS),
				trunc(m.res.P50, 3), trunc(m.res.P99, 3), trunc(m.res.P999, 3), m.res.Errors+nonExpected(m.res), cpuCell(m), m.settle.Truncate(time.Millisecond))
		}
		w("\n")
	}
	if t := h.targets(); len(t) > 0 {
		w("**Targets** (figures cut, never rounded up; met is decided on the exact figure)\n\n")
		w("| target | wanted | measured | each round | met (median) | met in every round |\n|---|---|---:|---|---|---|\n")
		for _, tg := range t {
			w("| %s | %s | %s | %s | %s | %s |\n", tg.name, tg.want, tg.figure, tg.rounds, yesNo(tg.met), yesNo(tg.every))
		}
		w("\n")
	}
	var all []*measurement
	for _, p := range append(append([][2]*measurement(nil), h.pass...), h.create...) {
		all = append(all, p[0], p[1])
	}
	if len(all) > 0 {
		w("**CPU use over each window** (%% of one CPU, from /proc; the machine has %d, so up to 100%% per core): Caddy, the upstream and the load generator share the cores. The \"machine\" columns come from /proc/stat: softirq is mostly loopback networking, which no process is charged for. \"Settle\" is how long Caddy stayed busy after the load stopped (the create jobs finishing in the background).\n\n", runtime.NumCPU())
		w("| measurement | caddy | upstream | load generator | other processes | machine busy (softirq) | machine idle + iowait | caddy's storage writes in the window | settle | store file growth |\n|---|---:|---:|---:|---|---:|---:|---:|---:|---:|\n")
		for _, m := range all {
			w("| %s | %s%% | %s%% | %s%% | %s%% (%s) | %s%% (%s%%) | %s%% | %s B%s | %v | %s B |\n", m.name, trunc(m.cpu["caddy"], 1), trunc(m.cpu["upstream"], 1),
				trunc(m.cpu["load"], 1), trunc(sumUse(m.others), 1), describeOthers(m.others, 2),
				trunc(m.machine.Busy, 1), trunc(m.machine.Softirq, 1), trunc(m.machine.Idle+m.machine.IOWait, 1),
				commas(m.diskWrite), m.perResponse(), m.settle.Truncate(time.Millisecond), commas(m.storeGrw))
		}
		w("\n")
	}
	if len(h.checks) > 0 || h.buckets != nil {
		w("**Checks**\n\n")
		for _, c := range h.checks {
			w("* %s\n", c)
		}
		w("* Caddy's log had %d error lines.\n\n", len(h.caddyErrors))
	}
	return report{tables: b.String()}
}

func nonExpected(r *loadResult) int {
	n := 0
	for s, c := range r.Statuses {
		if s != fmt.Sprint(r.Expect) {
			n += c
		}
	}
	return n
}

func cpuCell(m *measurement) string {
	if m.cpu == nil {
		return "?"
	}
	return fmt.Sprintf("%s%% / %s%% / %s%%", trunc(m.cpu["caddy"], 1), trunc(m.cpu["upstream"], 1), trunc(m.cpu["load"], 1))
}

// countStore opens the store file, read-only, once Caddy has stopped, and counts the keys of
// each top-level bucket: the jobs bucket should hold one job per 202 answered.
func (h *harness) countStore() error {
	db, err := bolt.Open(h.storePath, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		return fmt.Errorf("opening the store file after the run: %w", err)
	}
	defer db.Close()
	h.buckets = map[string]int{}
	err = db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			h.buckets[string(name)] = b.Stats().KeyN
			return nil
		})
	})
	if err != nil {
		return err
	}
	var names []string
	for n := range h.buckets {
		names = append(names, n)
	}
	sort.Strings(names)
	var parts []string
	for _, n := range names {
		parts = append(parts, fmt.Sprintf("%s %s", n, commas(int64(h.buckets[n]))))
	}
	verdict := "equal: one job per 202"
	if h.buckets["jobs"] != h.jobs202 {
		verdict = fmt.Sprintf("NOT equal (difference %d)", h.buckets["jobs"]-h.jobs202)
	}
	h.check(fmt.Sprintf("store after Caddy stopped: %s bytes; keys per bucket (nested included): %s. Jobs in the store: %s; 202s received by all clients (warm-up and checks included): %s, %s. Jobs not finished (`active`): %s",
		commas(fileSize(h.storePath)), strings.Join(parts, ", "), commas(int64(h.buckets["jobs"])), commas(int64(h.jobs202)), verdict, commas(int64(h.buckets["active"]))))
	return nil
}

// section is the whole BENCHMARKS.md section of this run.
func (h *harness) section(r report) string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("%s\n\n", sectionTitle)
	w("What the `progress` handler costs, measured end to end by `tests/bench` (see its package comment):\n")
	w("Caddy with this plugin, in front of an instant upstream, against plain `reverse_proxy` in the\n")
	w("same Caddy process, in the same run. Both sites serve HTTPS (`tls internal`) and the load\n")
	w("generator speaks HTTP/2. Every job is committed with fsync, as in production.\n\n")
	w("### Machine\n\n| | |\n|---|---|\n")
	for _, row := range h.machine {
		w("| %s | %s |\n", row.k, row.v)
	}
	w("| Machine quiet before the run | %s |\n", h.quietBefore)
	w("| Waits for a quiet machine between measurements | %v in all |\n", h.quietWaited.Truncate(time.Second))
	repeated := "none"
	if len(h.repeated) > 0 {
		repeated = strings.Join(h.repeated, "; ")
	}
	w("| Measurements repeated because other processes used more than %d%% of a CPU in their window | %s |\n", noisyPct, repeated)
	w("| Run | %s to %s (UTC) |\n\n", h.started.UTC().Format("2006-01-02 15:04:05"), h.finished.UTC().Format("15:04:05"))
	w("The machine has 2 cores, and the load generator, Caddy and the upstream share them, as is\n")
	w("usual for a single-host measurement: the load generator's own CPU is taken from Caddy's. Absolute\n")
	w("figures are therefore lower than Caddy alone on 2 cores would reach; the B ÷ A ratios compare like with\n")
	w("like. The CPU table below shows who used what in each window, other processes included.\n\n")
	w("### Set-up\n\n")
	w("Separate processes, all on loopback, each in its own process group (stopped at the end):\n\n")
	w("* Caddy, built by `go build -o <tmp>/bin/ ./tests/caddy`, run with its own HOME, XDG_DATA_HOME,\n")
	w("  XDG_CONFIG_HOME, admin port and store file in a temporary folder. Its Caddyfile (ports and\n")
	w("  folders of this run):\n\n```\n%s```\n\n", h.caddyfile)
	w("* The instant upstream: the harness binary re-executed as `__upstream`, a Go `net/http` server\n")
	w("  answering every request with 200 and a %d-byte JSON body at once, after reading the request body.\n", len(upstreamBody))
	w("* The load generator: the harness binary re-executed as `__load` for each measurement. It opens N\n")
	w("  HTTP/2 connections (one `net/http` Transport each, HTTP/2 only, TLS not verified on loopback),\n")
	w("  runs M closed-loop request loops on each (a loop sends its next request once it has read the\n")
	w("  previous response), warms up, then counts the responses completed in a fixed window and keeps\n")
	w("  every latency (percentiles are exact, nearest rank). Latency is from before `Client.Do` to the\n")
	w("  end of the body. Throughput counts only the expected status (200 for A, and for B in passthrough;\n")
	w("  202 for B in create).\n")
	w("* A and B are measured alternately (A B A B …), each after its own warm-up, and the medians\n")
	w("  are compared: the machine is shared and noisy. After every measurement the harness waits until\n")
	w("  Caddy is idle, so the background jobs of a create run finish before the next measurement.\n")
	w("* Before each measurement the harness waits until no other process uses more than %d%% of a CPU\n", quietEachPct)
	w("  (all together less than %d%%), out of one waiting budget for the whole run (`-quiet-wait`). A\n", quietTotalPct)
	w("  measurement whose window saw other processes use more than %d%% of a CPU in all is measured\n", noisyPct)
	w("  again, at most %d times; the disturbed runs stay in the raw output.\n\n", maxRepeats)
	w("### Commands\n\n```\ncd %s && go run ./tests/bench %s\n```\n\n", h.root, strings.Join(h.opts.args, " "))
	w("(`./xcaddy.sh bench` runs `go run ./tests/bench -write`.) The run took %v.\n\n", h.finished.Sub(h.started).Truncate(time.Second))
	if len(h.tune) > 0 {
		w("The connection × stream combination is chosen by the same run: the fastest for plain\n")
		w("`reverse_proxy` (A), or, of those within 3%% of the fastest, the one with the lowest p99, so\n")
		w("that more concurrency does not only add queueing. The same combination is then used for A and B.\n\n")
	}
	w("### Results\n\n%s", r.tables)
	w("%s\n\n", analysisTitle)
	w("%s", analysisPlaceholder)
	w("### Raw output\n\nEverything the harness printed; each measurement is one summary line and the load generator's\nJSON result. The `# ` lines are the harness's own.\n\n```\n%s```\n", h.raw.String())
	return b.String()
}

// analysisPlaceholder marks where the hand-written analysis goes; writeSection replaces it
// with the analysis of the section it replaces, if there was one.
const analysisPlaceholder = "<!-- analysis -->\n\n"

// writeSection replaces the section of path that starts with title (up to the next
// second-level heading outside a code block) with section, or appends it. A hand-written
// "### Analysis" part of the old section is kept.
func writeSection(path, title, section string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	text := string(old)
	start, end := findSection(text, title)
	analysis := "_No analysis written yet for this run._\n\n"
	if start >= 0 {
		if a := extractAnalysis(text[start:end]); a != "" {
			analysis = a
		}
	}
	section = strings.Replace(section, analysisPlaceholder, analysis, 1)
	var out string
	if start >= 0 {
		out = text[:start] + section + strings.TrimLeft(text[end:], "\n")
		if end < len(text) {
			out = text[:start] + section + "\n" + strings.TrimLeft(text[end:], "\n")
		}
	} else {
		out = strings.TrimRight(text, "\n") + "\n\n" + section
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(out), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// findSection returns the byte range of the second-level section titled title, or -1.
func findSection(text, title string) (start, end int) {
	start, end = -1, len(text)
	fence := false
	pos := 0
	for _, line := range strings.SplitAfter(text, "\n") {
		trimmed := strings.TrimRight(line, "\n")
		if strings.HasPrefix(trimmed, "```") {
			fence = !fence
		}
		if !fence && strings.HasPrefix(trimmed, "## ") {
			if start >= 0 {
				return start, pos
			}
			if trimmed == title {
				start = pos
			}
		}
		pos += len(line)
	}
	return start, end
}

// extractAnalysis returns the body of the "### Analysis" part of a section (up to the next
// heading of level 2 or 3 outside a code block), or "".
func extractAnalysis(section string) string {
	var b strings.Builder
	in, fence := false, false
	for _, line := range strings.SplitAfter(section, "\n") {
		trimmed := strings.TrimRight(line, "\n")
		if strings.HasPrefix(trimmed, "```") {
			fence = !fence
		}
		if !fence && (strings.HasPrefix(trimmed, "### ") || strings.HasPrefix(trimmed, "## ")) {
			if in {
				break
			}
			in = trimmed == analysisTitle
			continue
		}
		if in {
			b.WriteString(line)
		}
	}
	s := strings.Trim(b.String(), "\n")
	if s == "" {
		return ""
	}
	return s + "\n\n"
}
