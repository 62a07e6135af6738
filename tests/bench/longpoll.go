package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/samples"
)

// The long-poll scenario (issue #6, scenario 5): -lp-pollers concurrent long-pollers spread
// evenly over -lp-jobs running jobs (Caddy with the plugin, fresh store, fsync on), each job
// reporting progress -lp-rate times a second through its callback, as its upstream would.
// Every poller loops on GET /_jobs/{id}?after=<seq>&wait=30s over HTTP/2 (-lp-streams per
// connection), taking the next seq from the ETag of each answer. The wake-up latency of an
// answer is from just before the report it carries (found by "k<k>" in the message) was sent
// to the moment its body has been read; the harness sends the reports and runs the pollers,
// so both times come from one monotonic clock. Samples are kept for the reports sent in the
// -lp-window after a -lp-warmup; percentiles are exact. Target: p99 < 50 ms. Every poller
// should wake for every report of its job: the count of wake-ups against that is reported.

type longpollResult struct {
	pollers, jobs, conns int
	rate                 float64
	window               time.Duration
	reports              int64 // reports sent in the window
	expected             int64 // reports × pollers of their job
	lats                 []int64
	pollErrors           int64
	cbErrors             int64
	firstErr             string
	caddyPct, harnessPct float64 // % of one CPU over the window
	others               string
}

// runLongpoll measures at every rate of -lp-rates, each on a fresh Caddy.
func (h *harness) runLongpoll() error {
	for _, rate := range h.opts.lpRates {
		h.gate(fmt.Sprintf("longpoll at %s reports/s per job", trunc(rate, 2)))
		r, err := h.measureLongpoll(rate)
		if err != nil {
			return fmt.Errorf("longpoll at %s reports/s per job: %w", trunc(rate, 2), err)
		}
		h.longpoll = append(h.longpoll, r)
	}
	return nil
}

func (h *harness) measureLongpoll(rate float64) (*longpollResult, error) {
	o := h.opts
	up, err := caddyrun.StartUpstream()
	if err != nil {
		return nil, err
	}
	defer up.Close()
	c, err := caddyrun.Start(h.caddyBin, h.dir, up, caddyrun.Options{})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	jobs, err := c.MakeJobs(ctx, o.lpJobs)
	if err != nil {
		return nil, err
	}
	h.logf("\n# longpoll: %d pollers on %d jobs, %s reports/s per job, %d streams per connection, warm-up %v, window %v; caddy pid %d",
		o.lpPollers, o.lpJobs, trunc(rate, 2), o.lpStreams, o.lpWarmup, o.lpWindow, c.PID())
	r := &longpollResult{pollers: o.lpPollers, jobs: len(jobs), rate: rate, window: o.lpWindow}
	r.conns = (o.lpPollers + o.lpStreams - 1) / o.lpStreams

	period := time.Duration(float64(time.Second) / rate)
	perJob := int((o.lpWarmup+o.lpWindow).Seconds()*rate) + 16
	sent := make([][]atomic.Int64, len(jobs)) // report k of job j: send time, ns since base
	for j := range sent {
		sent[j] = make([]atomic.Int64, perJob)
	}
	base := time.Now()
	winStart, winEnd := int64(o.lpWarmup), int64(o.lpWarmup+o.lpWindow)
	runCtx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	var firstErr atomic.Value
	note := func(err error) { firstErr.CompareAndSwap(nil, err.Error()) }

	// Pollers.
	transports := make([]*http.Transport, r.conns)
	for i := range transports {
		transports[i] = caddyrun.H2Transport()
	}
	defer func() {
		for _, tr := range transports {
			tr.CloseIdleConnections()
		}
	}()
	var latMu sync.Mutex
	var pollErrors atomic.Int64
	var pollers sync.WaitGroup
	var started sync.WaitGroup
	for p := range o.lpPollers {
		j := p % len(jobs)
		status := strings.TrimSuffix(jobs[j].Events, "/events")
		cl := &http.Client{Transport: transports[p%r.conns]}
		pollers.Add(1)
		started.Add(1)
		go func() {
			defer pollers.Done()
			var mine []int64
			defer func() {
				latMu.Lock()
				r.lats = append(r.lats, mine...)
				latMu.Unlock()
			}()
			seq, first := "0", true
			for runCtx.Err() == nil {
				req, _ := http.NewRequestWithContext(runCtx, http.MethodGet, status+"?after="+seq+"&wait=30s", nil)
				resp, err := cl.Do(req)
				if err != nil {
					if runCtx.Err() == nil {
						pollErrors.Add(1)
						note(fmt.Errorf("poll: %w", err))
						time.Sleep(100 * time.Millisecond) // no spin on a broken connection
					}
					continue
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				t1 := int64(time.Since(base))
				if first {
					first = false
					started.Done()
				}
				switch {
				case err != nil:
					if runCtx.Err() == nil {
						pollErrors.Add(1)
						note(fmt.Errorf("poll body: %w", err))
					}
					continue
				case resp.StatusCode == http.StatusNotModified:
					continue
				case resp.StatusCode != http.StatusOK:
					pollErrors.Add(1)
					note(fmt.Errorf("poll: %s %s", resp.Status, bytes.TrimSpace(body[:min(len(body), 200)])))
					time.Sleep(100 * time.Millisecond)
					continue
				}
				if etag := strings.Trim(resp.Header.Get("ETag"), `W/"`); etag != "" {
					seq = etag
				}
				if k := samples.MessageKey(body); k >= 0 && k < int64(perJob) {
					if t0 := sent[j][k].Load(); t0 >= winStart && t0 < winEnd {
						mine = append(mine, t1-t0)
					}
				}
			}
		}()
	}
	started.Wait() // every poller has its first answer (the current document): all now wait

	// A CPU profile of Caddy over 10 s of the window: where a wake-up's time goes.
	profile := filepath.Join(h.dir, fmt.Sprintf("longpoll-%s.pprof", trunc(rate, 2)))
	profiled := make(chan error, 1)
	go func() {
		time.Sleep(o.lpWarmup + o.lpWindow/4)
		profiled <- c.Profile(ctx, int(min(10*time.Second, o.lpWindow/2)/time.Second), profile)
	}()

	// Reporters: one per job, its reports spread evenly across the period.
	var cbErrors, reports atomic.Int64
	cbClient := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}, Timeout: 30 * time.Second}
	var reporters sync.WaitGroup
	windowDone := make(chan struct{})
	go func() {
		time.Sleep(o.lpWarmup)
		a := takeSnapshot()
		time.Sleep(o.lpWindow)
		b := takeSnapshot()
		ours := h.ourPids()
		ours[c.PID()] = "caddy"
		mine, others := usage(a, b, ours)
		r.caddyPct, r.harnessPct = mine["caddy"], mine["harness"]
		r.others = fmt.Sprintf("%s%% of a CPU in all (%s)", trunc(sumUse(others), 1), describeOthers(others, 3))
		close(windowDone)
	}()
	runStart := time.Now()
	for j := range jobs {
		reporters.Add(1)
		go func() {
			defer reporters.Done()
			offset := time.Duration(int64(period) * int64(j) / int64(len(jobs)))
			body := make([]byte, 0, 64)
			for k := range perJob - 16 {
				next := runStart.Add(offset + time.Duration(k)*period)
				if next.After(runStart.Add(o.lpWarmup + o.lpWindow)) {
					return
				}
				time.Sleep(time.Until(next))
				body = append(body[:0], `{"percent":`...)
				body = strconv.AppendInt(body, int64(k%100), 10)
				body = append(body, `,"message":"k`...)
				body = strconv.AppendInt(body, int64(k), 10)
				body = append(body, `"}`...)
				t0 := int64(time.Since(base))
				sent[j][k].Store(t0)
				if t0 >= winStart && t0 < winEnd {
					reports.Add(1)
				}
				if err := post(runCtx, cbClient, jobs[j].Callback, jobs[j].Token, body); err != nil {
					cbErrors.Add(1)
					note(err)
				}
			}
		}()
	}
	reporters.Wait()
	<-windowDone
	// The last reports' wake-ups are in flight: wait for them, boundedly, then stop.
	time.Sleep(2 * time.Second)
	stopRun()
	pollers.Wait()
	cbClient.CloseIdleConnections()

	r.reports = reports.Load()
	r.expected = r.reports * int64(o.lpPollers/len(jobs))
	r.pollErrors, r.cbErrors = pollErrors.Load(), cbErrors.Load()
	if v := firstErr.Load(); v != nil {
		r.firstErr = v.(string)
	}
	slices.Sort(r.lats)
	if err := <-profiled; err != nil {
		h.logf("# longpoll: CPU profile: %v", err)
	} else {
		h.pprofTop("longpoll "+trunc(rate, 2)+"/s per job: Caddy's CPU profile", profile)
	}
	h.logf("# longpoll: %d wake-ups measured of %d expected (%d reports in the window × %d pollers per job); poll errors %d, callback errors %d%s",
		len(r.lats), r.expected, r.reports, o.lpPollers/len(jobs), r.pollErrors, r.cbErrors, ifErr(r.firstErr))
	h.logf("# longpoll: wake-up latency p50 %s p90 %s p99 %s p99.9 %s max %s; CPU in the window: caddy %s%%, harness %s%% of a CPU; other processes %s",
		msStr(samples.Pct(r.lats, 0.5)), msStr(samples.Pct(r.lats, 0.9)), msStr(samples.Pct(r.lats, 0.99)), msStr(samples.Pct(r.lats, 0.999)),
		msStr(samples.Pct(r.lats, 1)), trunc(r.caddyPct, 1), trunc(r.harnessPct, 1), r.others)
	if lines := c.ErrorLines(); len(lines) > 0 {
		h.logf("# longpoll: caddy logged %d errors, first: %s", len(lines), lines[0])
	}
	return r, nil
}

// pprofTop logs `go tool pprof -top` of a CPU profile of Caddy.
func (h *harness) pprofTop(title, path string) {
	out, err := exec.Command(h.goBin, "tool", "pprof", "-top", "-nodecount=30", h.caddyBin, path).CombinedOutput()
	if err != nil {
		h.logf("# go tool pprof: %v", err)
	}
	h.logf("# %s (go tool pprof -top)\n%s", title, strings.TrimSpace(string(out)))
}

func ifErr(s string) string {
	if s == "" {
		return ""
	}
	return "; first: " + s
}

// msStr is a duration in ns as milliseconds, truncated to 0.01 ms.
func msStr(ns int64) string {
	if ns < 0 {
		return "-"
	}
	return trunc(float64(ns)/1e6, 2) + " ms"
}

// longpollTable is the long-poll scenario's table (Markdown), a row per rate.
func (h *harness) longpollTable() string {
	if len(h.longpoll) == 0 {
		return ""
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("| pollers | jobs | reports/s | wake-ups measured / expected | p50 | p90 | p99 | p99.9 | max | Caddy CPU | Caddy CPU per 1,000 wake-ups/s | harness CPU |\n")
	w("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range h.longpoll {
		wakesPerSec := float64(len(r.lats)) / r.window.Seconds()
		cpuPer1000 := "-"
		if wakesPerSec > 0 {
			cpuPer1000 = trunc(r.caddyPct/(wakesPerSec/1000), 1) + "%"
		}
		w("| %s | %s | %s | %s / %s | %s | %s | %s | %s | %s | %s%% | %s | %s%% |\n", commas(int64(r.pollers)), commas(int64(r.jobs)), trunc(r.rate*float64(r.jobs), 0),
			commas(int64(len(r.lats))), commas(r.expected), msStr(samples.Pct(r.lats, 0.5)), msStr(samples.Pct(r.lats, 0.9)), msStr(samples.Pct(r.lats, 0.99)),
			msStr(samples.Pct(r.lats, 0.999)), msStr(samples.Pct(r.lats, 1)), trunc(r.caddyPct, 1), cpuPer1000, trunc(r.harnessPct, 1))
	}
	w("\n")
	for _, r := range h.longpoll {
		p99 := samples.Pct(r.lats, 0.99)
		verdict := "met"
		if p99 < 0 || p99 >= int64(50*time.Millisecond) || int64(len(r.lats)) < r.expected {
			verdict = "MISSED"
		}
		w("Target at %s reports/s (%s wake-ups/s offered): p99 wake-up < 50 ms, every poller woken for every report: %s (p99 %s; %s of %s wake-ups; poll errors %d, callback errors %d; other processes %s)\n\n",
			trunc(r.rate*float64(r.jobs), 0), commas(r.expected/int64(r.window.Seconds())), verdict, msStr(p99), commas(int64(len(r.lats))), commas(r.expected), r.pollErrors, r.cbErrors, r.others)
	}
	return b.String()
}

// runScale runs the scenarios of issue #6 that -scenario names (scale: all of them), prints
// their tables and, with -write, writes their section of BENCHMARKS.md.
func (h *harness) runScale() error {
	s := h.opts.scenario
	if s == "idle" || s == "scale" {
		if err := h.runIdle(); err != nil {
			return err
		}
	}
	if s == "longpoll" || s == "scale" {
		if err := h.runLongpoll(); err != nil {
			return err
		}
	}
	if s == "restart" || s == "scale" {
		if err := h.runRestart(); err != nil {
			return err
		}
	}
	if s == "fanout" || s == "scale" {
		if err := h.runFanout(); err != nil {
			return err
		}
	}
	h.finished = time.Now()
	h.logf("# end %s, loadavg %s", h.finished.UTC().Format(time.RFC3339), loadavg())
	fmt.Println()
	fmt.Println(h.idleTable())
	fmt.Println(h.longpollTable())
	fmt.Println(h.restartTable())
	fmt.Println(h.fanoutTable())
	if h.opts.write {
		return h.writeScaleSection()
	}
	return nil
}
