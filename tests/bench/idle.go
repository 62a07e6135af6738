package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
)

// The idle scenario (issue #6, scenario 4): how much resident memory an idle SSE subscriber
// costs Caddy with the plugin, against a bare Go net/http HTTP/2 server whose handler only
// holds an event stream open (bareMain), in the same run. For each target in turn:
//
//  1. start it (Caddy: a fresh store, -idle-jobs running jobs held open by the harness's
//     upstream, heartbeats every -idle-heartbeat; bare: nothing more);
//  2. settle (below) and read its RSS: the baseline;
//  3. start the client (`bench __idle`), which opens -idle-subscribers streams over HTTP/2,
//     -idle-streams per connection, spread over -idle-sources source addresses and over the
//     jobs; once every stream is open and has carried what a fresh one carries, settle and
//     read the RSS: fresh;
//  4. make every stream carry one event (Caddy: one progress callback per job; bare: its
//     /fire), wait until the client has seen it on every stream, settle, read the RSS: evented.
//
// Settling: ask the target for a heap profile after a GC (/debug/pprof/heap?gc=1, Caddy's
// admin endpoint and the bare server's admin listener alike), then read VmRSS from
// /proc/<pid>/status every second until three readings in a row are within 0.5% of each other
// (at most 60 s). Per subscriber = (RSS − baseline) / subscribers. Target: Caddy ÷ bare ≤ 1.25,
// fresh and evented.

// idleTarget is one server under the idle measurement.
type idleTarget struct {
	name      string
	pid       int
	admin     string   // host:port serving /debug/pprof
	urls      []string // event streams the client spreads its streams over
	freshData int      // data lines a fresh stream carries
	fire      func(ctx context.Context) error
	stop      func()
	caddy     *caddyrun.Caddy
}

// rssReading is one settled reading, in kB: RSS, RSS less the free heap not yet returned to
// the kernel (the figure compared), and the goroutine stacks in use.
type rssReading struct{ raw, held, stack int64 }

// idleResult is one target's figures.
type idleResult struct {
	target              string
	subscribers, conns  int
	base, fresh, evened rssReading
	goroutinesBase      int
	goroutinesFresh     int
	goroutinesEvented   int
	openTime, eventTime time.Duration
	heapProfiles        []string
}

// perSub is bytes per subscriber beyond the baseline, of the compared figure.
func (r *idleResult) perSub(x rssReading) float64 {
	return float64(x.held-r.base.held) * 1024 / float64(r.subscribers)
}

// perSubRaw is the same of the raw RSS.
func (r *idleResult) perSubRaw(x rssReading) float64 {
	return float64(x.raw-r.base.raw) * 1024 / float64(r.subscribers)
}

// perSubStack is the goroutine stacks per subscriber beyond the baseline.
func (r *idleResult) perSubStack(x rssReading) float64 {
	return float64(x.stack-r.base.stack) * 1024 / float64(r.subscribers)
}

// raiseNoFile lifts this process's open-file limit (children inherit it): every TCP connection
// is a descriptor in the client and in the server.
func raiseNoFile(want uint64) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return
	}
	if lim.Max < want {
		lim.Max = want // only root may; otherwise the old hard limit stays
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
		lim.Cur = lim.Max
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
}

func (h *harness) runIdle() error {
	raiseNoFile(1 << 20)
	var lim syscall.Rlimit
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	h.logf("\n# idle: %d subscribers, %d streams per connection, %d source addresses, %d jobs, heartbeat %v, open-file limit %d",
		h.opts.idleSubs, h.opts.idleStreams, h.opts.idleSources, h.opts.idleJobs, h.opts.idleHeartbeat, lim.Cur)
	names := []string{"bare", "caddy-floor", "caddy"}
	for i := range h.opts.idleCaddyBins {
		names = append(names, fmt.Sprintf("caddy%d", i+2))
	}
	for _, name := range names {
		h.gate("idle " + name)
		r, err := h.measureIdle(name)
		if err != nil {
			return fmt.Errorf("idle %s: %w", name, err)
		}
		h.idle = append(h.idle, r)
	}
	return nil
}

func (h *harness) startIdleTarget(name string) (*idleTarget, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	switch name {
	case "bare":
		var out child.Output
		p, err := child.Start("bare", h.self, []string{"__bare"}, os.Environ(), h.dir, &out, os.Stderr, nil)
		if err != nil {
			return nil, err
		}
		line, err := waitFirstLine(p, &out, 30*time.Second)
		if err != nil {
			p.Stop(time.Second)
			return nil, err
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			p.Stop(time.Second)
			return nil, fmt.Errorf("bare printed %q", line)
		}
		t := &idleTarget{name: name, pid: p.PID(), admin: f[1], urls: []string{"https://" + f[0] + "/events"}, stop: func() { p.Stop(10 * time.Second) }}
		t.fire = func(ctx context.Context) error {
			return post(ctx, http.DefaultClient, "http://"+t.admin+"/fire", "", nil)
		}
		return t, nil
	case "caddy-floor":
		up, err := caddyrun.StartUpstream()
		if err != nil {
			return nil, err
		}
		c, err := caddyrun.Start(h.caddyBin, h.dir, up, caddyrun.Options{HoldSite: true})
		if err != nil {
			up.Close()
			return nil, err
		}
		hold := fmt.Sprintf("https://127.0.0.1:%d/events", c.HoldPort)
		t := &idleTarget{name: name, pid: c.PID(), admin: c.Admin, urls: []string{hold}, freshData: 1, stop: func() { up.Close(); c.Close() }, caddy: c}
		t.fire = func(ctx context.Context) error {
			cl := caddyrun.H2Client()
			defer cl.CloseIdleConnections()
			return post(ctx, cl, hold, "", nil)
		}
		return t, nil
	default:
		up, err := caddyrun.StartUpstream()
		if err != nil {
			return nil, err
		}
		bin := h.caddyBin
		if n, ok := strings.CutPrefix(name, "caddy"); ok && n != "" {
			i, _ := strconv.Atoi(n)
			bin = h.opts.idleCaddyBins[i-2]
		}
		c, err := caddyrun.Start(bin, h.dir, up, caddyrun.Options{Progress: "\t\theartbeat " + h.opts.idleHeartbeat.String()})
		if err != nil {
			up.Close()
			return nil, err
		}
		stop := func() { up.Close(); c.Close() }
		jobs, err := c.MakeJobs(ctx, h.opts.idleJobs)
		if err != nil {
			stop()
			return nil, err
		}
		t := &idleTarget{name: name, pid: c.PID(), admin: c.Admin, freshData: 1, stop: stop, caddy: c}
		for _, j := range jobs {
			t.urls = append(t.urls, j.Events)
		}
		t.fire = func(ctx context.Context) error { return fireCallbacks(ctx, jobs) }
		h.logf("# idle %s (%s, pid %d): %d jobs running, %s", name, bin, c.PID(), len(jobs), strings.ReplaceAll(strings.TrimSpace(c.Caddyfile), "\n", " "))
		return t, nil
	}
}

// fireCallbacks posts one progress report to every job, as its upstream would, 32 at a time.
func fireCallbacks(ctx context.Context, jobs []caddyrun.Job) error {
	cl := &http.Client{Timeout: 30 * time.Second}
	defer cl.CloseIdleConnections()
	errc := make(chan error, len(jobs))
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for _, j := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			errc <- post(ctx, cl, j.Callback, j.Token, []byte(`{"percent":50,"message":"idle scenario"}`))
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			return err
		}
	}
	return nil
}

// post sends a POST and wants a 2xx.
func post(ctx context.Context, cl *http.Client, url, token string, body []byte) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := cl.Do(req)
	if err != nil {
		return err
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("POST %s: %s %s", url, resp.Status, b)
	}
	return nil
}

func waitFirstLine(p *child.Proc, out *child.Output, limit time.Duration) (string, error) {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		if line, ok := out.FirstLine(); ok {
			return line, nil
		}
		if p.Exited() {
			return "", errors.New("exited at once")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "", fmt.Errorf("printed nothing within %v", limit)
}

// lineWatcher passes a child's output lines to a channel (dropping none: the client prints
// few) and to the harness's log.
type lineWatcher struct {
	mu    sync.Mutex
	part  []byte
	lines chan string
}

func (w *lineWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.part = append(w.part, p...)
	for {
		i := bytes.IndexByte(w.part, '\n')
		if i < 0 {
			break
		}
		line := string(w.part[:i])
		w.part = w.part[i+1:]
		select {
		case w.lines <- line:
		default: // progress lines nobody waits for
		}
	}
	return len(p), nil
}

// waitClient waits for a client line starting with want, logging its progress lines.
func (h *harness) waitClient(lines <-chan string, client *child.Proc, want string, limit time.Duration) error {
	deadline := time.After(limit)
	for {
		select {
		case line := <-lines:
			switch {
			case strings.HasPrefix(line, want):
				return nil
			case strings.HasPrefix(line, "failed"):
				return errors.New("client: " + line)
			case strings.HasPrefix(line, "progress"):
				h.logf("#   client %s", line)
			}
		case <-deadline:
			return fmt.Errorf("the client did not say %q within %v", want, limit)
		case <-time.After(time.Second):
			if client.Exited() {
				return errors.New("the client exited")
			}
		}
	}
}

func (h *harness) measureIdle(name string) (*idleResult, error) {
	t, err := h.startIdleTarget(name)
	if err != nil {
		return nil, err
	}
	defer t.stop()
	n := h.opts.idleSubs
	r := &idleResult{target: name, subscribers: n, conns: (n + h.opts.idleStreams - 1) / h.opts.idleStreams}
	r.base = h.settleRSS(t, "baseline")
	r.goroutinesBase = goroutines(t.admin)

	urls := filepath.Join(h.dir, name+"-urls.txt")
	if err := os.WriteFile(urls, []byte(strings.Join(t.urls, "\n")+"\n"), 0o600); err != nil {
		return nil, err
	}
	w := &lineWatcher{lines: make(chan string, 64)}
	start := time.Now()
	client, err := child.Start("idle-client", h.self, []string{"__idle", "-urls", urls, "-n", strconv.Itoa(n),
		"-streams", strconv.Itoa(h.opts.idleStreams), "-sources", strconv.Itoa(h.opts.idleSources),
		"-fresh-data", strconv.Itoa(t.freshData), "-max", "30m"}, os.Environ(), h.dir, w, os.Stderr, nil)
	if err != nil {
		return nil, err
	}
	defer client.Stop(30 * time.Second)
	if err := h.waitClient(w.lines, client, "opened", 15*time.Minute); err != nil {
		return nil, err
	}
	r.openTime = time.Since(start)
	h.logf("# idle %s: %d streams open and fresh in %v", name, n, r.openTime.Truncate(time.Millisecond))
	r.fresh = h.settleRSS(t, "fresh")
	r.goroutinesFresh = goroutines(t.admin)
	h.heapProfile(t, r, "fresh")
	if t.caddy != nil {
		h.logf("# idle %s: the stack of one subscriber's goroutine (what its stack size comes from)\n%s", name, subscriberStack(t.admin))
	}

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start = time.Now()
	if err := t.fire(ctx); err != nil {
		return nil, err
	}
	if err := h.waitClient(w.lines, client, "evented", 10*time.Minute); err != nil {
		return nil, err
	}
	r.eventTime = time.Since(start)
	h.logf("# idle %s: every stream carried an event %v after the first was sent", name, r.eventTime.Truncate(time.Millisecond))
	r.evened = h.settleRSS(t, "evented")
	r.goroutinesEvented = goroutines(t.admin)
	h.heapProfile(t, r, "evented")
	h.logf("# idle %s: per subscriber, fresh %s B (raw RSS %s B), evented %s B (raw RSS %s B); goroutines %d / %d / %d",
		name, commas(int64(r.perSub(r.fresh))), commas(int64(r.perSubRaw(r.fresh))), commas(int64(r.perSub(r.evened))), commas(int64(r.perSubRaw(r.evened))),
		r.goroutinesBase, r.goroutinesFresh, r.goroutinesEvented)
	return r, nil
}

// settleRSS forces a GC in the target, then waits until its RSS holds still. It returns the RSS
// and the RSS less the heap the runtime has freed but not yet returned to the kernel
// (HeapIdle − HeapReleased), in kB: after a GC the scavenger keeps free pages up to about the
// next heap goal, twice the live heap, so how much of that is still resident depends on the
// GC's timing rather than on what the subscribers hold.
func (h *harness) settleRSS(t *idleTarget, phase string) rssReading {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := caddyrun.FetchProfile(ctx, "http://"+t.admin+"/debug/pprof/heap?gc=1", ""); err != nil {
		h.logf("# idle %s %s: forcing a GC failed: %v", t.name, phase, err)
	}
	start := time.Now()
	var readings []int64
	for time.Since(start) < 60*time.Second {
		readings = append(readings, rssKB(t.pid))
		if k := len(readings); k >= 3 {
			lo, hi := min(readings[k-1], readings[k-2], readings[k-3]), max(readings[k-1], readings[k-2], readings[k-3])
			if float64(hi-lo) <= 0.005*float64(hi) {
				break
			}
		}
		time.Sleep(time.Second)
	}
	r := rssReading{raw: readings[len(readings)-1]}
	ms, err := memStats(t.admin)
	if err != nil {
		h.logf("# idle %s %s: %v", t.name, phase, err)
		r.held = r.raw
	} else {
		r.held = r.raw - (ms["HeapIdle"] - ms["HeapReleased"])
		r.stack = ms["StackInuse"]
	}
	h.logf("# idle %s %s: RSS %s kB after %v (readings %v); Go runtime (kB): %v; RSS less free heap not yet returned: %s kB",
		t.name, phase, commas(r.raw), time.Since(start).Truncate(time.Second), readings, ms, commas(r.held))
	return r
}

// memStats reads the target's runtime.MemStats from expvar (/debug/vars: Caddy's admin
// endpoint, the bare server's admin listener), in kB: where the resident memory goes.
func memStats(admin string) (map[string]int64, error) {
	resp, err := http.Get("http://" + admin + "/debug/vars")
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	var vars struct {
		Memstats map[string]any `json:"memstats"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&vars); err != nil {
		return nil, err
	}
	kb := map[string]int64{}
	for _, k := range []string{"HeapInuse", "StackInuse", "HeapIdle", "HeapReleased", "Sys"} {
		v, ok := vars.Memstats[k].(float64)
		if !ok {
			return nil, fmt.Errorf("/debug/vars has no memstats.%s", k)
		}
		kb[k] = int64(v) / 1024
	}
	return kb, nil
}

// subscriberStack is the stack of one goroutine serving an event stream (goroutine?debug=2).
func subscriberStack(admin string) string {
	resp, err := http.Get("http://" + admin + "/debug/pprof/goroutine?debug=2")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	for _, g := range strings.Split(string(b), "\n\n") {
		if strings.Contains(g, "engine.(*API).events") {
			return g
		}
	}
	return "(none found)"
}

// rssKB is VmRSS of /proc/<pid>/status, in kB; -1 if unreadable.
func rssKB(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n
			}
		}
	}
	return -1
}

// goroutines reads the target's goroutine count from its pprof endpoint; -1 if it cannot.
func goroutines(admin string) int {
	resp, err := http.Get("http://" + admin + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	rest, ok := strings.CutPrefix(string(b), "goroutine profile: total ")
	if !ok {
		return -1
	}
	n, _ := strconv.Atoi(strings.Fields(rest)[0])
	return n
}

// heapProfile saves Caddy's heap profile and logs its top (inuse_space): what each idle
// subscriber holds.
func (h *harness) heapProfile(t *idleTarget, r *idleResult, phase string) {
	if t.caddy == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	path := filepath.Join(h.dir, "idle-"+t.name+"-"+phase+".heap.pprof")
	if err := t.caddy.Heap(ctx, path); err != nil {
		h.logf("# idle heap profile: %v", err)
		return
	}
	r.heapProfiles = append(r.heapProfiles, path)
	out, err := exec.Command(h.goBin, "tool", "pprof", "-top", "-nodecount=25", "-sample_index=inuse_space", h.caddyBin, path).CombinedOutput()
	if err != nil {
		h.logf("# go tool pprof: %v", err)
	}
	h.logf("# idle %s %s: heap in use (go tool pprof -top -sample_index=inuse_space)\n%s", t.name, phase, strings.TrimSpace(string(out)))
}

// idleTable is the idle scenario's table (Markdown): per target and phase, the memory per
// subscriber beyond the baseline; then Caddy ÷ bare against the 1.25 target, fresh and evented.
func (h *harness) idleTable() string {
	if len(h.idle) == 0 {
		return ""
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("| server | subscribers | connections | phase | RSS | RSS less free heap | per subscriber | of it goroutine stack | per subscriber, raw RSS | goroutines |\n")
	w("|---|--:|--:|---|--:|--:|--:|--:|--:|--:|\n")
	for _, r := range h.idle {
		for _, p := range []struct {
			name string
			x    rssReading
			g    int
		}{{"baseline", r.base, r.goroutinesBase}, {"fresh", r.fresh, r.goroutinesFresh}, {"evented", r.evened, r.goroutinesEvented}} {
			per, stack, raw := "", "", ""
			if p.name != "baseline" {
				per, stack, raw = commas(int64(r.perSub(p.x)))+" B", commas(int64(r.perSubStack(p.x)))+" B", commas(int64(r.perSubRaw(p.x)))+" B"
			}
			w("| %s | %s | %s | %s | %s kB | %s kB | %s | %s | %s | %d |\n", r.target, commas(int64(r.subscribers)), commas(int64(r.conns)), p.name,
				commas(p.x.raw), commas(p.x.held), per, stack, raw, p.g)
		}
	}
	w("\n| server | open every stream | one event on every stream |\n|---|--:|--:|\n")
	for _, r := range h.idle {
		w("| %s | %v | %v |\n", r.target, r.openTime.Truncate(time.Millisecond), r.eventTime.Truncate(time.Millisecond))
	}
	var floor *idleResult
	for _, r := range h.idle {
		if r.target == "caddy-floor" {
			floor = r
		}
	}
	w("\n| ratio of memory per subscriber (RSS less free heap) | fresh | evented | of raw RSS, fresh / evented |\n|---|--:|--:|--:|\n")
	ratio := func(a, b *idleResult, x, y func(*idleResult) rssReading) (float64, float64) {
		return a.perSub(x(a)) / b.perSub(y(b)), a.perSubRaw(x(a)) / b.perSubRaw(y(b))
	}
	fresh := func(r *idleResult) rssReading { return r.fresh }
	evented := func(r *idleResult) rssReading { return r.evened }
	var verdicts []string
	for _, r := range h.idle[1:] {
		for _, ref := range []*idleResult{h.idle[0], floor} {
			if ref == nil || ref == r { // against the floor: the plugin's builds only
				continue
			}
			f, fr := ratio(r, ref, fresh, fresh)
			e, er := ratio(r, ref, evented, evented)
			w("| %s ÷ %s | %s | %s | %s / %s |\n", r.target, ref.target, trunc(f, 3), trunc(e, 3), trunc(fr, 3), trunc(er, 3))
			if r.target == "caddy" && ref == h.idle[0] {
				for _, v := range []struct {
					phase string
					x     float64
				}{{"fresh", f}, {"evented", e}} {
					verdict := "met"
					if v.x > 1.25 || v.x <= 0 {
						verdict = "MISSED"
					}
					verdicts = append(verdicts, fmt.Sprintf("Target: Caddy with the plugin ÷ bare net/http ≤ 1.25, %s: %s (%s)", v.phase, trunc(v.x, 3), verdict))
				}
			}
		}
	}
	w("\n%s\n", strings.Join(verdicts, "\n\n"))
	return b.String()
}
