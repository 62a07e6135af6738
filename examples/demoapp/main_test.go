package main

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-progress/progress/upstreamhook"
)

// fast is a configuration quick enough for unit tests.
var fast = config{collect: 5 * time.Millisecond, pages: 3, page: 5 * time.Millisecond, quiet: 20 * time.Millisecond}

// callbacks stands in for the sidecar's callback endpoint: it records every update and its
// Authorization header.
type callbacks struct {
	srv     *httptest.Server
	mu      sync.Mutex
	updates []upstreamhook.Update
	auths   []string
	changed chan struct{} // closed and replaced on every update
}

func newCallbacks(t *testing.T) *callbacks {
	c := &callbacks{changed: make(chan struct{})}
	c.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		u, err := upstreamhook.ParseUpdate(r.Body, upstreamhook.Limits{})
		if err != nil {
			t.Errorf("the app sent a callback the sidecar would refuse: %v", err)
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		c.mu.Lock()
		c.updates = append(c.updates, u)
		c.auths = append(c.auths, r.Header.Get("Authorization"))
		close(c.changed)
		c.changed = make(chan struct{})
		c.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(c.srv.Close)
	return c
}

// waitFor waits, at most 10s, until an update satisfies match, and returns all updates so far.
func (c *callbacks) waitFor(t *testing.T, what string, match func(upstreamhook.Update) bool) []upstreamhook.Update {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		c.mu.Lock()
		got := append([]upstreamhook.Update(nil), c.updates...)
		changed := c.changed
		c.mu.Unlock()
		for _, u := range got {
			if match(u) {
				return got
			}
		}
		select {
		case <-changed:
		case <-deadline.C:
			t.Fatalf("no update %s within 10s; got %d updates", what, len(got))
		}
	}
}

func (c *callbacks) count() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.updates)
}

// jobRequest is a request as the sidecar sends it for a job.
func jobRequest(path, callbackURL string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, path, nil)
	r.Header.Set(upstreamhook.HeaderJobID, "job1")
	r.Header.Set(upstreamhook.HeaderCallback, callbackURL+"/_jobs/job1/progress")
	r.Header.Set(upstreamhook.HeaderToken, "secret-token")
	return r
}

func TestGenerateReportsProgress(t *testing.T) {
	cb := newCallbacks(t)
	w := httptest.NewRecorder()
	newMux(fast).ServeHTTP(w, jobRequest("/reports/generate", cb.srv.URL))

	if w.Code != http.StatusOK || w.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("answer %d %q, want 200 application/json:\n%s", w.Code, w.Header().Get("Content-Type"), w.Body)
	}
	var report struct {
		Report string `json:"report"`
		Pages  int    `json:"pages"`
		JobID  string `json:"job_id"`
	}
	if err := json.Unmarshal(w.Body.Bytes(), &report); err != nil || report.Report == "" || report.Pages != 3 || report.JobID != "job1" {
		t.Errorf("report %+v (%v):\n%s", report, err, w.Body)
	}

	// The reporter may coalesce updates (latest wins), but the last one, 100%, always arrives.
	updates := cb.waitFor(t, `"report ready"`, func(u upstreamhook.Update) bool { return u.Message == "report ready" })
	prev := -1.0
	page := regexp.MustCompile(`^page [1-3] of 3$`)
	for i, u := range updates {
		if u.Percent == nil {
			t.Errorf("update %d has no percent: %+v", i, u)
			continue
		}
		if *u.Percent < prev {
			t.Errorf("percent went back from %v to %v", prev, *u.Percent)
		}
		prev = *u.Percent
		if u.Stage == "render" && (!page.MatchString(u.Message) || u.Current == nil || u.Total == nil || *u.Total != 3) {
			t.Errorf("render update %d: %+v", i, u)
		}
	}
	if last := updates[len(updates)-1]; last.Percent == nil || *last.Percent != 100 || last.Message != "report ready" {
		t.Errorf("last update %+v, want 100%% report ready", last)
	}
	cb.mu.Lock()
	for _, a := range cb.auths {
		if a != "Bearer secret-token" {
			t.Errorf("callback Authorization %q, want the job's token", a)
		}
	}
	cb.mu.Unlock()
}

// Without the sidecar's headers (a plain request, not a job) the app answers as before and
// posts nothing.
func TestGenerateWithoutSidecar(t *testing.T) {
	cb := newCallbacks(t)
	w := httptest.NewRecorder()
	newMux(fast).ServeHTTP(w, httptest.NewRequest(http.MethodPost, "/reports/generate", nil))
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"report"`) {
		t.Fatalf("answer %d:\n%s", w.Code, w.Body)
	}
	if n := cb.count(); n != 0 {
		t.Errorf("%d callbacks sent for a request that did not come through the sidecar", n)
	}
}

func TestQuietReportsNothing(t *testing.T) {
	cb := newCallbacks(t)
	w := httptest.NewRecorder()
	start := time.Now()
	newMux(fast).ServeHTTP(w, jobRequest("/reports/quiet", cb.srv.URL))
	if w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `"job_id": "job1"`) {
		t.Fatalf("answer %d:\n%s", w.Code, w.Body)
	}
	if took := time.Since(start); took < fast.quiet {
		t.Errorf("answered after %v, before its -quiet %v", took, fast.quiet)
	}
	if n := cb.count(); n != 0 {
		t.Errorf("the quiet endpoint sent %d callbacks", n)
	}
}

// A request whose context ends (the job was canceled, the sidecar went away) stops the work
// and answers nothing.
func TestWorkStopsWithTheRequest(t *testing.T) {
	slow := config{collect: time.Hour, pages: 1, page: time.Hour, quiet: time.Hour}
	for _, path := range []string{"/reports/generate", "/reports/quiet"} {
		t.Run(strings.TrimPrefix(path, "/reports/"), func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			cancel()
			w := httptest.NewRecorder()
			newMux(slow).ServeHTTP(w, httptest.NewRequestWithContext(ctx, http.MethodPost, path, nil))
			if w.Body.Len() != 0 {
				t.Errorf("a canceled request got a body:\n%s", w.Body)
			}
		})
	}
}

func TestRoutes(t *testing.T) {
	mux := newMux(fast)
	for _, tc := range []struct {
		method, path string
		status       int
	}{
		{http.MethodGet, "/healthz", http.StatusOK},
		{http.MethodGet, "/reports/generate", http.StatusMethodNotAllowed},
		{http.MethodGet, "/reports/quiet", http.StatusMethodNotAllowed},
		{http.MethodPost, "/reports/other", http.StatusNotFound},
	} {
		w := httptest.NewRecorder()
		mux.ServeHTTP(w, httptest.NewRequest(tc.method, tc.path, nil))
		if w.Code != tc.status {
			body, _ := io.ReadAll(w.Body)
			t.Errorf("%s %s: %d, want %d: %s", tc.method, tc.path, w.Code, tc.status, body)
		}
	}
}
