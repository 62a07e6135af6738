package upstreamhook

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Every test ends with no goroutine of this package or of net/http left behind.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// sidecar is the server half of the callback protocol as the sidecar runs it: it checks the
// token with Signer and the body with ParseUpdate, so that tests exercise both halves.
type sidecar struct {
	signer   *Signer
	limits   Limits
	finished map[string]bool // jobs that answer 409; any job not "job-1" or in here is unknown (404)

	// hold, if set, is called with the number of each callback (from 1) after its body was
	// parsed and before it is answered, with the request for its context.
	hold func(n int, r *http.Request)
	// answer, if set, overrides the 204 of a valid callback.
	answer func(n int) int

	mu       sync.Mutex
	requests int         // callbacks received
	updates  []Update    // callbacks answered 204, in order
	times    []time.Time // arrival of every callback
	tokens   []string    // bearer token of every callback
}

const testJob = "job-1"

func newSidecar() *sidecar {
	return &sidecar{signer: NewSigner([]byte("test secret")), finished: map[string]bool{}}
}

func (s *sidecar) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	s.requests++
	n := s.requests
	s.times = append(s.times, time.Now())
	tok, _ := BearerToken(r)
	s.tokens = append(s.tokens, tok)
	s.mu.Unlock()

	id, ok := strings.CutPrefix(r.URL.Path, "/_jobs/")
	id, ok2 := strings.CutSuffix(id, "/progress")
	switch {
	case !ok || !ok2 || (id != testJob && !s.finished[id]):
		http.Error(w, "no such job", http.StatusNotFound)
		return
	case r.Method != http.MethodPost:
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	case !s.signer.Check(id, tok):
		http.Error(w, "bad token", http.StatusUnauthorized)
		return
	case s.finished[id]:
		http.Error(w, "job finished", http.StatusConflict)
		return
	case r.Header.Get("Content-Type") != "application/json":
		http.Error(w, "JSON only", http.StatusUnsupportedMediaType)
		return
	}
	u, err := ParseUpdate(r.Body, s.limits)
	if s.hold != nil {
		s.hold(n, r)
		if r.Context().Err() != nil {
			return // the client hung up while held: it will not count this one as delivered
		}
	}
	var tooLarge *TooLargeError
	switch {
	case errors.As(err, &tooLarge):
		http.Error(w, err.Error(), http.StatusRequestEntityTooLarge)
		return
	case err != nil:
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	status := http.StatusNoContent
	if s.answer != nil {
		status = s.answer(n)
	}
	if status == http.StatusNoContent {
		s.mu.Lock()
		s.updates = append(s.updates, u)
		s.mu.Unlock()
		w.WriteHeader(status)
		return
	}
	http.Error(w, fmt.Sprintf("answer %d", status), status)
}

// callback is the Progress-Callback and Progress-Token of job id at base.
func (s *sidecar) callback(base, id string) (string, string) {
	return base + "/_jobs/" + id + "/progress", s.signer.Token(id)
}

func (s *sidecar) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.requests
}

// percents lists the percent of each update received; -1 for an update without one.
func (s *sidecar) percents() []float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var p []float64
	for _, u := range s.updates {
		if u.Percent == nil {
			p = append(p, -1)
		} else {
			p = append(p, *u.Percent)
		}
	}
	return p
}

func (s *sidecar) arrivals() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.times...)
}

// serveLoopback runs s on a loopback port, with a client of its own whose connections are
// closed at the end of the test.
func serveLoopback(t *testing.T, s *sidecar) (base string, client *http.Client) {
	t.Helper()
	srv := httptest.NewServer(s)
	tr := &http.Transport{}
	t.Cleanup(func() {
		tr.CloseIdleConnections()
		srv.Close()
	})
	return srv.URL, &http.Client{Transport: tr}
}

// serveInMemory runs s inside a synctest bubble on an in-memory network. A goroutine waiting
// on a real socket is not durably blocked, so the bubble's clock would not move while a
// server waits for its next connection; both ends are still the real net/http. Call the
// returned stop before the bubble ends.
func serveInMemory(s *sidecar) (base string, client *http.Client, stop func()) {
	l := &memListener{conns: make(chan net.Conn), closed: make(chan struct{})}
	srv := &http.Server{Handler: s}
	served := make(chan struct{})
	go func() {
		defer close(served)
		srv.Serve(l)
	}()
	tr := &http.Transport{DialContext: l.dial}
	return "http://sidecar.test", &http.Client{Transport: tr}, func() {
		tr.CloseIdleConnections()
		srv.Close()
		<-served
	}
}

type memListener struct {
	conns  chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func (l *memListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *memListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *memListener) Addr() net.Addr { return memAddr{} }

func (l *memListener) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	client, server := net.Pipe()
	select {
	case l.conns <- server:
		return client, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

type memAddr struct{}

func (memAddr) Network() string { return "memory" }
func (memAddr) String() string  { return "sidecar.test:80" }

// logs collects what a reporter logs.
type logs struct {
	mu    sync.Mutex
	lines []string
}

func (l *logs) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

func (l *logs) contain(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, line := range l.lines {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

func (l *logs) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// goroutine returns the done channel of r's goroutine and whether one is running.
func goroutine(r *Reporter) (<-chan struct{}, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.done, r.running
}

// waitIdle waits until r's goroutine has exited, failing the test if that takes longer than
// a bound that is only there to turn a hang into a failure.
func waitIdle(t *testing.T, r *Reporter) {
	t.Helper()
	done, _ := goroutine(r)
	if done == nil {
		t.Fatal("no goroutine was ever started")
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the reporter's goroutine did not exit")
	}
	if _, running := goroutine(r); running {
		t.Fatal("a goroutine is running again")
	}
}

// abortReporter closes r at once, aborting whatever it was doing.
func abortReporter(r *Reporter) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r.Close(ctx)
}

// newReporter is NewReporter for a test, closed at its end if the test did not.
func newReporter(t *testing.T, callback, token string, o Options) *Reporter {
	r := NewReporter(callback, token, o)
	t.Cleanup(func() { abortReporter(r) })
	return r
}
