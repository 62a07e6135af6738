package engine

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddy-progress/progress/store"
)

func TestParsePrefer(t *testing.T) {
	for _, tc := range []struct {
		header []string
		want   Preferences
		err    bool
	}{
		{nil, Preferences{}, false},
		{[]string{"respond-async"}, Preferences{RespondAsync: true}, false},
		{[]string{"respond-async, wait=10"}, Preferences{RespondAsync: true, Wait: 10 * time.Second, HasWait: true}, false},
		{[]string{"wait=5", "handling=lenient"}, Preferences{Wait: 5 * time.Second, HasWait: true}, false},
		{[]string{`Respond-Async; foo=bar, WAIT="3"`}, Preferences{RespondAsync: true, Wait: 3 * time.Second, HasWait: true}, false},
		{[]string{"return=minimal"}, Preferences{}, false},
		{[]string{"wait=abc"}, Preferences{}, true},
		{[]string{"wait=-1"}, Preferences{}, true},
		{[]string{"wait"}, Preferences{}, true},
		{[]string{strings.Repeat("x", 2000)}, Preferences{}, true},
	} {
		h := http.Header{"Prefer": tc.header}
		got, err := ParsePrefer(h)
		if (err != nil) != tc.err {
			t.Errorf("%q: error %v, want error %v", tc.header, err, tc.err)
			continue
		}
		if err == nil && got != tc.want {
			t.Errorf("%q: %+v, want %+v", tc.header, got, tc.want)
		}
	}
}

func TestQueueOrderAndPositions(t *testing.T) {
	q := newQueue(1, 2)
	first, err := q.reserve()
	if err != nil || first.Position() != 0 {
		t.Fatalf("first: %v position %d", err, first.Position())
	}
	second, _ := q.reserve()
	third, _ := q.reserve()
	if second.Position() != 1 || third.Position() != 2 {
		t.Fatalf("positions %d %d", second.Position(), third.Position())
	}
	if _, err := q.reserve(); !errors.Is(err, errQueueFull) {
		t.Fatalf("fourth: %v, want errQueueFull", err)
	}
	// The second gives up its place: the third moves up and hears of it.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := second.wait(ctx, func(int) {}); !errors.Is(err, context.Canceled) {
		t.Fatal(err)
	}
	select {
	case <-third.moved:
	default:
		t.Fatal("third was not told it moved")
	}
	if third.Position() != 1 {
		t.Fatalf("third at %d, want 1", third.Position())
	}
	first.release()
	if err := third.wait(context.Background(), func(int) {}); err != nil || third.Position() != 0 {
		t.Fatalf("third after the first left: %v position %d", err, third.Position())
	}
	first.release() // twice is harmless
	third.release()
	if q.running != 0 || len(q.waiting) != 0 {
		t.Fatalf("queue not empty: running %d waiting %d", q.running, len(q.waiting))
	}
}

// fixture is a route and API on a real store, with a scripted upstream.
type fixture struct {
	st     store.Store
	engine *Engine
	route  *Route
	api    *API
}

func newFixture(t testing.TB, route Route) *fixture {
	t.Helper()
	st, err := store.Open(filepath.Join(t.TempDir(), "progress.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := New(st, nil, nil, nil)
	route.Engine = e
	route.Init()
	api := &API{Engine: e, Heartbeat: 50 * time.Millisecond}
	api.Init()
	t.Cleanup(func() {
		e.Close()
		st.Close()
	})
	return &fixture{st: st, engine: e, route: &route, api: api}
}

// start sends a request through the route and returns the recorded response.
func (f *fixture) start(t testing.TB, prefer string, upstream Upstream) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest("POST", "/reports?x=1", strings.NewReader("body"))
	if prefer != "" {
		r.Header.Set("Prefer", prefer)
	}
	w := httptest.NewRecorder()
	if err := f.route.Serve(w, r, Owner{}, upstream); err != nil {
		var p *Problem
		if errors.As(err, &p) {
			p.Write(w)
		} else {
			t.Fatal(err)
		}
	}
	return w
}

// startHeld starts a job whose upstream answers 200 once release is closed.
func (f *fixture) startHeld(t testing.TB) (id string, release chan struct{}) {
	t.Helper()
	release = make(chan struct{})
	w := f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		<-release
		w.WriteHeader(http.StatusOK)
		return nil
	})
	return docOf(t, w).ID, release
}

func (f *fixture) call(t *testing.T, method, target string, header http.Header) *httptest.ResponseRecorder {
	t.Helper()
	r := httptest.NewRequest(method, target, nil)
	for k, v := range header {
		r.Header[k] = v
	}
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

func docOf(t testing.TB, w *httptest.ResponseRecorder) store.Job {
	t.Helper()
	var j store.Job
	if err := json.Unmarshal(w.Body.Bytes(), &j); err != nil {
		t.Fatalf("%d %s: %v", w.Code, w.Body, err)
	}
	return j
}

func TestNoPreferPassesThroughUntouched(t *testing.T) {
	f := newFixture(t, Route{})
	var seen *http.Request
	w := f.start(t, "", func(w http.ResponseWriter, r *http.Request) error {
		seen = r
		w.WriteHeader(http.StatusTeapot)
		return nil
	})
	if w.Code != http.StatusTeapot || seen.Header.Get("Progress-Job-Id") != "" {
		t.Fatalf("passthrough: %d, job header %q", w.Code, seen.Header.Get("Progress-Job-Id"))
	}
	if page, _ := f.st.List(context.Background(), store.ListQuery{}); len(page.Jobs) != 0 {
		t.Fatalf("a request without Prefer made %d jobs", len(page.Jobs))
	}
}

func TestRespondAsyncRunsDetached(t *testing.T) {
	f := newFixture(t, Route{CallbackBase: "http://127.0.0.1:2080"})
	release := make(chan struct{})
	var upstreamReq *http.Request
	w := f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		upstreamReq = r
		<-release
		w.Header().Set("Content-Type", "text/plain")
		w.WriteHeader(http.StatusCreated)
		body, _ := io.ReadAll(r.Body)
		w.Write(append([]byte("got "), body...))
		return nil
	})
	if w.Code != http.StatusAccepted {
		t.Fatalf("status %d: %s", w.Code, w.Body)
	}
	doc := docOf(t, w)
	h := w.Header()
	if h.Get("Location") != "/_jobs/"+doc.ID || h.Get("Preference-Applied") != "respond-async" ||
		h.Get("Link") != "</_jobs/"+doc.ID+`/events>; rel="monitor"` || h.Get("Retry-After") == "" {
		t.Fatalf("202 headers: %v", h)
	}
	// The client is gone; the job runs on.
	close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for after := uint64(1); ; {
		ev, err := f.st.Wait(ctx, doc.ID, after)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Done() {
			break
		}
		after = ev.Seq
	}
	if got := upstreamReq.Header.Get("Progress-Job-Id"); got != doc.ID {
		t.Fatalf("Progress-Job-Id %q", got)
	}
	if got := upstreamReq.Header.Get("Progress-Callback"); got != "http://127.0.0.1:2080/_jobs/"+doc.ID+"/progress" {
		t.Fatalf("Progress-Callback %q", got)
	}
	if upstreamReq.Header.Get("Progress-Token") != f.engine.Token(doc.ID) || f.engine.Token(doc.ID) == f.engine.Token("other") {
		t.Fatal("Progress-Token is not the job's own")
	}
	if upstreamReq.Header.Get("Prefer") != "" {
		t.Fatal("the upstream saw the Prefer header")
	}
	res := f.call(t, "GET", "/_jobs/"+doc.ID+"/result", nil)
	if res.Code != http.StatusCreated || res.Body.String() != "got body" || res.Header().Get("Content-Type") != "text/plain" {
		t.Fatalf("result: %d %q %v", res.Code, res.Body, res.Header())
	}
}

func TestWaitPassesFastResponseThrough(t *testing.T) {
	f := newFixture(t, Route{})
	w := f.start(t, "wait=10", func(w http.ResponseWriter, r *http.Request) error {
		w.Header().Set("X-Up", "1")
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, "fast")
		return nil
	})
	if w.Code != http.StatusOK || w.Body.String() != "fast" || w.Header().Get("X-Up") != "1" {
		t.Fatalf("passthrough: %d %q", w.Code, w.Body)
	}
}

func TestWaitRunsOutTo202(t *testing.T) {
	f := newFixture(t, Route{MaxWait: 50 * time.Millisecond})
	release := make(chan struct{})
	defer close(release)
	w := f.start(t, "wait=30", func(w http.ResponseWriter, r *http.Request) error {
		<-release
		return nil
	})
	if w.Code != http.StatusAccepted {
		t.Fatalf("slow upstream with a capped wait: %d", w.Code)
	}
}

func TestCancelAbortsUpstream(t *testing.T) {
	f := newFixture(t, Route{})
	aborted := make(chan error, 1)
	entered := make(chan struct{})
	w := f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		close(entered)
		<-r.Context().Done()
		aborted <- r.Context().Err()
		return r.Context().Err()
	})
	id := docOf(t, w).ID
	if docOf(t, w).State != store.Running {
		t.Fatalf("a job with a free slot starts running, not %s", docOf(t, w).State)
	}
	<-entered
	c := f.call(t, "POST", "/_jobs/"+id+"/cancel", nil)
	if c.Code != http.StatusOK || docOf(t, c).State != store.Canceled {
		t.Fatalf("cancel: %d %s", c.Code, c.Body)
	}
	select {
	case <-aborted:
	case <-time.After(10 * time.Second):
		t.Fatal("the upstream request was not aborted")
	}
	if again := f.call(t, "POST", "/_jobs/"+id+"/cancel", nil); again.Code != http.StatusOK {
		t.Fatalf("cancel twice: %d", again.Code)
	}
	if res := f.call(t, "GET", "/_jobs/"+id+"/result", nil); res.Code != http.StatusConflict || res.Header().Get("Content-Type") != "application/problem+json" {
		t.Fatalf("result of a canceled job: %d %s", res.Code, res.Body)
	}
}

func TestLongPollAndETag(t *testing.T) {
	f := newFixture(t, Route{})
	id, release := f.startHeld(t)
	get := f.call(t, "GET", "/_jobs/"+id, nil)
	if get.Header().Get("ETag") != `"1"` || get.Header().Get("Retry-After") == "" {
		t.Fatalf("status: %v", get.Header())
	}
	if nm := f.call(t, "GET", "/_jobs/"+id, http.Header{"If-None-Match": {`"1"`}}); nm.Code != http.StatusNotModified {
		t.Fatalf("If-None-Match current: %d", nm.Code)
	}
	done := make(chan *httptest.ResponseRecorder)
	go func() { done <- f.call(t, "GET", "/_jobs/"+id+"?after=1&wait=20s", nil) }()
	close(release)
	lp := <-done
	if lp.Code != http.StatusOK || docOf(t, lp).Seq != 2 || lp.Header().Get("ETag") != `"2"` {
		t.Fatalf("long-poll: %d %s", lp.Code, lp.Body)
	}
	start := time.Now()
	nm := f.call(t, "GET", "/_jobs/"+id, http.Header{"If-None-Match": {`"2"`}, "Prefer": {"wait=1"}})
	if nm.Code != http.StatusNotModified || time.Since(start) < time.Second {
		t.Fatalf("long-poll on a finished job: %d after %s", nm.Code, time.Since(start))
	}
}

func TestEventStream(t *testing.T) {
	f := newFixture(t, Route{})
	id, release := f.startHeld(t)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := f.api.ServeHTTP(w, r); err != nil {
			var p *Problem
			errors.As(err, &p)
			p.Write(w)
		}
	}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/_jobs/" + id + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") != "text/event-stream" || resp.Header.Get("X-Accel-Buffering") != "no" || resp.Header.Get("Cache-Control") != "no-store" {
		t.Fatalf("headers: %v", resp.Header)
	}
	lines := bufio.NewScanner(resp.Body)
	var events []string
	heartbeats := 0
	for lines.Scan() {
		line := lines.Text()
		switch {
		case strings.HasPrefix(line, "event: "):
			events = append(events, strings.TrimPrefix(line, "event: "))
			if len(events) == 1 {
				close(release) // the first event came while the job still ran
			}
		case line == ": heartbeat":
			heartbeats++
		case strings.HasPrefix(line, "data: "):
			if strings.ContainsAny(strings.TrimPrefix(line, "data: "), "\r") {
				t.Fatalf("data line with a carriage return: %q", line)
			}
		}
	}
	if len(events) == 0 || events[len(events)-1] != "done" {
		t.Fatalf("events %v: the stream did not end on done", events)
	}
	resume, err := http.Get(srv.URL + "/_jobs/" + id + "/events?last_event_id=2")
	if err != nil {
		t.Fatal(err)
	}
	resume.Body.Close()
	if resume.StatusCode != http.StatusNoContent {
		t.Fatalf("reconnect after done: %d", resume.StatusCode)
	}
}

func TestOwnerBinding(t *testing.T) {
	f := newFixture(t, Route{})
	f.api.OwnerOf = func(r *http.Request, expr string) string { return r.Header.Get(expr) }
	r := httptest.NewRequest("POST", "/x", nil)
	r.Header.Set("Prefer", "respond-async")
	w := httptest.NewRecorder()
	err := f.route.Serve(w, r, Owner{Value: "alice", Expr: "X-User"}, func(w http.ResponseWriter, r *http.Request) error { return nil })
	if err != nil {
		t.Fatal(err)
	}
	id := docOf(t, w).ID
	if got := f.call(t, "GET", "/_jobs/"+id, http.Header{"X-User": {"alice"}}); got.Code != http.StatusOK {
		t.Fatalf("owner reading: %d", got.Code)
	}
	for _, who := range []string{"mallory", ""} {
		got := f.call(t, "GET", "/_jobs/"+id, http.Header{"X-User": {who}})
		unknown := f.call(t, "GET", "/_jobs/AAAAAAAAAAAAAAAAAAAAAA", http.Header{"X-User": {who}})
		if got.Code != http.StatusNotFound || got.Body.String() != unknown.Body.String() {
			t.Fatalf("someone else (%q): %d %s vs unknown %s", who, got.Code, got.Body, unknown.Body)
		}
		if c := f.call(t, "POST", "/_jobs/"+id+"/cancel", http.Header{"X-User": {who}}); c.Code != http.StatusNotFound {
			t.Fatalf("someone else canceling: %d", c.Code)
		}
	}
}

func TestProblems(t *testing.T) {
	f := newFixture(t, Route{MaxBody: 10})
	for _, tc := range []struct {
		name   string
		w      *httptest.ResponseRecorder
		status int
	}{
		{"malformed Prefer", f.start(t, "wait=abc", nil), http.StatusBadRequest},
		{"body too large", func() *httptest.ResponseRecorder {
			r := httptest.NewRequest("POST", "/x", strings.NewReader(strings.Repeat("b", 11)))
			r.Header.Set("Prefer", "respond-async")
			w := httptest.NewRecorder()
			err := f.route.Serve(w, r, Owner{}, nil)
			var p *Problem
			if !errors.As(err, &p) {
				t.Fatalf("body too large: %v", err)
			}
			p.Write(w)
			return w
		}(), http.StatusRequestEntityTooLarge},
		{"unknown job", f.call(t, "GET", "/_jobs/nope", nil), http.StatusNotFound},
		{"unknown endpoint", f.call(t, "GET", "/_jobs/AAAAAAAAAAAAAAAAAAAAAA/nope", nil), http.StatusNotFound},
		{"wrong method", f.call(t, "PUT", "/_jobs/AAAAAAAAAAAAAAAAAAAAAA/cancel", nil), http.StatusMethodNotAllowed},
	} {
		var p Problem
		if tc.w.Code != tc.status || tc.w.Header().Get("Content-Type") != "application/problem+json" {
			t.Errorf("%s: %d %s", tc.name, tc.w.Code, tc.w.Header().Get("Content-Type"))
			continue
		}
		if err := json.Unmarshal(tc.w.Body.Bytes(), &p); err != nil || p.Type == "" || p.Title == "" || p.Detail == "" || p.Status != tc.status {
			t.Errorf("%s: problem document %s (%v)", tc.name, tc.w.Body, err)
		}
	}
}

func TestQueueFull(t *testing.T) {
	f := newFixture(t, Route{Concurrency: 1, MaxQueue: 1})
	release := make(chan struct{})
	defer close(release)
	block := func(w http.ResponseWriter, r *http.Request) error {
		select {
		case <-release:
		case <-r.Context().Done():
		}
		return nil
	}
	first := f.start(t, "respond-async", block)
	second := f.start(t, "respond-async", block)
	if first.Code != http.StatusAccepted || second.Code != http.StatusAccepted {
		t.Fatalf("first two: %d %d", first.Code, second.Code)
	}
	if pos := docOf(t, second).QueuePosition; pos == nil || *pos != 1 {
		t.Fatalf("second's queue_position: %v", pos)
	}
	third := f.start(t, "respond-async", block)
	if third.Code != http.StatusServiceUnavailable || third.Header().Get("Retry-After") == "" {
		t.Fatalf("third: %d %v", third.Code, third.Header())
	}
}

// waitEnd waits for a job's done event and returns the final document.
func (f *fixture) waitEnd(t *testing.T, id string) store.Job {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for after := uint64(0); ; {
		ev, err := f.st.Wait(ctx, id, after)
		if err != nil {
			t.Fatal(err)
		}
		if ev.Done() {
			var j store.Job
			if err := json.Unmarshal(ev.Data, &j); err != nil {
				t.Fatal(err)
			}
			return j
		}
		after = ev.Seq
	}
}

// An upstream handler that panics, as reverse_proxy does with http.ErrAbortHandler when the
// upstream's body breaks off, fails the job instead of taking the process down: the job's
// goroutine is not one net/http recovers.
func TestUpstreamPanicFailsJob(t *testing.T) {
	f := newFixture(t, Route{})
	for _, tc := range []struct {
		name     string
		upstream Upstream
		code     string
	}{
		{"abort after the head", func(w http.ResponseWriter, r *http.Request) error {
			w.WriteHeader(http.StatusOK)
			io.WriteString(w, "part of the body")
			panic(http.ErrAbortHandler)
		}, "upstream_incomplete"},
		{"abort before the head", func(w http.ResponseWriter, r *http.Request) error {
			panic(http.ErrAbortHandler)
		}, "upstream_error"},
		{"a bug", func(w http.ResponseWriter, r *http.Request) error {
			panic(errors.New("a bug in the handler chain"))
		}, "upstream_error"},
	} {
		id := docOf(t, f.start(t, "respond-async", tc.upstream)).ID
		j := f.waitEnd(t, id)
		if j.State != store.Failed || j.Error == nil || j.Error.Code != tc.code || j.Response != nil {
			t.Errorf("%s: state %s error %+v response %+v, want failed with %s", tc.name, j.State, j.Error, j.Response, tc.code)
		}
	}
}

// A client the response passes through (Prefer: wait) when the upstream breaks off mid-body
// has its exchange aborted, not ended as if the body were complete.
func TestWaitPassthroughBrokenOff(t *testing.T) {
	f := newFixture(t, Route{})
	var recovered any
	func() {
		defer func() { recovered = recover() }()
		f.start(t, "wait=10", func(w http.ResponseWriter, r *http.Request) error {
			w.WriteHeader(http.StatusOK)
			io.WriteString(w, "part of the body")
			panic(http.ErrAbortHandler)
		})
	}()
	if recovered != http.ErrAbortHandler {
		t.Fatalf("the client's handler ended with %v, want a panic with http.ErrAbortHandler", recovered)
	}
}
