package e2e

// Several Caddy instances sharing one Redis store (issue #8): a real redis-server on a free
// loopback port with its append-only file fsynced on every write, and three built Caddy
// processes.

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-progress/progress/store/redisstore/redistest"
)

var (
	storeLine    = regexp.MustCompile(`(?m)^\t\tstore .*$`)
	callbackLine = regexp.MustCompile(`callback_base http://127\.0\.0\.1:\d+`)
)

// startRedisCaddy starts a Caddy keeping its jobs in the Redis at url, with the given lease
// time. With callbackPort set, the upstreams of its /jobs/* route report progress through the
// Caddy on that plain-HTTP port instead of this one.
func startRedisCaddy(t *testing.T, url, lease string, callbackPort int) *caddyProc {
	t.Helper()
	return startCaddyWith(t, caddyOptions{}, func(config string) string {
		if n := len(storeLine.FindAllString(config, -1)); n != 1 {
			t.Fatalf("the test Caddyfile has %d store lines, want 1", n)
		}
		config = storeLine.ReplaceAllString(config, "\t\tstore "+url+"\n\t\tlease_time "+lease)
		if callbackPort != 0 {
			if n := len(callbackLine.FindAllString(config, -1)); n != 1 {
				t.Fatalf("the test Caddyfile has %d callback_base lines, want 1", n)
			}
			config = callbackLine.ReplaceAllString(config, "callback_base http://127.0.0.1:"+strconv.Itoa(callbackPort))
		}
		return config
	})
}

// pollToEnd follows a job with GET ?after=<seq>&wait= until it ends and returns the seqs of the
// documents it got; it fails the test on a seq that does not increase.
func pollToEnd(t *testing.T, cl *client, id string, deadline time.Time) []uint64 {
	var seen []uint64
	var seq uint64
	for time.Now().Before(deadline) {
		r, err := cl.try(http.MethodGet, fmt.Sprintf("/_jobs/%s?after=%d&wait=10s", id, seq), nil)
		if err != nil {
			t.Errorf("long-poll: %v", err)
			return seen
		}
		if r.StatusCode != http.StatusOK {
			t.Errorf("long-poll: status %d: %s", r.StatusCode, r.body)
			return seen
		}
		doc := decodeJSON[jobDoc](t, r)
		if doc.Seq < seq {
			t.Errorf("long-poll: seq %d after %d", doc.Seq, seq)
		}
		if doc.Seq > seq {
			seen = append(seen, doc.Seq)
			seq = doc.Seq
		}
		if doc.terminal() {
			return seen
		}
	}
	t.Errorf("long-poll: job %s did not end in time (at seq %d)", id, seq)
	return seen
}

// followInBackground follows a job's event stream on its own goroutine, for at most 60 s, and
// returns once the first event has arrived. The result is complete once ended is closed.
func followInBackground(t *testing.T, cl *client, path string, o sseOptions) (*sseResult, <-chan struct{}) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	opened, ended := make(chan struct{}), make(chan struct{})
	var once sync.Once
	o.OnEvent = func(sseEvent) { once.Do(func() { close(opened) }) }
	res := new(sseResult)
	go func() {
		defer close(ended)
		defer cancel()
		*res = *cl.follow(ctx, path, o)
	}()
	select {
	case <-opened:
	case <-ended:
		t.Fatalf("the stream of %s ended before its first event: %+v", path, res)
	}
	return res, ended
}

// checkContiguous fails the test unless seqs run from..to without a gap or a duplicate.
func checkContiguous(t *testing.T, name string, seqs []uint64, from, to uint64) {
	t.Helper()
	if len(seqs) == 0 || seqs[0] != from || seqs[len(seqs)-1] != to || uint64(len(seqs)) != to-from+1 {
		t.Errorf("%s: seqs %v, want every one of %d..%d", name, seqs, from, to)
		return
	}
	for i, s := range seqs {
		if s != from+uint64(i) {
			t.Errorf("%s: seq %d at position %d: gap or duplicate in %v", name, s, i, seqs)
			return
		}
	}
}

// TestRedisThreeInstances: a job started on A, followed by SSE on B and by long-poll on C,
// its upstream reporting through C. Every SSE event arrives in order with none missing, the
// long-poll sees seq only increase, both end on the same done document, and a large result
// replays on B byte for byte.
func TestRedisThreeInstances(t *testing.T) {
	needBinaries(t)
	srv := redistest.Start(t)
	c := startRedisCaddy(t, srv.URL(), "10s", 0)
	a := startRedisCaddy(t, srv.URL(), "10s", c.httpPort)
	b := startRedisCaddy(t, srv.URL(), "10s", 0)
	onA, onB, onC := a.newClient(t, "h1"), b.newClient(t, "h2"), c.newClient(t, "h1")

	const steps = 15
	doc, _ := onA.startJob(t, http.MethodPost, fmt.Sprintf("/jobs/report?steps=%d&ms=40", steps), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var (
		wg     sync.WaitGroup
		stream *sseResult
		polled []uint64
	)
	wg.Go(func() { stream = onB.follow(ctx, doc.Links.Events, sseOptions{LastEventID: "0"}) })
	wg.Go(func() { polled = pollToEnd(t, onC, doc.ID, time.Now().Add(90*time.Second)) })
	wg.Wait()

	checkStream(t, "SSE on B", stream)
	final := onC.job(t, doc.ID)
	if final.State != "succeeded" {
		t.Fatalf("job ended %s: %+v", final.State, final)
	}
	checkContiguous(t, "SSE on B", seqs(stream.Events), 1, final.Seq)
	if len(polled) == 0 || polled[len(polled)-1] != final.Seq {
		t.Errorf("long-poll on C saw %v, want it to end at seq %d", polled, final.Seq)
	}
	// Every report went through C and shows on B, in order.
	var currents []float64
	for _, ev := range stream.Events {
		if d := ev.doc(t); d.Progress != nil && d.Progress.Current != nil {
			currents = append(currents, *d.Progress.Current)
		}
	}
	for i := 1; i < len(currents); i++ {
		if currents[i] < currents[i-1] {
			t.Errorf("progress went back on B: %v", currents)
		}
	}
	if len(currents) == 0 || currents[len(currents)-1] != steps {
		t.Errorf("B saw progress %v, want it to reach %d", currents, steps)
	}
	if acked := upstreamAcked(t)[doc.ID]; acked != steps {
		t.Errorf("C acknowledged %d of %d reports", acked, steps)
	}

	// A large result made on A replays on B byte for byte.
	const size = 3_000_000
	big, _ := onA.startJob(t, http.MethodGet, fmt.Sprintf("/jobs/large?size=%d", size), nil)
	res := onB.result(t, big.ID)
	wantStatus(t, res, http.StatusOK)
	sum := sha256.Sum256(res.body)
	if len(res.body) != size || hex.EncodeToString(sum[:]) != res.Header.Get("X-Checksum") {
		t.Fatalf("result on B: %d bytes, sha256 %x, upstream's checksum %s", len(res.body), sum, res.Header.Get("X-Checksum"))
	}
}

// hangingJobOnA starts two Caddy instances, A and B, on one Redis with the given lease time,
// and a job on A whose upstream request hangs until it is cut.
func hangingJobOnA(t *testing.T, lease time.Duration) (a *caddyProc, onA, onB *client, doc jobDoc) {
	t.Helper()
	needBinaries(t)
	srv := redistest.Start(t)
	a = startRedisCaddy(t, srv.URL(), lease.String(), 0)
	b := startRedisCaddy(t, srv.URL(), lease.String(), 0)
	onA, onB = a.newClient(t, "h1"), b.newClient(t, "h1")
	doc, _ = onA.startJob(t, http.MethodGet, "/jobs/hang", nil)
	upstreamSeen(t, doc.ID, "started", 10*time.Second)
	return a, onA, onB, doc
}

// TestRedisInstanceKilled: SIGKILL the instance running a job; another instance ends it as
// failed/interrupted once the lease lapses, and its SSE subscribers see that done event.
func TestRedisInstanceKilled(t *testing.T) {
	const lease = time.Second
	a, _, onB, doc := hangingJobOnA(t, lease)

	stream, ended := followInBackground(t, onB, doc.Links.Events, sseOptions{})
	killed := time.Now()
	a.kill()
	<-ended
	took := time.Since(killed)
	checkStream(t, "SSE on B", stream)
	last := stream.Events[len(stream.Events)-1].doc(t)
	if last.State != "failed" || last.Error == nil || last.Error.Code != "interrupted" {
		t.Fatalf("job of the killed instance ended %+v", last)
	}
	// The lease lapses within a lease time; the next look comes within a third of one.
	// Allow ten lease times on a loaded machine.
	if took > 10*lease {
		t.Errorf("interrupted %v after the kill, lease %v", took, lease)
	}
	t.Logf("the job of the killed instance ended %v after the kill (lease %v)", took.Round(time.Millisecond), lease)
	if got := onB.job(t, doc.ID); got.Seq != last.Seq {
		t.Errorf("the job moved on after its done event: seq %d, done at %d", got.Seq, last.Seq)
	}
}

// TestRedisRestart: Redis is SIGKILLed and restarted (append-only file, fsync always) in the
// middle of a job. Watchers resume with Last-Event-ID and see every seq once; every report
// acknowledged with 204 is in the job; the job ends done.
func TestRedisRestart(t *testing.T) {
	needBinaries(t)
	srv := redistest.Start(t)
	a := startRedisCaddy(t, srv.URL(), "10s", 0)
	b := startRedisCaddy(t, srv.URL(), "10s", 0)
	onA, onB := a.newClient(t, "h1"), b.newClient(t, "h2")
	const steps = 40
	doc, _ := onA.startJob(t, http.MethodPost, fmt.Sprintf("/jobs/report?steps=%d&ms=50", steps), nil)

	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var fifth sync.Once
	reached := make(chan struct{})
	followers := map[string]*client{"SSE on A": onA, "SSE on B": onB}
	streams := make(map[string]*sseResult)
	var mu sync.Mutex
	var wg sync.WaitGroup
	for name, cl := range followers {
		wg.Go(func() {
			res := cl.follow(ctx, doc.Links.Events, sseOptions{LastEventID: "0", MaxConns: 20, OnEvent: func(ev sseEvent) {
				if ev.seq() >= 5 {
					fifth.Do(func() { close(reached) })
				}
			}})
			mu.Lock()
			streams[name] = res
			mu.Unlock()
		})
	}
	select {
	case <-reached:
	case <-ctx.Done():
		t.Fatal("the job made no progress")
	}
	srv.Restart()
	wg.Wait()

	final := onB.job(t, doc.ID)
	if final.State != "succeeded" {
		t.Fatalf("job ended %s", final.State)
	}
	for name, res := range streams {
		checkStream(t, name, res)
		checkContiguous(t, name, seqs(res.Events), 1, final.Seq)
		if len(res.Connects) < 2 {
			t.Errorf("%s: %d connections: the restart did not end the stream", name, len(res.Connects))
		}
		for i, c := range res.Connects[1:] {
			if c.LastEventID == "" || c.LastEventID == "0" {
				t.Errorf("%s: reconnection %d resumed from %q", name, i+1, c.LastEventID)
			}
		}
	}
	// Every report acknowledged with 204 was kept: the newest progress is at least the
	// highest acknowledged step (a report refused during the restart may be missing).
	acked := upstreamAcked(t)[doc.ID]
	var current float64
	for _, ev := range streams["SSE on B"].Events {
		if d := ev.doc(t); d.Progress != nil && d.Progress.Current != nil {
			current = *d.Progress.Current
		}
	}
	if acked == 0 || current < float64(acked) {
		t.Errorf("acknowledged up to report %d, the job's newest progress is %v", acked, current)
	}
	t.Logf("%d of %d reports acknowledged across the restart; SSE connections: A %d, B %d",
		acked, steps, len(streams["SSE on A"].Connects), len(streams["SSE on B"].Connects))
}

// TestRedisUnreachable: with Redis down, a new job is refused with 503 and a problem
// document, running event streams end (so clients retry), and service resumes once Redis is
// back.
func TestRedisUnreachable(t *testing.T) {
	needBinaries(t)
	srv := redistest.Start(t)
	a := startRedisCaddy(t, srv.URL(), "10s", 0)
	cl := a.newClient(t, "h1")
	doc, _ := cl.startJob(t, http.MethodGet, "/jobs/hang", nil)
	upstreamSeen(t, doc.ID, "started", 10*time.Second)
	stream, ended := followInBackground(t, cl, doc.Links.Events, sseOptions{MaxConns: 1})
	srv.Stop()
	<-ended
	// One connection allowed: the follower stops once the server closes the stream.
	if errors.Is(stream.Err, context.DeadlineExceeded) || stream.Ended == "done" || len(stream.Events) != 1 {
		t.Fatalf("stream with Redis down: ended %q (%v) after %d events, want it closed", stream.Ended, stream.Err, len(stream.Events))
	}
	r := cl.do(t, http.MethodGet, "/jobs/slow?ms=10", nil, "Prefer", "respond-async")
	p := wantProblem(t, r, http.StatusServiceUnavailable)
	if !strings.Contains(p.Type, "store-unavailable") || r.Header.Get("Retry-After") == "" {
		t.Errorf("new job with Redis down: %+v, Retry-After %q", p, r.Header.Get("Retry-After"))
	}
	srv.Resume()
	deadline := time.Now().Add(30 * time.Second)
	for {
		r, err := cl.try(http.MethodGet, "/jobs/slow?ms=10", nil, "Prefer", "respond-async")
		if err == nil && r.StatusCode == http.StatusAccepted {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new job accepted 30 s after Redis came back: %v", err)
		}
		time.Sleep(50 * time.Millisecond) // polling a condition, with a deadline
	}
	// The running job is still there; canceling it ends its upstream request.
	if got := cl.job(t, doc.ID); got.State != "running" {
		t.Errorf("running job after the outage: %s", got.State)
	}
	wantStatus(t, cl.do(t, http.MethodPost, doc.Links.Cancel, nil), http.StatusOK)
}

// TestRedisReload: a reload that keeps the Redis URL keeps the open store and engine (the
// shared UsagePool entry): a running job's upstream request is not cut, its lease is still
// renewed, and it ends as asked afterwards.
func TestRedisReload(t *testing.T) {
	const lease = time.Second
	a, onA, onB, doc := hangingJobOnA(t, lease)
	config, err := os.ReadFile(a.configPath)
	if err != nil {
		t.Fatal(err)
	}
	reloaded := strings.Replace(string(config), "heartbeat 1s", "heartbeat 2s", 1)
	if reloaded == string(config) {
		t.Fatal("the test Caddyfile has no heartbeat line to change")
	}
	if _, err := a.reloadConfig(reloaded, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// Three lease times: a store reopened by the reload would have let the old lease go, and
	// B would have ended the job as interrupted.
	if seen := upstreamSeen(t, doc.ID, "ctx_done", 3*lease); seen.CtxDone {
		t.Fatal("the reload cut the job's upstream request")
	}
	if got := onB.job(t, doc.ID); got.State != "running" {
		t.Fatalf("after the reload the job is %s, want running", got.State)
	}
	wantStatus(t, onA.do(t, http.MethodPost, doc.Links.Cancel, nil), http.StatusOK)
	if got := onB.job(t, doc.ID); got.State != "canceled" {
		t.Fatalf("canceled job seen on B: %s", got.State)
	}
}

// TestRedisCancelElsewhere: a job canceled through another instance stops its upstream
// request on the instance running it, and frees its slot there.
func TestRedisCancelElsewhere(t *testing.T) {
	_, _, onB, doc := hangingJobOnA(t, 10*time.Second)
	wantStatus(t, onB.do(t, http.MethodPost, doc.Links.Cancel, nil), http.StatusOK)
	if seen := upstreamSeen(t, doc.ID, "ctx_done", 20*time.Second); !seen.CtxDone {
		t.Fatal("the upstream request on A went on after the job was canceled through B")
	}
	if got := onB.job(t, doc.ID); got.State != "canceled" {
		t.Fatalf("job canceled through B is %s", got.State)
	}
}
