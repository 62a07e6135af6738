package upstreamhook

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"runtime"
	"strings"
	"testing"
	"testing/synctest"
	"time"
)

// These tests run in a synctest bubble, whose clock moves only when every goroutine in it is
// blocked: durations below are exact, not measured.

// bubbleReporter starts s in memory and a reporter on it for job-1. The returned stop ends
// both, so that a test that fails half-way still leaves no goroutine in the bubble.
func bubbleReporter(s *sidecar, o Options) (*Reporter, func()) {
	base, client, stopServer := serveInMemory(s)
	callback, token := s.callback(base, testJob)
	o.Client = client
	r := NewReporter(callback, token, o)
	return r, func() {
		abortReporter(r)
		stopServer()
	}
}

func closeWithin(t *testing.T, r *Reporter, d time.Duration) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return r.Close(ctx)
}

func TestReportNeverBlocks(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		release := make(chan struct{})
		s.hold = func(n int, r *http.Request) {
			if n == 1 {
				<-release // a sidecar that does not answer
			}
		}
		r, stop := bubbleReporter(s, Options{})
		defer stop()

		r.Percent(1)
		synctest.Wait() // the first callback is in the sidecar, stuck

		const reports, size = 5000, 4000
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		start := time.Now()
		for i := range reports {
			// Distinct messages of nearly the limit: kept, they would take 20 MB.
			msg := fmt.Sprintf("%0*d", size, i)
			r.Report(Update{Percent: Float(50), Message: msg})
		}
		if d := time.Since(start); d != 0 {
			t.Fatalf("%d Reports took %v of the bubble's clock: one of them waited", reports, d)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		if grew := int64(after.HeapAlloc) - int64(before.HeapAlloc); grew > 2<<20 {
			t.Fatalf("the heap grew by %d bytes over %d reports of %d bytes", grew, reports, size)
		}

		close(release)
		if err := closeWithin(t, r, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		if len(s.updates) != 2 || s.updates[1].Message != fmt.Sprintf("%0*d", size, reports-1) {
			t.Fatalf("received %d updates; want the stuck one and the last", len(s.updates))
		}
	})
}

func TestRetriesWithGrowingBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		s.answer = func(n int) int {
			if n <= 2 {
				return http.StatusServiceUnavailable
			}
			return http.StatusNoContent
		}
		r, stop := bubbleReporter(s, Options{})
		defer stop()

		start := time.Now()
		r.Percent(40)
		if err := closeWithin(t, r, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		if got := s.percents(); !reflect.DeepEqual(got, []float64{40}) {
			t.Fatalf("received %v", got)
		}
		at := s.arrivals()
		if len(at) != 3 || !at[0].Equal(start) {
			t.Fatalf("callbacks at %v, started at %v", at, start)
		}
		first, second := at[1].Sub(at[0]), at[2].Sub(at[1])
		if first < 50*time.Millisecond || first >= 100*time.Millisecond ||
			second < 100*time.Millisecond || second >= 200*time.Millisecond {
			t.Fatalf("waits %v then %v; want [50ms, 100ms) then [100ms, 200ms)", first, second)
		}
	})
}

func TestBackoffIsCapped(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		s.answer = func(int) int { return http.StatusBadGateway }
		r, stop := bubbleReporter(s, Options{})
		defer stop()

		r.Percent(40)
		time.Sleep(30 * time.Second)
		at := s.arrivals()
		if len(at) < 15 {
			t.Fatalf("only %d attempts in 30 s", len(at))
		}
		for i := 1; i < len(at); i++ {
			step := min(100*time.Millisecond<<(i-1), 2*time.Second)
			if wait := at[i].Sub(at[i-1]); wait < step/2 || wait >= step {
				t.Fatalf("wait %d was %v, want [%v, %v)", i, wait, step/2, step)
			}
		}

		// Close keeps retrying until its context ends, then aborts: nothing is sent after.
		err := closeWithin(t, r, 5*time.Second)
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "502") {
			t.Fatalf("Close: %v", err)
		}
		n := s.count()
		if done, running := goroutine(r); running || !isClosed(done) {
			t.Fatal("the goroutine outlived Close")
		}
		time.Sleep(time.Minute)
		if s.count() != n {
			t.Fatalf("%d callbacks after Close", s.count()-n)
		}
	})
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func TestTransientFailuresEndAfterAMinute(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		down := true
		s.answer = func(int) int {
			if down {
				return http.StatusServiceUnavailable
			}
			return http.StatusNoContent
		}
		var l logs
		r, stop := bubbleReporter(s, Options{Logf: l.logf})
		defer stop()

		r.Percent(10)
		time.Sleep(retryFor - time.Second)
		synctest.Wait()
		if _, running := goroutine(r); !running {
			t.Fatal("stopped retrying before a minute")
		}
		time.Sleep(5 * time.Second)
		synctest.Wait()
		if _, running := goroutine(r); running {
			t.Fatal("still retrying after a minute")
		}
		if !r.Active() || !l.contain("dropped after failing") || !l.contain("503") {
			t.Fatalf("active %v; log %q", r.Active(), l.String())
		}

		s.mu.Lock()
		down = false
		s.mu.Unlock()
		r.Percent(20)
		if err := closeWithin(t, r, time.Second); err != nil {
			t.Fatal(err)
		}
		if got := s.percents(); !reflect.DeepEqual(got, []float64{20}) {
			t.Fatalf("received %v", got)
		}
	})
}

func TestNewerUpdateReplacesOneBeingRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		s.answer = func(n int) int {
			if n == 1 {
				return http.StatusServiceUnavailable
			}
			return http.StatusNoContent
		}
		r, stop := bubbleReporter(s, Options{})
		defer stop()

		r.Percent(10)
		synctest.Wait() // failed once, waiting to retry
		r.Percent(20)
		if err := closeWithin(t, r, time.Second); err != nil {
			t.Fatal(err)
		}
		if got := s.percents(); !reflect.DeepEqual(got, []float64{20}) || s.count() != 2 {
			t.Fatalf("received %v in %d callbacks; want [20] in 2", got, s.count())
		}
	})
}

func TestEveryCallbackHasATimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		abandoned := make(chan time.Time, 1)
		s.hold = func(n int, r *http.Request) {
			if n == 1 {
				<-r.Context().Done() // never answers; returns when the client hangs up
				abandoned <- time.Now()
			}
		}
		// A client without a Timeout: the reporter's own bound must hold.
		r, stop := bubbleReporter(s, Options{})
		defer stop()

		start := time.Now()
		r.Percent(10)
		if err := closeWithin(t, r, time.Minute); err != nil {
			t.Fatal(err)
		}
		if got := (<-abandoned).Sub(start); got != attemptTimeout {
			t.Fatalf("the stuck callback was abandoned after %v, want %v", got, attemptTimeout)
		}
		at := s.arrivals()
		if retry := at[1].Sub(start); len(at) != 2 || retry < attemptTimeout+50*time.Millisecond || retry >= attemptTimeout+100*time.Millisecond {
			t.Fatalf("callbacks at %v after the start", retry)
		}
		if got := s.percents(); !reflect.DeepEqual(got, []float64{10}) {
			t.Fatalf("received %v", got)
		}
	})
}

func TestMinInterval(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		r, stop := bubbleReporter(s, Options{MinInterval: time.Second})
		defer stop()

		start := time.Now()
		r.Percent(1)
		synctest.Wait()
		r.Percent(2)
		r.Percent(3)
		synctest.Wait()
		if got := s.percents(); !reflect.DeepEqual(got, []float64{1}) {
			t.Fatalf("received %v before MinInterval", got)
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if got := s.percents(); !reflect.DeepEqual(got, []float64{1, 3}) {
			t.Fatalf("received %v", got)
		}
		if at := s.arrivals(); at[1].Sub(start) != time.Second {
			t.Fatalf("second callback %v after the first", at[1].Sub(start))
		}

		// The goroutine has exited; a new one still keeps the interval.
		synctest.Wait()
		if _, running := goroutine(r); running {
			t.Fatal("goroutine kept while idle")
		}
		time.Sleep(300 * time.Millisecond)
		r.Percent(4)
		synctest.Wait()
		if len(s.percents()) != 2 {
			t.Fatal("an update sent within MinInterval of the previous one")
		}
		time.Sleep(700 * time.Millisecond)
		synctest.Wait()
		if got := s.percents(); !reflect.DeepEqual(got, []float64{1, 3, 4}) {
			t.Fatalf("received %v", got)
		}

		// Close does not wait out the interval for the final flush.
		r.Percent(5)
		flushStart := time.Now()
		if err := closeWithin(t, r, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		if d := time.Since(flushStart); d != 0 {
			t.Fatalf("the final flush waited %v", d)
		}
		if got := s.percents(); !reflect.DeepEqual(got, []float64{1, 3, 4, 5}) {
			t.Fatalf("received %v", got)
		}
	})
}

func TestMiddlewareFlushTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := newSidecar()
		s.hold = func(n int, r *http.Request) { <-r.Context().Done() }
		base, client, stop := serveInMemory(s)
		defer stop()
		callback, token := s.callback(base, testJob)
		var l logs
		h := Options{Client: client, FlushTimeout: 3 * time.Second, Logf: l.logf}.Middleware(
			http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { FromContext(r.Context()).Percent(10) }))

		start := time.Now()
		h.ServeHTTP(nopWriter{}, sidecarRequest(t, "http://app.test/", callback, token, testJob))
		if d := time.Since(start); d != 3*time.Second {
			t.Fatalf("the handler returned after %v, want the 3 s FlushTimeout", d)
		}
		if !l.contain("deadline exceeded") {
			t.Fatalf("log %q", l.String())
		}
	})
}

type nopWriter struct{}

func (nopWriter) Header() http.Header         { return http.Header{} }
func (nopWriter) Write(b []byte) (int, error) { return len(b), nil }
func (nopWriter) WriteHeader(int)             {}
