package engine

import (
	"context"
	"fmt"
	"net/http"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddy-progress/progress/store"
)

// errDiskFull is what a bbolt commit returns when the disk is full.
var errDiskFull = fmt.Errorf("write progress.db: %w", syscall.ENOSPC)

// flakyStore refuses writes the way a store on a full disk does.
type flakyStore struct {
	store.Store
	failFinishes atomic.Int64 // how many Finish calls to refuse
	finishCalls  chan struct{}

	mu          sync.Mutex
	failUpdates string // refuse every Update of this job
}

func (s *flakyStore) Finish(ctx context.Context, id string, out store.Outcome) (*store.Job, error) {
	defer func() {
		select {
		case s.finishCalls <- struct{}{}:
		default:
		}
	}()
	if s.failFinishes.Add(-1) >= 0 {
		if out.Body != nil {
			out.Body.Discard() // as the bolt store does with the body of a refused Finish
		}
		return nil, errDiskFull
	}
	return s.Store.Finish(ctx, id, out)
}

func (s *flakyStore) Update(ctx context.Context, id string, mutate func(*store.Job) error) (*store.Job, error) {
	s.mu.Lock()
	fail := s.failUpdates == id
	s.mu.Unlock()
	if fail {
		return nil, errDiskFull
	}
	return s.Store.Update(ctx, id, mutate)
}

func newFlakyFixture(t *testing.T, route Route) (*fixture, *flakyStore) {
	t.Helper()
	real, err := store.Open(filepath.Join(t.TempDir(), "progress.db"), store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	st := &flakyStore{Store: real, finishCalls: make(chan struct{}, 1)}
	e := New(st, nil, nil, nil)
	route.Engine = e
	route.Init()
	api := &API{Engine: e, Heartbeat: 50 * time.Millisecond}
	api.Init()
	t.Cleanup(func() {
		e.Close()
		real.Close()
	})
	return &fixture{st: st, engine: e, route: &route, api: api}, st
}

func (f *fixture) finished(t *testing.T, id string) *store.Job {
	t.Helper()
	waitDone(t, f.st, id)
	job, err := f.st.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	return job
}

// TestFinishRetriedUntilStored: a job whose end the store refuses (the disk is full) does not
// stay running: the end is recorded once the store takes writes again. Its response was let go
// with the refused write, so it ends failed with result_unstorable.
func TestFinishRetriedUntilStored(t *testing.T) {
	f, st := newFlakyFixture(t, Route{})
	st.failFinishes.Store(2)
	w := f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusOK)
		w.Write([]byte("the report"))
		return nil
	})
	job := f.finished(t, docOf(t, w).ID)
	if job.State != store.Failed || job.Error == nil || job.Error.Code != CodeResultUnstorable {
		t.Fatalf("job ended %q with error %+v, want failed with %s", job.State, job.Error, CodeResultUnstorable)
	}
	if n := st.failFinishes.Load(); n != -1 {
		t.Fatalf("Finish refused %d more times than it was called", n+1)
	}
	if res := f.call(t, "GET", "/_jobs/"+job.ID+"/result", nil); res.Code != http.StatusBadGateway {
		t.Fatalf("result: %d %s, want 502", res.Code, res.Body)
	}
}

// TestQueuedJobEndsWhenStartCannotBeRecorded: a queued job whose turn comes while the store
// refuses writes ends failed with store_unavailable; it neither stays queued for ever nor runs
// without its record saying so.
func TestQueuedJobEndsWhenStartCannotBeRecorded(t *testing.T) {
	f, st := newFlakyFixture(t, Route{Concurrency: 1})
	_, release := f.startHeld(t)
	var ran atomic.Bool
	w := f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		ran.Store(true)
		return nil
	})
	queued := docOf(t, w)
	if queued.State != store.Queued {
		t.Fatalf("second job on a concurrency-1 route is %q, want queued", queued.State)
	}
	st.mu.Lock()
	st.failUpdates = queued.ID
	st.mu.Unlock()
	close(release)
	job := f.finished(t, queued.ID)
	if job.State != store.Failed || job.Error == nil || job.Error.Code != CodeStoreUnavailable {
		t.Fatalf("job ended %q with error %+v, want failed with %s", job.State, job.Error, CodeStoreUnavailable)
	}
	if ran.Load() {
		t.Fatal("the job ran although its start was never recorded")
	}
}

// TestCloseEndsFinishRetries: closing the engine does not wait for a store that never takes
// the end of a job (the next start records it as interrupted).
func TestCloseEndsFinishRetries(t *testing.T) {
	f, st := newFlakyFixture(t, Route{})
	st.failFinishes.Store(1 << 40)
	f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error { return nil })
	for range 2 { // refused once, and tried again
		select {
		case <-st.finishCalls:
		case <-time.After(10 * time.Second):
			t.Fatal("Finish was not called twice within 10s")
		}
	}
	closed := make(chan struct{})
	go func() {
		f.engine.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Engine.Close did not return within 10s while a job's end was being retried")
	}
}
