package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestReloadsUnderLoad: twenty `caddy reload`s in a row, most of them changing options (the
// heartbeat, a route's concurrency and timeout, max_wait, a route added and removed), while
// clients keep creating jobs against slow and reporting upstreams and follow them by SSE and
// long-poll. No reload deadlocks (each returns within a bound), every job that got a 202 ends
// succeeded as its upstream answered, no upstream request is cut, reports acknowledged with
// 204 stick, and every SSE follower resumes across the reloads and ends on done with no gap
// or duplicate. TestReload (jobs_test.go) is the single-reload version over each protocol.
func TestReloadsUnderLoad(t *testing.T) {
	const reloads = 20
	c := startCaddy(t, caddyOptions{Heartbeat: "1s"})
	goroutines0, fds0 := c.goroutineCount(), c.fdCount(t)
	// Registered before the clients, so it runs after their clean-ups closed their connections.
	// At most one idle upstream connection per job is kept by replaced configs.
	var acknowledged atomic.Int64
	t.Cleanup(func() { c.checkNoLeaks(t, "reloads", goroutines0, fds0, int(acknowledged.Load())) })
	clients := map[string]*client{}
	for _, p := range protocols {
		clients[p] = c.newClient(t, p)
	}
	h1 := clients["h1"]

	// config i: the shared Caddyfile with options that change from one reload to the next.
	heartbeats := []string{"1s", "2s", "3s"}
	config := func(i int) string {
		cf := c.caddyfile(caddyOptions{Heartbeat: heartbeats[i%3]})
		if i%2 == 1 {
			cf = editConfig(t, cf, "\t\tconcurrency 1\n", "\t\tconcurrency 3\n")
		}
		if i%3 == 1 {
			cf = editConfig(t, cf, "\t\ttimeout 2s\n", "\t\ttimeout 5s\n")
		}
		if i%4 == 2 {
			cf = editConfig(t, cf, "\t\tmax_wait 30s\n", "\t\tmax_wait 20s\n")
		}
		if i%2 == 0 {
			cf = editConfig(t, cf, "\tprogress /down/*\n", "\tprogress /extra/* {\n\t\tconcurrency 2\n\t}\n\tprogress /down/*\n")
		}
		return cf
	}

	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	type started struct {
		id, path string
	}
	var mu sync.Mutex
	var jobs []started
	refused := map[string]int{}
	var created, polled atomic.Int64
	var followers, pollers sync.WaitGroup
	var followed []*sseResult
	var followedNames []string
	var pollFailures []string

	// follow and poll some of the jobs, on all three protocols.
	watch := func(n int, id string) {
		switch {
		case n%4 == 0:
			proto := protocols[(n/4)%3]
			cl := clients[proto]
			mu.Lock()
			i := len(followed)
			followed = append(followed, nil)
			followedNames = append(followedNames, proto+" "+id)
			mu.Unlock()
			followers.Add(1)
			go func() {
				defer followers.Done()
				res := cl.follow(ctx, "/_jobs/"+id+"/events", sseOptions{MaxConns: 60})
				mu.Lock()
				followed[i] = res
				mu.Unlock()
			}()
		case n%4 == 1:
			cl := clients[protocols[(n/4)%2]] // h1 and h2: net/http's clients retry what a reload cuts
			pollers.Add(1)
			polled.Add(1)
			go func() {
				defer pollers.Done()
				if err := longPoll(ctx, cl, id); err != nil {
					mu.Lock()
					pollFailures = append(pollFailures, err.Error())
					mu.Unlock()
				}
			}()
		}
	}
	start := func(cl *client, path string) {
		r, err := cl.try(http.MethodGet, path, nil, "Prefer", "respond-async")
		var doc jobDoc
		if err == nil && r.StatusCode == http.StatusAccepted {
			err = json.Unmarshal(r.body, &doc)
			if err == nil {
				mu.Lock()
				jobs = append(jobs, started{doc.ID, path})
				n := len(jobs)
				mu.Unlock()
				created.Add(1)
				watch(n, doc.ID)
				return
			}
		}
		what := ""
		if err != nil {
			what = "error: " + err.Error()
		} else {
			what = fmt.Sprintf("%d %s", r.StatusCode, r.Header.Get("Content-Type"))
		}
		mu.Lock()
		refused[what]++
		mu.Unlock()
	}

	// Two generators, HTTP/1.1 and HTTP/2, a job every 150ms each, on the routes whose
	// options change: every job's upstream answers 200 well within any timeout.
	stop := make(chan struct{})
	var generators sync.WaitGroup
	paths := []string{"/jobs/slow?ms=%d", "/jobs/report?steps=5&ms=150", "/serial/slow?ms=%d", "/timed/slow?ms=%d"}
	for g, proto := range []string{"h1", "h2"} {
		generators.Add(1)
		go func() {
			defer generators.Done()
			ticker := time.NewTicker(150 * time.Millisecond)
			defer ticker.Stop()
			for n := g; ; n += 2 {
				p := paths[n%len(paths)]
				if strings.Contains(p, "%d") {
					ms := 300 + (n*137)%1200
					switch {
					case strings.HasPrefix(p, "/serial"):
						ms = 50 // one at a time: keep the queue short
					case strings.HasPrefix(p, "/timed"):
						ms = 100 + (n*37)%300 // well inside the 2s timeout, even on a loaded machine
					}
					p = fmt.Sprintf(p, ms)
				}
				start(clients[proto], p)
				select {
				case <-stop:
					return
				case <-ticker.C:
				}
			}
		}()
	}

	var took durations
	extra := 0
	for i := 1; i <= reloads; i++ {
		// Let the load run between reloads: a few new jobs on the current config.
		want := created.Load() + 8
		for deadline := time.Now().Add(20 * time.Second); created.Load() < want && time.Now().Before(deadline); {
			time.Sleep(20 * time.Millisecond)
		}
		if created.Load() < want {
			t.Fatalf("before reload %d: no new job for 20s", i)
		}
		d, err := c.reloadConfig(config(i), 30*time.Second)
		if err != nil {
			close(stop)
			t.Fatalf("reload %d: %v", i, err)
		}
		took = append(took, d)
		if d > 15*time.Second {
			t.Errorf("reload %d took %v", i, d)
		}
		if i%2 == 0 {
			// The added route makes jobs at once; the next reload removes it while they run.
			for range 2 {
				doc, _ := h1.startJob(t, http.MethodGet, "/extra/slow?ms=1500", nil)
				mu.Lock()
				jobs = append(jobs, started{doc.ID, "/extra/slow?ms=1500"})
				mu.Unlock()
				extra++
			}
		}
	}
	close(stop)
	generators.Wait()

	// Every acknowledged job ends as its upstream answered: succeeded, its request not cut.
	mu.Lock()
	all := append([]started(nil), jobs...)
	mu.Unlock()
	acknowledged.Store(int64(len(all)))
	var reports, callbacks, acked, notAcked int
	for _, j := range all {
		r := h1.result(t, j.id)
		if r.StatusCode != http.StatusOK {
			t.Errorf("job %s (%s): result %d, want the upstream's 200: %.300s\njob: %s\nupstream: %+v", j.id, j.path, r.StatusCode, r.body,
				h1.get(t, "/_jobs/"+j.id).body, upstreamSeen(t, j.id, "", 0))
			continue
		}
		d := h1.job(t, j.id)
		if d.State != "succeeded" {
			t.Errorf("job %s (%s): %s %+v", j.id, j.path, d.State, d.Error)
		}
		if s := upstreamSeen(t, j.id, "finished", 10*time.Second); !s.Finished || s.CtxDoneBeforeReturn {
			t.Errorf("job %s (%s): the upstream's request was cut: %+v", j.id, j.path, s)
		}
		if strings.HasPrefix(j.path, "/jobs/report") {
			// A report acknowledged with 204 sticks: the last one acknowledged is at most
			// what the job shows (a report can also land without its answer arriving).
			reports++
			body := decodeJSON[reportBody](t, r)
			last := 0
			for k, a := range body.Answers {
				callbacks++
				if a == http.StatusNoContent {
					acked++
					last = k + 1
				} else {
					notAcked++
				}
			}
			if last > 0 && (d.Progress == nil || d.Progress.Current == nil || int(*d.Progress.Current) < last) {
				t.Errorf("job %s: report %d was acknowledged, the job shows progress %+v", j.id, last, d.Progress)
			}
		}
	}

	// Every follower resumed across the reloads and ended on done, each event once.
	followers.Wait()
	pollers.Wait()
	reconnects, maxConns := 0, 0
	for i, res := range followed {
		checkStream(t, "follower "+followedNames[i], res)
		reconnects += len(res.Connects) - 1
		maxConns = max(maxConns, len(res.Connects))
		if len(res.Events) > 0 {
			if d := res.Events[len(res.Events)-1].doc(t); d.State != "succeeded" {
				t.Errorf("follower %s: the job ended %s", followedNames[i], d.State)
			}
		}
		for k, conn := range res.Connects[1:] {
			if conn.LastEventID == "" {
				t.Errorf("follower %s: reconnection %d without Last-Event-ID", followedNames[i], k+1)
			}
		}
	}
	for _, f := range pollFailures {
		t.Error(f)
	}

	t.Logf("%d reloads: %v", reloads, took)
	t.Logf("%d jobs acknowledged (%d on the route added and removed), all ended; refused creations: %v", len(all), extra, refused)
	t.Logf("%d SSE followers (h1, h2, h3) reconnected %d times (at most %d connections for one), %d long-pollers",
		len(followed), reconnects, maxConns, polled.Load())
	t.Logf("%d reporting jobs posted %d reports: %d acknowledged with 204, %d not (cut by a reload)", reports, callbacks, acked, notAcked)
	for what, n := range refused {
		// Only a reload's own moment may refuse: a clear 503 or a connection the old server closed.
		if !strings.HasPrefix(what, "503 application/problem+json") && !strings.HasPrefix(what, "error:") {
			t.Errorf("%d job creations answered %s", n, what)
		}
	}
	if len(all) < 100 {
		t.Errorf("only %d jobs under load", len(all))
	}
}

// longPoll follows a job by long-polling until it ends; a poll a reload cuts is sent again.
// The seq it sees must only ever grow, and the job must end succeeded.
func longPoll(ctx context.Context, cl *client, id string) error {
	var seq uint64
	for n := 0; n < 200; n++ {
		if ctx.Err() != nil {
			return fmt.Errorf("long-poll of %s: %v at seq %d", id, ctx.Err(), seq)
		}
		r, err := cl.try(http.MethodGet, "/_jobs/"+id+"?wait=10s&after="+strconv.FormatUint(seq, 10), nil)
		if err != nil {
			continue // cut by a reload: poll again
		}
		switch r.StatusCode {
		case http.StatusNotModified:
			continue
		case http.StatusOK:
		default:
			return fmt.Errorf("long-poll of %s: %d %s", id, r.StatusCode, r.body)
		}
		var d jobDoc
		if err := json.Unmarshal(r.body, &d); err != nil {
			return fmt.Errorf("long-poll of %s: %v", id, err)
		}
		if d.Seq <= seq {
			return fmt.Errorf("long-poll of %s after seq %d answered seq %d", id, seq, d.Seq)
		}
		seq = d.Seq
		if d.terminal() {
			if d.State != "succeeded" {
				return fmt.Errorf("long-poll of %s: the job ended %s %+v", id, d.State, d.Error)
			}
			return nil
		}
	}
	return fmt.Errorf("long-poll of %s: no end after 200 polls (seq %d)", id, seq)
}
