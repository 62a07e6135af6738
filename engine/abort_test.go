package engine

import (
	"context"
	"net/http"
	"testing"

	"github.com/caddy-progress/progress/store"
)

// TestUpstreamAbortPanicEndsTheJob: Caddy's reverse_proxy aborts a response it cannot finish
// (the upstream broke off, or a write to the job's result failed) by panicking with
// http.ErrAbortHandler. net/http recovers that on its own goroutines; a job's handler runs on
// the engine's, where the panic used to end the whole process.
func TestUpstreamAbortPanicEndsTheJob(t *testing.T) {
	f := newFixture(t, Route{})
	w := f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusOK)
		w.Write([]byte("part of the body"))
		panic(http.ErrAbortHandler)
	})
	id := docOf(t, w).ID
	waitDone(t, f.st, id)
	job, err := f.st.Get(context.Background(), id)
	if err != nil {
		t.Fatal(err)
	}
	if job.State != store.Failed || job.Error == nil || job.Error.Code != "upstream_incomplete" {
		t.Fatalf("job ended %q with error %+v, want failed with upstream_incomplete", job.State, job.Error)
	}
	if res := f.call(t, "GET", "/_jobs/"+job.ID+"/result", nil); res.Code != http.StatusBadGateway {
		t.Fatalf("result of the aborted job: %d %s, want 502", res.Code, res.Body)
	}
}
