package upstreamhook

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
)

// The sidecar's request to the app, as the engine sends it on.
func sidecarRequest(t *testing.T, app, callback, token, id string) *http.Request {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, app, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, value := range map[string]string{HeaderCallback: callback, HeaderToken: token, HeaderJobID: id} {
		if value != "" {
			req.Header.Set(name, value)
		}
	}
	return req
}

func TestMiddlewareReportsAndFlushesBeforeResponding(t *testing.T) {
	s := newSidecar()
	base, _ := serveLoopback(t, s)
	// The handler runs on another goroutine, and the race detector sees no order through a
	// socket: what it saw comes back on a channel.
	seen := make(chan *Reporter, 1)
	app := httptest.NewServer(Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rep := FromContext(r.Context())
		seen <- rep
		rep.Percent(10)
		rep.Step(2, 4, "resizing")
		rep.Percent(99)
		io.WriteString(w, "done")
	})))
	defer app.Close()

	callback, token := s.callback(base, testJob)
	resp, err := http.DefaultClient.Do(sidecarRequest(t, app.URL, callback, token, testJob))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// Read before anything else can happen: the last update must be in by now.
	got := s.percents()
	if string(body) != "done" {
		t.Fatalf("app answered %q", body)
	}
	if rep := <-seen; rep.JobID() != testJob || rep.Active() {
		t.Fatalf("reporter in the handler: job %q, active %v after the handler returned", rep.JobID(), rep.Active())
	}
	if len(got) == 0 || got[len(got)-1] != 99 {
		t.Fatalf("updates when the response completed: %v; the last must be 99", got)
	}
	// Anything before it is an earlier update, in order: latest-wins may skip, never reorder.
	want := []float64{10, -1, 99}
	for _, p := range got {
		for len(want) > 0 && want[0] != p {
			want = want[1:]
		}
		if len(want) == 0 {
			t.Fatalf("updates %v are not a subsequence of 10, step, 99", got)
		}
		want = want[1:]
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, tok := range s.tokens {
		if tok != token {
			t.Fatalf("callback with bearer token %q, want the job's %q", tok, token)
		}
	}
}

func TestMiddlewareWithoutSidecarIsNoop(t *testing.T) {
	s := newSidecar()
	base, _ := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	tests := []struct {
		name, callback, token, id string
	}{
		{name: "no headers"},
		{name: "no callback", token: token, id: testJob},
		{name: "no token", callback: callback, id: testJob},
		{name: "relative callback", callback: "/_jobs/" + testJob + "/progress", token: token, id: testJob},
		{name: "host-relative callback", callback: strings.TrimPrefix(callback, "http:"), token: token, id: testJob},
		{name: "garbage callback", callback: "::not a url::", token: token, id: testJob},
		{name: "not http", callback: "ftp" + strings.TrimPrefix(callback, "http"), token: token, id: testJob},
		{name: "no host", callback: "http:///_jobs/" + testJob + "/progress", token: token, id: testJob},
		{name: "token with a space", callback: callback, token: "a " + token, id: testJob},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			seen := make(chan *Reporter, 1)
			app := httptest.NewServer(Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				rep := FromContext(r.Context())
				rep.Percent(50)
				rep.Report(Update{Stage: "x"})
				seen <- rep
			})))
			defer app.Close()
			resp, err := http.DefaultClient.Do(sidecarRequest(t, app.URL, tt.callback, tt.token, tt.id))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			var rep *Reporter
			select {
			case rep = <-seen:
			default:
				t.Fatal("the handler did not run")
			}
			if rep == nil || rep.Active() || rep.JobID() != "" {
				t.Fatalf("reporter %+v: want the no-op one", rep)
			}
			if err := rep.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if n := s.count(); n != 0 {
				t.Fatalf("%d callbacks sent", n)
			}
		})
	}
}

func TestNoopReporter(t *testing.T) {
	for name, r := range map[string]*Reporter{
		"FromContext":             FromContext(context.Background()),
		"FromContext of nil":      FromContext(nil), //lint:ignore SA1012 a nil context must not panic
		"NewReporter without URL": NewReporter("", "token", Options{}),
		"nil":                     nil,
	} {
		if name != "nil" && r == nil {
			t.Fatalf("%s: nil", name)
		}
		r.Percent(10)
		r.Step(1, 2, "x")
		r.Report(Update{Percent: Float(3)})
		if r.Active() || r.JobID() != "" || r.Close(context.Background()) != nil {
			t.Fatalf("%s: active %v, job %q", name, r.Active(), r.JobID())
		}
	}
	var l logs
	r := NewReporter("not a url", "token", Options{Logf: l.logf})
	if r.Active() || !l.contain("not a url") {
		t.Fatalf("a bad callback: active %v, logged %q", r.Active(), l.String())
	}
}

func TestNewReporter(t *testing.T) {
	s := newSidecar()
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	r := newReporter(t, callback, token, Options{Client: client})
	if !r.Active() || r.JobID() != testJob {
		t.Fatalf("active %v, job %q", r.Active(), r.JobID())
	}
	r.Percent(150) // clamped
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	r.Percent(20) // after Close: dropped
	if got := s.percents(); !reflect.DeepEqual(got, []float64{100}) {
		t.Fatalf("received %v", got)
	}
	if r.Active() {
		t.Fatal("active after Close")
	}
	if _, running := goroutine(r); running {
		t.Fatal("a Report after Close started a goroutine")
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got := NewReporter("http://h/cb", "t", Options{}).JobID(); got != "" {
		t.Fatalf("job id %q from a URL without /<id>/progress", got)
	}
}

func TestLatestWins(t *testing.T) {
	s := newSidecar()
	arrived, release := make(chan struct{}), make(chan struct{})
	s.hold = func(n int, _ *http.Request) {
		if n == 1 {
			close(arrived)
			<-release
		}
	}
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	r := newReporter(t, callback, token, Options{Client: client, MinInterval: -1})
	r.Percent(1)
	<-arrived
	for p := 2.0; p <= 5; p++ {
		r.Percent(p)
	}
	close(release)
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := s.percents(); !reflect.DeepEqual(got, []float64{1, 5}) {
		t.Fatalf("received %v, want the update in flight and then only the last: [1 5]", got)
	}
	if n := s.count(); n != 2 {
		t.Fatalf("%d callbacks", n)
	}
}

func TestUpdatesAreNotMerged(t *testing.T) {
	s := newSidecar()
	arrived, release := make(chan struct{}), make(chan struct{})
	s.hold = func(n int, _ *http.Request) {
		if n == 1 {
			close(arrived)
			<-release
		}
	}
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	r := newReporter(t, callback, token, Options{Client: client, MinInterval: -1})
	r.Percent(1)
	<-arrived
	r.Report(Update{Stage: "a", Percent: Float(2)})
	r.Report(Update{Message: "b"})
	close(release)
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.updates) != 2 || !reflect.DeepEqual(s.updates[1], Update{Message: "b"}) {
		t.Fatalf("received %d updates, the last %s; want it to be exactly {message: b}", len(s.updates), show(s.updates[len(s.updates)-1]))
	}
}

func TestGivesUpForGood(t *testing.T) {
	tests := []struct {
		name   string
		status int
		setup  func(s *sidecar, base string) (callback, token string)
	}{
		{"bad token", http.StatusUnauthorized, func(s *sidecar, base string) (string, string) {
			callback, _ := s.callback(base, testJob)
			return callback, s.signer.Token("job-2")
		}},
		{"unknown job", http.StatusNotFound, func(s *sidecar, base string) (string, string) {
			return s.callback(base, "job-404")
		}},
		{"finished job", http.StatusConflict, func(s *sidecar, base string) (string, string) {
			s.finished["job-done"] = true
			return s.callback(base, "job-done")
		}},
		{"forbidden", http.StatusForbidden, func(s *sidecar, base string) (string, string) {
			s.answer = func(int) int { return http.StatusForbidden }
			return s.callback(base, testJob)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSidecar()
			base, client := serveLoopback(t, s)
			callback, token := tt.setup(s, base)
			var l logs
			r := newReporter(t, callback, token, Options{Client: client, MinInterval: -1, Logf: l.logf})
			r.Percent(10)
			waitIdle(t, r)
			if r.Active() {
				t.Fatal("still active")
			}
			if !l.contain(http.StatusText(tt.status)) {
				t.Fatalf("log %q does not say %d", l.String(), tt.status)
			}
			r.Percent(20)
			r.Step(1, 2, "")
			if _, running := goroutine(r); running {
				t.Fatal("a Report after giving up started a goroutine")
			}
			err := r.Close(context.Background())
			if err == nil || !strings.Contains(err.Error(), http.StatusText(tt.status)) {
				t.Fatalf("Close: %v", err)
			}
			if n := s.count(); n != 1 {
				t.Fatalf("%d callbacks, want 1", n)
			}
		})
	}
}

func TestRejectedUpdateIsDropped(t *testing.T) {
	tests := []struct {
		name   string
		status int
		first  Update
		setup  func(s *sidecar)
	}{
		{"400", http.StatusBadRequest, Update{Percent: Float(10)}, func(s *sidecar) {
			s.answer = func(n int) int {
				if n == 1 {
					return http.StatusBadRequest
				}
				return http.StatusNoContent
			}
		}},
		// Within the default limits the client checks, over the ones this sidecar was given.
		{"413", http.StatusRequestEntityTooLarge, Update{Percent: Float(10), Stage: "resizing images"}, func(s *sidecar) {
			s.limits.MaxStage = 8
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newSidecar()
			tt.setup(s)
			base, client := serveLoopback(t, s)
			callback, token := s.callback(base, testJob)
			var l logs
			r := newReporter(t, callback, token, Options{Client: client, MinInterval: -1, Logf: l.logf})
			r.Report(tt.first)
			waitIdle(t, r)
			if !r.Active() {
				t.Fatal("gave up on a rejected update")
			}
			if !l.contain(http.StatusText(tt.status)) {
				t.Fatalf("log %q does not say %d", l.String(), tt.status)
			}
			r.Percent(20)
			if err := r.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := s.percents(); !reflect.DeepEqual(got, []float64{20}) || s.count() != 2 {
				t.Fatalf("received %v in %d callbacks, want [20] in 2", got, s.count())
			}
		})
	}
}

func TestReportChecksUpdatesLocally(t *testing.T) {
	s := newSidecar()
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	var l logs
	r := newReporter(t, callback, token, Options{Client: client, Logf: l.logf})
	bad := map[string]Update{
		"empty update":   {},
		"percent":        {Percent: Float(101)},
		"current":        {Current: Float(5), Total: Float(4)},
		"data":           {Data: json.RawMessage(`[1]`)},
		"unexpected end": {Data: json.RawMessage(`{`)},
		"NaN":            {Percent: Float(math.NaN())},
		"larger than":    {Message: strings.Repeat("m", DefaultMaxMessage+1)},
	}
	for want, u := range bad {
		r.Report(u)
		if !l.contain(want) {
			t.Errorf("%s: not logged; log: %q", want, l.String())
		}
	}
	r.Step(3, 2, "")
	if _, running := goroutine(r); running {
		t.Fatal("a malformed update started a goroutine")
	}
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	if n := s.count(); n != 0 {
		t.Fatalf("%d callbacks sent", n)
	}
}

func TestReportCopiesData(t *testing.T) {
	s := newSidecar()
	arrived, release := make(chan struct{}), make(chan struct{})
	s.hold = func(n int, _ *http.Request) {
		if n == 1 {
			close(arrived)
			<-release
		}
	}
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	r := newReporter(t, callback, token, Options{Client: client, MinInterval: -1})
	r.Percent(1)
	<-arrived
	data := []byte(`{"n":1}`)
	r.Report(Update{Data: data})
	copy(data, `{"n":2}`) // the caller reuses its buffer
	close(release)
	if err := r.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if got := string(s.updates[len(s.updates)-1].Data); got != `{"n":1}` {
		t.Fatalf("data %s", got)
	}
}

func TestCloseAbortsWhenItsContextEnds(t *testing.T) {
	s := newSidecar()
	arrived := make(chan struct{})
	s.hold = func(n int, r *http.Request) {
		if n == 1 {
			close(arrived)
			<-r.Context().Done() // until the reporter aborts the callback
		}
	}
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	r := newReporter(t, callback, token, Options{Client: client})
	r.Percent(1)
	<-arrived
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	err := r.Close(ctx)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Close: %v", err)
	}
	if _, running := goroutine(r); running {
		t.Fatal("goroutine still running after Close")
	}
}

func TestMiddlewareFlushesWhenTheHandlerPanics(t *testing.T) {
	s := newSidecar()
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	h := Options{Client: client}.Middleware(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		FromContext(r.Context()).Percent(70)
		panic(http.ErrAbortHandler)
	}))
	req := sidecarRequest(t, "http://app.test/", callback, token, testJob)
	func() {
		defer func() {
			if recover() != http.ErrAbortHandler {
				t.Fatal("the panic did not go through")
			}
		}()
		h.ServeHTTP(httptest.NewRecorder(), req)
	}()
	if got := s.percents(); !reflect.DeepEqual(got, []float64{70}) {
		t.Fatalf("received %v", got)
	}
}

func TestRedirectIsNotFollowed(t *testing.T) {
	s := newSidecar()
	base, client := serveLoopback(t, s)
	callback, token := s.callback(base, testJob)
	var redirects atomic.Int32
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		redirects.Add(1)
		http.Redirect(w, r, callback, http.StatusFound)
	}))
	defer redirector.Close()
	var l logs
	r := newReporter(t, redirector.URL+"/_jobs/"+testJob+"/progress", token, Options{Client: client, Logf: l.logf})
	r.Percent(5)
	waitIdle(t, r)
	if r.Active() || redirects.Load() != 1 || s.count() != 0 {
		t.Fatalf("active %v, %d redirects, %d callbacks reached the sidecar", r.Active(), redirects.Load(), s.count())
	}
	r.Close(context.Background())
	// The caller's client keeps its own policy.
	if client.CheckRedirect != nil {
		t.Fatal("the caller's client was changed")
	}
}
