package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
)

// The restart scenario (issue #6, scenario 6): how long Caddy takes from its start to its first
// successful answer when its store holds -restart-jobs finished jobs, against the same start
// with a store of one job, in the same run. A helper process (`bench __fill`) fills each store
// through the store package, as the plugin would have (create, write the 29-byte result,
// finish, 256 at a time so that commits group). Then, -restart-rounds times, alternately for
// the small store and the full one: start Caddy on it (a fresh folder; the store is the
// filled file) and poll GET http://127.0.0.1:<cb>/_jobs/<the first job> every 5 ms until it
// answers 200 with the job: a request the plugin serves from the store. The time is from just
// before the process is started. Target: < 1 s with 1,000,000 jobs.

type restartResult struct {
	jobs      int
	fillTime  time.Duration
	storeSize int64
	starts    []time.Duration
}

func (h *harness) runRestart() error {
	n := h.opts.restartJobs
	h.logf("\n# restart: a store of 1 finished job against one of %s, %d starts each, alternated", commas(int64(n)), h.opts.restartRounds)
	small, err := h.fillStore(1)
	if err != nil {
		return err
	}
	full, err := h.fillStore(n)
	if err != nil {
		return err
	}
	h.restart = []*restartResult{small, full}
	for round := 1; round <= h.opts.restartRounds; round++ {
		for _, r := range h.restart {
			h.gate(fmt.Sprintf("restart %d jobs", r.jobs))
			d, err := h.timeStart(r)
			if err != nil {
				return fmt.Errorf("restart with %d jobs: %w", r.jobs, err)
			}
			r.starts = append(r.starts, d)
			h.logf("# restart %s jobs, round %d: first answer %v after the start", commas(int64(r.jobs)), round, d.Truncate(time.Microsecond))
		}
	}
	return nil
}

// fillStore makes a store of n finished jobs in a helper process and returns it (the path is
// restartStore(n); the first job's id is in its .first file).
func (h *harness) fillStore(n int) (*restartResult, error) {
	path := h.restartStore(n)
	start := time.Now()
	p, err := child.Start("fill", h.self, []string{"__fill", "-store", path, "-n", strconv.Itoa(n)}, os.Environ(), h.dir, os.Stdout, os.Stderr, nil)
	if err != nil {
		return nil, err
	}
	if err := p.Wait(30 * time.Minute); err != nil {
		return nil, fmt.Errorf("filling a store with %d jobs: %w", n, err)
	}
	r := &restartResult{jobs: n, fillTime: time.Since(start), storeSize: fileSize(path)}
	h.logf("# restart: filled %s with %s finished jobs in %v: %s bytes", path, commas(int64(n)), r.fillTime.Truncate(time.Second), commas(r.storeSize))
	return r, nil
}

func (h *harness) restartStore(n int) string {
	return filepath.Join(h.dir, fmt.Sprintf("restart-%d.db", n))
}

// timeStart starts Caddy on the store and times its first answer that needed the store.
func (h *harness) timeStart(r *restartResult) (time.Duration, error) {
	path := h.restartStore(r.jobs)
	first, err := os.ReadFile(path + ".first")
	if err != nil {
		return 0, err
	}
	up, err := caddyrun.StartUpstream()
	if err != nil {
		return 0, err
	}
	defer up.Close()
	c, err := caddyrun.Prepare(h.caddyBin, h.dir, up, caddyrun.Options{Store: path})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	url := fmt.Sprintf("http://127.0.0.1:%d/_jobs/%s", c.CBPort, strings.TrimSpace(string(first)))
	cl := &http.Client{Timeout: 5 * time.Second}
	start := time.Now()
	if err := c.Launch(nil); err != nil {
		return 0, err
	}
	var last string
	for attempt := 0; attempt < 12000; attempt++ { // 60 s at 5 ms
		if c.Proc.Exited() {
			return 0, fmt.Errorf("caddy exited; log:\n%s", c.LogTail(20))
		}
		resp, err := cl.Get(url)
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK && strings.Contains(string(body), `"succeeded"`) {
				return time.Since(start), nil
			}
			last = resp.Status + " " + string(body[:min(len(body), 200)])
		} else {
			last = err.Error()
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, fmt.Errorf("no answer within 60s; last: %s", last)
}

// fillMain is `bench __fill -store path -n N`: it creates N jobs in the store at path and
// finishes each with a 29-byte JSON result, 256 at a time, and writes the first job's id to
// path.first.
func fillMain(args []string) int {
	fs := flag.NewFlagSet("fill", flag.ContinueOnError)
	path := fs.String("store", "", "store file")
	n := fs.Int("n", 1, "finished jobs")
	if err := fs.Parse(args); err != nil || *path == "" || *n < 1 {
		return 2
	}
	s, err := store.Open(*path, store.Options{})
	if err != nil {
		fmt.Fprintln(os.Stderr, "fill:", err)
		return 1
	}
	ctx := context.Background()
	body := []byte(upstreamBody)
	life := func() (string, error) {
		j, _, err := s.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/reports/generate"}, Route: "reports", Running: true})
		if err != nil {
			return "", err
		}
		rw, err := s.NewResult(ctx, j.ID)
		if err != nil {
			return "", err
		}
		if _, err := rw.Write(body); err != nil {
			return "", err
		}
		_, err = s.Finish(ctx, j.ID, store.Outcome{State: store.Succeeded, Body: rw,
			Response: &store.ResponseHead{Status: 200, Header: http.Header{"Content-Type": {"application/json"}}}})
		return j.ID, err
	}
	id, err := life()
	if err != nil {
		fmt.Fprintln(os.Stderr, "fill:", err)
		return 1
	}
	if err := os.WriteFile(*path+".first", []byte(id+"\n"), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "fill:", err)
		return 1
	}
	var next, done atomic.Int64
	next.Store(1)
	var wg sync.WaitGroup
	var firstErr atomic.Value
	start := time.Now()
	stopProgress := make(chan struct{})
	go func() {
		t := time.NewTicker(10 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stopProgress:
				return
			case <-t.C:
				fmt.Printf("# fill: %s of %s jobs after %v\n", commas(done.Load()+1), commas(int64(*n)), time.Since(start).Truncate(time.Second))
			}
		}
	}()
	for range 256 {
		wg.Go(func() {
			for next.Add(1) <= int64(*n) {
				if _, err := life(); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				done.Add(1)
			}
		})
	}
	wg.Wait()
	close(stopProgress)
	if err := s.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "fill: close:", err)
		return 1
	}
	if v := firstErr.Load(); v != nil {
		fmt.Fprintln(os.Stderr, "fill:", v)
		return 1
	}
	return 0
}

// restartTable is the restart scenario's table (Markdown).
func (h *harness) restartTable() string {
	if len(h.restart) != 2 {
		return ""
	}
	var b strings.Builder
	w := func(format string, args ...any) { fmt.Fprintf(&b, format, args...) }
	w("| finished jobs in the store | store file | filled in | start to first answer, each start | median |\n|--:|--:|--:|---|--:|\n")
	medians := make([]time.Duration, 2)
	for i, r := range h.restart {
		var each []string
		for _, d := range r.starts {
			each = append(each, d.Truncate(time.Millisecond).String())
		}
		sorted := slices.Clone(r.starts)
		slices.Sort(sorted)
		if len(sorted) > 0 {
			medians[i] = sorted[(len(sorted)-1)/2]
		}
		w("| %s | %s bytes | %v | %s | %v |\n", commas(int64(r.jobs)), commas(r.storeSize), r.fillTime.Truncate(time.Second), strings.Join(each, ", "), medians[i].Truncate(time.Millisecond))
	}
	full := h.restart[1]
	verdict := "met"
	if medians[1] <= 0 || medians[1] >= time.Second || slices.Max(full.starts) >= time.Second {
		verdict = "MISSED"
	}
	w("\nTarget: start to first answer < 1 s with %s jobs, every start: %s (median %v, slowest %v; with 1 job: median %v)\n",
		commas(int64(full.jobs)), verdict, medians[1].Truncate(time.Millisecond), slices.Max(full.starts).Truncate(time.Millisecond), medians[0].Truncate(time.Millisecond))
	return b.String()
}
