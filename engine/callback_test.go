package engine

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/upstreamhook"
)

// report posts a progress report for job id with token and returns the recorded response.
func (f *fixture) report(t *testing.T, id, token, body string) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest("POST", "/_jobs/"+id+"/progress", strings.NewReader(body))
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	r.Header.Set("Content-Type", "application/json")
	w := httptest.NewRecorder()
	if err := f.api.ServeHTTP(w, r); err != nil {
		var p *Problem
		if !errors.As(err, &p) {
			t.Fatal(err)
		}
		p.Write(w)
	}
	return w
}

func problemOf(t *testing.T, w *httptest.ResponseRecorder) Problem {
	t.Helper()
	if ct := w.Header().Get("Content-Type"); ct != "application/problem+json" {
		t.Fatalf("%d with Content-Type %q, want a problem document: %s", w.Code, ct, w.Body)
	}
	var p Problem
	if err := json.Unmarshal(w.Body.Bytes(), &p); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCallbackUpdatesDurably(t *testing.T) {
	dir := t.TempDir()
	st, err := store.Open(filepath.Join(dir, "progress.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := New(st, nil, nil, nil)
	route := Route{Engine: e}
	route.Init()
	api := &API{Engine: e}
	api.Init()
	f := &fixture{st: st, engine: e, route: &route, api: api}
	id, release := f.startHeld(t)

	w := f.report(t, id, e.Token(id), `{"current": 4, "total": 10, "stage": "render", "message": "page 4 of 10", "data": {"pages": [1, 2]}}`)
	if w.Code != http.StatusNoContent {
		t.Fatalf("report: %d %s", w.Code, w.Body)
	}
	// 204 means durable: the report is in the file once the store is closed and reopened.
	close(release)
	e.Close()
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	st, err = store.Open(filepath.Join(dir, "progress.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	job, err := st.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	p := job.Progress
	if p == nil || p.Percent == nil || *p.Percent != 40 || *p.Current != 4 || *p.Total != 10 || p.Stage != "render" || p.Message != "page 4 of 10" || string(p.Data) != `{"pages":[1,2]}` || p.Estimated {
		t.Fatalf("progress after reopening: %+v", p)
	}
}

func TestCallbackRejects(t *testing.T) {
	f := newFixture(t, Route{})
	id, release := f.startHeld(t)
	other, releaseOther := f.startHeld(t)
	defer close(releaseOther)
	token := f.engine.Token(id)
	for _, tc := range []struct {
		name, id, token, body string
		status                int
		field                 string
	}{
		{"no token", id, "", `{"percent": 1}`, 401, ""},
		{"garbage token", id, "not-a-token", `{"percent": 1}`, 401, ""},
		{"another job's token", id, f.engine.Token(other), `{"percent": 1}`, 401, ""},
		{"token for an unknown job", "nosuchjob", f.engine.Token("nosuchjob"), `{"percent": 1}`, 404, ""},
		{"truncated token", id, token[:len(token)-2], `{"percent": 1}`, 401, ""},
		{"not JSON", id, token, `percent=40`, 400, ""},
		{"percent above 100", id, token, `{"percent": 140}`, 400, "percent"},
		{"percent a string", id, token, `{"percent": "40"}`, 400, "percent"},
		{"current above total", id, token, `{"current": 11, "total": 10}`, 400, "current"},
		{"unknown field", id, token, `{"percnt": 40}`, 400, "percnt"},
		{"data not an object", id, token, `{"data": [1]}`, 400, "data"},
		{"empty", id, token, `{}`, 400, ""},
		{"message too long", id, token, `{"message": "` + strings.Repeat("x", upstreamhook.DefaultMaxMessage+1) + `"}`, 413, "message"},
		{"body too long", id, token, `{"message": "` + strings.Repeat("x", upstreamhook.DefaultMaxBody) + `"}`, 413, ""},
	} {
		w := f.report(t, tc.id, tc.token, tc.body)
		if w.Code != tc.status {
			t.Errorf("%s: %d, want %d: %s", tc.name, w.Code, tc.status, w.Body)
			continue
		}
		p := problemOf(t, w)
		if p.Field != tc.field || (tc.field != "" && !strings.Contains(p.Detail, tc.field)) {
			t.Errorf("%s: problem %+v does not name field %q", tc.name, p, tc.field)
		}
		if tc.status == 401 && w.Header().Get("WWW-Authenticate") == "" {
			t.Errorf("%s: 401 without WWW-Authenticate", tc.name)
		}
	}
	// None of the rejected reports changed the job.
	if job, _ := f.st.Get(context.Background(), id); job.Progress != nil {
		t.Fatalf("a rejected report changed the job: %+v", job.Progress)
	}
	// GET on the callback URL is a 405 naming POST.
	if w := f.call(t, "GET", "/_jobs/"+id+"/progress", nil); w.Code != 405 || w.Header().Get("Allow") != "POST" {
		t.Fatalf("GET on the callback: %d Allow %q", w.Code, w.Header().Get("Allow"))
	}
	close(release)
	waitDone(t, f.st, id)
	if w := f.report(t, id, token, `{"percent": 100}`); w.Code != http.StatusConflict {
		t.Fatalf("report on a finished job: %d %s", w.Code, w.Body)
	}
}

// waitDone waits for job id to end.
func waitDone(t *testing.T, st store.Store, id string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sub, err := st.Subscribe(ctx, id, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	for {
		ev, err := sub.Next(ctx)
		if err != nil {
			t.Fatalf("waiting for job %s to end: %v", id, err)
		}
		if ev.Done() {
			return
		}
	}
}

// TestCallbackCoalesces sends many reports at once: every caller gets its 204, the job ends
// up with the last report's figures, and there are fewer writes than reports.
func TestCallbackCoalesces(t *testing.T) {
	f := newFixture(t, Route{})
	id, release := f.startHeld(t)
	defer close(release)
	token := f.engine.Token(id)
	const reports = 200
	var wg sync.WaitGroup
	codes := make(chan int, reports)
	// Reports 0..reports-2 race each other; the last one goes after they are all answered,
	// so "last" is well defined.
	for i := range reports - 1 {
		wg.Go(func() {
			codes <- f.report(t, id, token, fmt.Sprintf(`{"current": %d, "total": %d, "stage": "s%d"}`, i, reports, i)).Code
		})
	}
	wg.Wait()
	codes <- f.report(t, id, token, fmt.Sprintf(`{"current": %d, "total": %d, "message": "last"}`, reports-1, reports)).Code
	close(codes)
	for c := range codes {
		if c != http.StatusNoContent {
			t.Fatalf("a report got %d", c)
		}
	}
	job, err := f.st.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if p := job.Progress; p == nil || *p.Current != reports-1 || p.Message != "last" || p.Stage == "" {
		t.Fatalf("progress %+v: the last report is not the one that stuck", p)
	}
	// Seq counts writes: created (1), then one per write.
	if writes := job.Seq - 1; writes >= reports {
		t.Fatalf("%d writes for %d reports: nothing coalesced", writes, reports)
	} else {
		t.Logf("%d reports, %d writes", reports, writes)
	}
}

// TestCallbackMessageCannotInjectSSE: a message full of SSE syntax reaches subscribers as one
// data line of JSON, never as fields of its own.
func TestCallbackMessageCannotInjectSSE(t *testing.T) {
	f := newFixture(t, Route{})
	id, release := f.startHeld(t)
	evil := "x\n\nid: 999\nevent: done\ndata: {\"state\":\"succeeded\"}\r\n\r\nretry: 1\n"
	body, _ := json.Marshal(map[string]string{"message": evil, "stage": "a\rb"})
	if w := f.report(t, id, f.engine.Token(id), string(body)); w.Code != http.StatusNoContent {
		t.Fatalf("report: %d %s", w.Code, w.Body)
	}
	close(release)
	waitDone(t, f.st, id)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := f.api.ServeHTTP(w, r); err != nil {
			var p *Problem
			errors.As(err, &p)
			p.Write(w)
		}
	}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/_jobs/" + id + "/events?last_event_id=1")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	lines := bufio.NewScanner(resp.Body)
	lines.Buffer(nil, 1<<20)
	var ids, events []string
	sawMessage := false
	for lines.Scan() {
		line := lines.Text()
		switch {
		case strings.HasPrefix(line, "id: "):
			ids = append(ids, line)
		case strings.HasPrefix(line, "event: "):
			events = append(events, line)
		case strings.HasPrefix(line, "data: "):
			var doc store.Job
			if err := json.Unmarshal([]byte(strings.TrimPrefix(line, "data: ")), &doc); err != nil {
				t.Fatalf("data line is not one JSON document: %q", line)
			}
			if doc.Progress != nil && doc.Progress.Message == evil {
				sawMessage = true
			}
		case line == "", strings.HasPrefix(line, ":"), strings.HasPrefix(line, "retry: 2000"):
		default:
			t.Fatalf("a line the server did not mean to send: %q", line)
		}
	}
	if !sawMessage {
		t.Fatal("the message never arrived intact")
	}
	for _, l := range ids {
		if l == "id: 999" {
			t.Fatal("the message injected an event id")
		}
	}
	if len(events) != len(ids) || events[len(events)-1] != "event: done" {
		t.Fatalf("events %v ids %v", events, ids)
	}
}

func TestApplyUpdate(t *testing.T) {
	started := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	j := &store.Job{StartedAt: &started, Progress: &store.Progress{Percent: upstreamhook.Float(70), Estimated: true, Message: "estimated"}}
	applyUpdate(j, upstreamhook.Update{Stage: "load"}, started.Add(10*time.Second))
	if j.Progress.Estimated || j.Progress.Percent != nil || j.Progress.Message != "" || j.Progress.Stage != "load" {
		t.Fatalf("a real report must replace the estimate outright: %+v", j.Progress)
	}
	applyUpdate(j, upstreamhook.Update{Percent: upstreamhook.Float(25)}, started.Add(10*time.Second))
	if j.Progress.Stage != "load" || *j.Progress.Percent != 25 || j.ETASeconds == nil || *j.ETASeconds != 30 {
		t.Fatalf("after percent 25 at 10 s: %+v eta %v", j.Progress, j.ETASeconds)
	}
	applyUpdate(j, upstreamhook.Update{Current: upstreamhook.Float(1), Total: upstreamhook.Float(2)}, started.Add(10*time.Second))
	if *j.Progress.Percent != 50 {
		t.Fatalf("current/total did not set the percent: %v", *j.Progress.Percent)
	}
	applyUpdate(j, upstreamhook.Update{Current: upstreamhook.Float(3)}, started.Add(10*time.Second))
	if *j.Progress.Percent != 100 { // a count past its total shows as done, not 150%
		t.Fatalf("percent %v", *j.Progress.Percent)
	}
}

// TestClientCannotForgeProgressHeaders: Progress-* headers a client sends never reach the
// upstream, on a passthrough or on a job whose route sends no callback URL; otherwise an app
// would post a job's real token to a URL of the client's choosing.
func TestClientCannotForgeProgressHeaders(t *testing.T) {
	f := newFixture(t, Route{}) // no CallbackBase
	forged := http.Header{
		"Progress-Job-Id":   {"forged-id"},
		"Progress-Callback": {"https://attacker.example/steal"},
		"Progress-Token":    {"forged-token"},
	}
	for _, prefer := range []string{"", "respond-async"} {
		seen := make(chan http.Header, 1)
		r := httptest.NewRequest("POST", "/reports", strings.NewReader("body"))
		for k, v := range forged {
			r.Header[k] = v
		}
		if prefer != "" {
			r.Header.Set("Prefer", prefer)
		}
		w := httptest.NewRecorder()
		if err := f.route.Serve(w, r, Owner{}, func(w http.ResponseWriter, r *http.Request) error {
			seen <- r.Header.Clone()
			w.WriteHeader(http.StatusOK)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		h := <-seen
		if h.Get("Progress-Callback") != "" || h.Get("Progress-Job-Id") == "forged-id" || h.Get("Progress-Token") == "forged-token" {
			t.Errorf("Prefer %q: the upstream saw forged headers: %v", prefer, h)
		}
		if prefer != "" {
			id := docOf(t, w).ID
			if h.Get("Progress-Job-Id") != id || h.Get("Progress-Token") != f.engine.Token(id) {
				t.Errorf("job %s: upstream saw job id %q and not the job's token", id, h.Get("Progress-Job-Id"))
			}
		}
	}
}
