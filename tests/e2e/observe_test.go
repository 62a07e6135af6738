package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scrape reads the admin endpoint's /metrics: every sample line, as name{labels} → value.
func (c *caddyProc) scrape(t *testing.T) map[string]float64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.admin+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("/metrics answered %d: %s", resp.StatusCode, b)
	}
	samples := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || line[0] == '#' {
			continue
		}
		cut := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[cut+1:], 64)
		if err != nil {
			t.Fatalf("unparsable sample %q", line)
		}
		samples[line[:cut]] = v
	}
	return samples
}

// sum adds the samples of metric name whose labels include every one of want (`key="value"`).
func sum(samples map[string]float64, name string, want ...string) float64 {
	total := 0.0
	for series, v := range samples {
		if series != name && !strings.HasPrefix(series, name+"{") {
			continue
		}
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(series, w)
		}
		if ok {
			total += v
		}
	}
	return total
}

// adminGet asks the admin endpoint for path.
func (c *caddyProc) adminGet(t *testing.T, method, path string) (int, string, []byte) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, method, "http://"+c.admin+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("admin %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header.Get("Content-Type"), b
}

// TestMetricsLogsAndAdmin runs jobs that succeed, fail and report through the real Caddy, then
// checks that the metrics at the admin endpoint's /metrics count exactly that, that a reload
// keeps the counts (one set of collectors in each config's registry), that the admin API lists
// and shows the jobs, and that every job's transitions are in the log without its token.
func TestMetricsLogsAndAdmin(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	cl := c.newClient(t, "h2")
	const route = `route="/jobs/*"`

	type ran struct {
		id       string
		seq      uint64
		state    string
		liveSeen int // events the follower got after the first
	}
	var jobs []ran
	run := func(path string) ran {
		doc, _ := cl.startJob(t, http.MethodPost, path, nil)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		res := cl.follow(ctx, doc.Links.Events, sseOptions{})
		checkStream(t, path, res)
		last := res.Events[len(res.Events)-1].doc(t)
		r := ran{id: doc.ID, seq: last.Seq, state: last.State, liveSeen: len(res.Events) - 1}
		jobs = append(jobs, r)
		return r
	}
	for range 3 {
		run("/jobs/slow?ms=30")
	}
	failed := run("/jobs/fail")
	reported := run("/jobs/report?steps=3&ms=20")
	if failed.state != "failed" || reported.state != "succeeded" {
		t.Fatalf("states: fail → %s, report → %s", failed.state, reported.state)
	}
	// A callback with a wrong token.
	wantProblem(t, cl.do(t, http.MethodPost, "/_jobs/"+reported.id+"/progress", []byte(`{"percent":5}`),
		"Authorization", "Bearer wrong", "Content-Type", "application/json"), http.StatusUnauthorized)
	token := decodeJSON[reportBody](t, cl.result(t, reported.id)).ProgressToken

	// A job's counters move once its end is recorded, which subscribers may see first.
	var m map[string]float64
	deadline := time.Now().Add(20 * time.Second)
	for {
		m = c.scrape(t)
		if sum(m, "caddy_progress_jobs_finished_total") == 5 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	var progressEvents, writes uint64
	live := 0
	for _, j := range jobs {
		progressEvents += j.seq - 2 // all but "running" (made running) and "done"
		writes += j.seq
		live += j.liveSeen
	}
	checks := []struct {
		what string
		got  float64
		want float64
	}{
		{"jobs created by respond-async", sum(m, "caddy_progress_jobs_created_total", route, `how="respond-async"`), 5},
		{"jobs succeeded", sum(m, "caddy_progress_jobs_finished_total", route, `state="succeeded"`), 4},
		{"jobs failed", sum(m, "caddy_progress_jobs_finished_total", route, `state="failed"`), 1},
		{"jobs queued now", sum(m, "caddy_progress_jobs_queued"), 0},
		{"jobs running now", sum(m, "caddy_progress_jobs_running"), 0},
		{"queue waits observed", sum(m, "caddy_progress_queue_wait_seconds_count", route), 5},
		{"job durations observed", sum(m, "caddy_progress_job_duration_seconds_count", route), 5},
		{"progress events (callbacks and estimates)", sum(m, "caddy_progress_progress_events_total"), float64(progressEvents)},
		{"callbacks refused for their token", sum(m, "caddy_progress_callbacks_rejected_total", `reason="bad_token"`), 1},
		{"subscribers now", sum(m, "caddy_progress_subscribers"), 0},
	}
	for _, ch := range checks {
		if ch.got != ch.want {
			t.Errorf("%s: /metrics says %v, want %v", ch.what, ch.got, ch.want)
		}
	}
	if got := sum(m, "caddy_progress_progress_events_total", `source="callback"`); got < 1 {
		t.Errorf("callback progress events %v, want at least 1 (the /report job acknowledged %d steps)", got, reported.seq-2)
	}
	if got := sum(m, "caddy_progress_store_writes_total"); got < float64(writes) {
		t.Errorf("store writes %v, want at least the %d events of the jobs", got, writes)
	}
	if n, s := sum(m, "caddy_progress_store_commit_seconds_count"), sum(m, "caddy_progress_store_commit_seconds_sum"); n < 1 || s <= 0 {
		t.Errorf("store commits: count %v sum %v", n, s)
	}
	if got := sum(m, "caddy_progress_store_size_bytes"); got < 32<<10 {
		t.Errorf("store size %v bytes; a bbolt file alone is 32 KiB", got)
	}
	// Deliveries are timed for events that reach a stream from the live tail; one that a stream
	// read back from the store (the job moved on between the stream's first read and its
	// subscription) is not, so some of the live events may be missing, never more.
	deliveries := sum(m, "caddy_progress_delivery_seconds_count", `kind="sse"`)
	if deliveries < 1 || deliveries > float64(live) {
		t.Errorf("SSE deliveries timed: %v, want 1 to the %d live events the followers got", deliveries, live)
	}
	if sum(m, "caddy_progress_delivery_seconds_bucket", `kind="sse"`, `le="+Inf"`) != deliveries {
		t.Errorf("delivery histogram's +Inf bucket disagrees with its count")
	}

	// A reload keeps the counts: the new config's registry gets the same collectors.
	if _, err := c.reload(t, caddyOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := sum(c.scrape(t), "caddy_progress_jobs_created_total", route); got != 5 {
		t.Errorf("after a reload, jobs created %v, want the 5 from before", got)
	}
	run("/jobs/slow?ms=10")
	deadline = time.Now().Add(20 * time.Second)
	for sum(c.scrape(t), "caddy_progress_jobs_finished_total", route) != 6 {
		if time.Now().After(deadline) {
			t.Fatalf("after a reload and one more job, jobs finished %v, want 6", sum(c.scrape(t), "caddy_progress_jobs_finished_total", route))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := sum(c.scrape(t), "caddy_progress_jobs_created_total", route); got != 6 {
		t.Errorf("after a reload and one more job, jobs created %v, want 6", got)
	}

	// The admin API: counts by state and the list, one job, and problems for bad asks.
	code, ctype, body := c.adminGet(t, http.MethodGet, "/progress/jobs?limit=100")
	var list struct {
		Counts map[string]int `json:"counts"`
		Jobs   []struct {
			ID         string `json:"id"`
			State      string `json:"state"`
			Route      string `json:"route"`
			OwnerBound bool   `json:"owner_bound"`
		} `json:"jobs"`
	}
	if code != http.StatusOK || ctype != "application/json" || json.Unmarshal(body, &list) != nil {
		t.Fatalf("GET /progress/jobs: %d %s %s", code, ctype, body)
	}
	if list.Counts["succeeded"] != 5 || list.Counts["failed"] != 1 || list.Counts["running"] != 0 || len(list.Jobs) != 6 {
		t.Errorf("admin list: counts %v, %d jobs; want 5 succeeded, 1 failed, 6 jobs", list.Counts, len(list.Jobs))
	}
	for _, j := range list.Jobs {
		if j.Route != "/jobs/*" || j.OwnerBound {
			t.Errorf("admin list: job %+v, want route /jobs/* and no owner", j)
		}
	}
	code, _, body = c.adminGet(t, http.MethodGet, "/progress/jobs/"+failed.id)
	var one struct {
		ID    string `json:"id"`
		State string `json:"state"`
		Route string `json:"route"`
		Error struct {
			Code string `json:"code"`
		} `json:"error"`
	}
	if code != http.StatusOK || json.Unmarshal(body, &one) != nil || one.ID != failed.id || one.State != "failed" || one.Route != "/jobs/*" {
		t.Errorf("GET /progress/jobs/%s: %d %s", failed.id, code, body)
	}
	for _, bad := range []struct {
		method, path string
		status       int
	}{
		{http.MethodGet, "/progress/jobs?state=sleeping", http.StatusBadRequest},
		{http.MethodGet, "/progress/jobs?limit=-3", http.StatusBadRequest},
		{http.MethodGet, "/progress/jobs?cursor=%21%21", http.StatusBadRequest},
		{http.MethodGet, "/progress/jobs/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", http.StatusNotFound},
		{http.MethodDelete, "/progress/jobs/" + failed.id, http.StatusMethodNotAllowed},
	} {
		code, ctype, body := c.adminGet(t, bad.method, bad.path)
		var p problemDoc
		if code != bad.status || ctype != "application/problem+json" || json.Unmarshal(body, &p) != nil || p.Title == "" {
			t.Errorf("%s %s: %d %s %s, want %d with a problem document", bad.method, bad.path, code, ctype, body, bad.status)
		}
	}

	// One log line per transition, naming job, route and state; never the callback token.
	for _, j := range jobs {
		var created, ended bool
		for _, line := range c.logs.all() {
			if !strings.Contains(line, `"job":"`+j.id+`"`) {
				continue
			}
			created = created || strings.Contains(line, `"msg":"job created"`) && strings.Contains(line, `"route":"/jobs/*"`)
			ended = ended || strings.Contains(line, `"msg":"job ended"`) && strings.Contains(line, fmt.Sprintf(`"state":%q`, j.state)) && strings.Contains(line, `"duration"`)
		}
		if !created || !ended {
			t.Errorf("job %s: log has created %v, ended %v", j.id, created, ended)
		}
	}
	for _, line := range c.logs.all() {
		if token != "" && strings.Contains(line, token) {
			t.Errorf("the log holds a callback token: %s", line)
		}
	}
	c.checkLog()
}
