package main

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// scaleTitle is the heading of the BENCHMARKS.md section -write replaces after a run of the
// issue-6 scenarios (-scenario idle, longpoll or scale).
const scaleTitle = "## Scale (issue 6)"

// scaleSection is the whole BENCHMARKS.md section of an issue-6 run.
func (h *harness) scaleSection() string {
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("%s\n\n", scaleTitle)
	w("Scenarios of issue #6 measured by `tests/bench` (see `tests/bench/idle.go` and\n")
	w("`tests/bench/longpoll.go`): every server, client and upstream is its own process on loopback,\n")
	w("Caddy is built from this tree (`go build ./tests/caddy`) and runs with a fresh store (fsync on).\n\n")
	w("### Machine\n\n| | |\n|---|---|\n")
	for _, row := range h.machine {
		w("| %s | %s |\n", row.k, row.v)
	}
	w("| Machine quiet before the run | %s |\n", h.quietBefore)
	w("| Waits for a quiet machine between measurements | %v in all |\n", h.quietWaited.Truncate(time.Second))
	w("| Run | %s to %s (UTC) |\n\n", h.started.UTC().Format("2006-01-02 15:04:05"), h.finished.UTC().Format("15:04:05"))
	w("### Commands\n\n```\ncd %s && go run ./tests/bench %s\n```\n\n", h.root, strings.Join(h.opts.args, " "))
	w("(`./xcaddy.sh bench-scale` runs `go run ./tests/bench -scenario scale -write`.) The run took %v.\n\n", h.finished.Sub(h.started).Truncate(time.Second))
	if len(h.idle) > 0 {
		w("### Idle subscribers (scenario 4)\n\n")
		w("%d idle SSE subscribers over HTTP/2 (%d streams per connection, client on %d loopback source addresses),\n",
			h.opts.idleSubs, h.opts.idleStreams, h.opts.idleSources)
		w("held by each server in turn: **bare** is a Go `net/http` HTTP/2 server (TLS) whose handler writes one comment,\n")
		w("flushes and waits (`bench __bare`); **caddy-floor** is the same Caddy binary with `bench_hold`, a handler of the\n")
		w("test build (`tests/caddy/hold.go`) that does the same inside Caddy; **caddy** is the plugin: %d running jobs,\n", h.opts.idleJobs)
		w("the subscribers spread over them, `heartbeat %v`.", h.opts.idleHeartbeat)
		if len(h.opts.idleCaddyBins) > 0 {
			w(" caddy2… are prebuilt Caddy binaries measured in the same run: %s.", strings.Join(h.opts.idleCaddyBins, ", "))
		}
		w("\nPhases: baseline (before any subscriber), fresh (every stream open and carrying what a new one carries: the\n")
		w("plugin and the floor one comment and one event, bare one comment), evented (after one more event on every\n")
		w("stream). Each reading follows a forced GC (`/debug/pprof/heap?gc=1`) and waits for a steady RSS\n")
		w("(`/proc/<pid>/status` VmRSS, three readings in a row within 0.5%%). The compared figure is RSS less the\n")
		w("heap the Go runtime has freed but not yet returned (HeapIdle − HeapReleased, from `/debug/vars`, read at\n")
		w("the same moment): after a GC the scavenger keeps free pages up to about the next heap goal, so raw RSS\n")
		w("carries the GC's timing; raw RSS is shown beside it.\n\n")
		w("%s\n", h.idleTable())
	}
	if len(h.longpoll) > 0 {
		w("### Long-poll wake-up (scenario 5)\n\n")
		var rates []string
		for _, r := range h.opts.lpRates {
			rates = append(rates, trunc(r, 2))
		}
		w("%d long-pollers on %d running jobs, each job reporting %s times a second (one Caddy per rate) through its\n",
			h.opts.lpPollers, h.opts.lpJobs, strings.Join(rates, " or "))
		w("callback; pollers loop\n")
		w("on `GET /_jobs/{id}?after=<seq>&wait=30s` over HTTP/2 (%d per connection). Latency: from just before the\n", h.opts.lpStreams)
		w("report is sent to the end of the answer that carries it (one clock: the harness sends and polls); every\n")
		w("update is durable (204) before it wakes anyone. Window %v after %v of warm-up. A 10 s CPU profile of\n", h.opts.lpWindow, h.opts.lpWarmup)
		w("Caddy is taken in each window (its top is in the raw output).\n\n")
		w("%s\n", h.longpollTable())
	}
	if len(h.restart) == 2 {
		w("### Restart with a full store (scenario 6)\n\n")
		w("A helper process (`bench __fill`) fills a store through the store package: each job created, its 29-byte\n")
		w("result written, finished (256 at a time, so commits group). Caddy is then started on that file in a fresh\n")
		w("folder, %d times alternately with a store of one job, and timed from just before the process starts to the\n", h.opts.restartRounds)
		w("first `200` for `GET /_jobs/<first job>` on its plain-HTTP `progress_api` site (polled every 5 ms): an\n")
		w("answer that needs the store open.\n\n")
		w("%s\n", h.restartTable())
	}
	if len(h.fanout) > 0 {
		w("### Fan-out over HTTP/2 and HTTP/3 (scenario 3)\n\n")
		w("`tests/internal/fanout` (the callback-to-subscriber harness of issue #4, shared with `tests/latency`), run\n")
		w("with this run's Caddy: `%s`. Shape: jobs × SSE subscribers per job × reports per\n", strings.Join(h.fanoutArgs, " "))
		w("second per job; each job's reporter posts its callback (HTTP/1.1) and waits for the 204 (durable); latency\n")
		w("is from just before the callback is sent to the subscriber's parse of the event carrying it (matched by\n")
		w("a key in the message). **hub** is the in-memory Go SSE hub (no store) over HTTP/2; caddy/h3 is Caddy's\n")
		w("HTTP/3 with quic-go's client. Caddy is started afresh with a new store for each measurement.\n\n")
		w("%s\n", h.fanoutTable())
	}
	w("%s\n\n", analysisTitle)
	w("%s", analysisPlaceholder)
	w("### Raw output\n\n```\n%s```\n", h.raw.String())
	return b.String()
}

// writeScaleSection writes the issue-6 section into BENCHMARKS.md (or -benchmarks).
func (h *harness) writeScaleSection() error { return h.writeBenchSection(scaleTitle, h.scaleSection()) }

// writeBenchSection replaces (or appends) the section titled title of BENCHMARKS.md (or
// -benchmarks) with section.
func (h *harness) writeBenchSection(title, section string) error {
	path := h.opts.benchFile
	if path == "" {
		path = filepath.Join(h.root, "BENCHMARKS.md")
	}
	if err := writeSection(path, title, section); err != nil {
		return err
	}
	fmt.Printf("wrote the %q section of %s\n", title, path)
	return nil
}
