package engine

import (
	"context"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/caddy-progress/progress/store"
)

// countingStore counts the calls load makes to the store, to show that a job that does not
// exist and a job of someone else cost the same work.
type countingStore struct {
	store.Store
	gets, hashes int
}

func (c *countingStore) Get(ctx context.Context, id string) (*store.Job, error) {
	c.gets++
	return c.Store.Get(ctx, id)
}

func (c *countingStore) OwnerHash(owner string) []byte {
	c.hashes++
	return c.Store.OwnerHash(owner)
}

// TestForeignAndMissingJobDoTheSameWork: the 404 for "not yours" and "does not exist" comes
// after the same steps (one store read, one owner evaluation, one keyed hash), so neither its
// content nor the work behind it tells them apart. A timing assertion would be flaky on a
// shared machine; the steps are what make the times alike, so the steps are what is checked.
// (tests/e2e TestSecurityOwnerBinding records the times through the real Caddy.)
func TestForeignAndMissingJobDoTheSameWork(t *testing.T) {
	f := newFixture(t, Route{})
	cs := &countingStore{Store: f.st}
	f.engine.Store = cs
	evaluated := 0
	f.api.OwnerOf = func(r *http.Request, expr string) string {
		evaluated++
		return r.Header.Get("X-User")
	}
	job, _, err := f.st.Create(context.Background(), store.NewJob{
		Owner: "alice", Request: store.RequestInfo{Method: "GET", URI: "/x"},
		Attrs: map[string]string{AttrOwnerExpr: "{http.request.header.X-User}"},
	})
	if err != nil {
		t.Fatal(err)
	}
	// A well-formed id nobody was given: the job's own with its last character changed.
	last := job.ID[len(job.ID)-1]
	swap := byte('A')
	if last == 'A' {
		swap = 'B'
	}
	missing := job.ID[:len(job.ID)-1] + string(swap)

	type trace struct {
		gets, hashes, evaluated int
		err                     string
	}
	run := func(method, path string) trace {
		cs.gets, cs.hashes, evaluated = 0, 0, 0
		r := httptest.NewRequest(method, path, nil)
		r.Header.Set("X-User", "mallory")
		err := f.api.ServeHTTP(httptest.NewRecorder(), r)
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		return trace{cs.gets, cs.hashes, evaluated, msg}
	}
	for _, ep := range []struct{ method, suffix string }{
		{"GET", ""}, {"HEAD", ""}, {"DELETE", ""}, {"GET", "/events"}, {"GET", "/result"}, {"POST", "/cancel"},
	} {
		foreign := run(ep.method, "/_jobs/"+job.ID+ep.suffix)
		absent := run(ep.method, "/_jobs/"+missing+ep.suffix)
		if foreign.gets != 1 || foreign.hashes != 1 || foreign.evaluated != 1 {
			t.Errorf("%s %s, someone else's job: %+v, want one read, one hash, one owner evaluation", ep.method, ep.suffix, foreign)
		}
		if !reflect.DeepEqual(foreign, absent) {
			t.Errorf("%s %s: someone else's job %+v, a missing one %+v", ep.method, ep.suffix, foreign, absent)
		}
		if !strings.Contains(foreign.err, "No such job") {
			t.Errorf("%s %s: %q, want the not-found problem", ep.method, ep.suffix, foreign.err)
		}
	}
	// The owner still gets the job: the check above is not an API that refuses everyone.
	r := httptest.NewRequest("GET", "/_jobs/"+job.ID, nil)
	r.Header.Set("X-User", "alice")
	w := httptest.NewRecorder()
	if err := f.api.ServeHTTP(w, r); err != nil || w.Code != http.StatusOK {
		t.Fatalf("the owner: %v, status %d", err, w.Code)
	}
}
