// Package storetest is the conformance suite of store.Store: the behaviour every
// implementation must show, run against each of them (the bbolt store in package store, the
// Redis store in store/redisstore), so that the interface is proven rather than assumed.
//
// What is particular to one implementation (files on disk, crash recovery of a file, Redis
// keys) is tested beside it.
package storetest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddy-progress/progress/store"
)

// Backend is an implementation under test.
type Backend struct {
	// New makes fresh, empty storage for one test and returns a function that opens a store
	// on it. The function is called again after the store is closed, to reopen the same
	// storage.
	New func(t *testing.T) func(opts store.Options) (store.Store, error)
	// Shared says several stores may be open on one storage at once (several Caddy
	// instances sharing jobs); the suite then also runs its multi-instance tests.
	Shared bool
}

// Run runs the suite, each test on fresh storage.
func Run(t *testing.T, b Backend) {
	tests := []struct {
		name string
		fn   func(t *testing.T, open opener)
	}{
		{"Lifecycle", testLifecycle},
		{"LargeResult", testLargeResult},
		{"ResultLimit", testResultLimit},
		{"EventAndDataLimits", testEventAndDataLimits},
		{"IdempotencyKey", testIdempotencyKey},
		{"OwnerHash", testOwnerHash},
		{"List", testList},
		{"MalformedIDs", testMalformedIDs},
		{"ConcurrentChanges", testConcurrentChanges},
		{"SeamUnderConcurrentWriters", testSeam},
		{"SlowSubscriberGetsLatest", testSlowSubscriber},
		{"SubscribeEdges", testSubscribeEdges},
		{"Wait", testWait},
		{"DeleteEndsWatchers", testDeleteEndsWatchers},
		{"CloseEndsWatchers", testCloseEndsWatchers},
		{"RouteDurations", testRouteDurations},
		{"SecretKept", testSecretKept},
		{"JobsAlwaysEnd", testJobsAlwaysEnd},
		{"Retention", testRetention},
	}
	if b.Shared {
		tests = append(tests, []struct {
			name string
			fn   func(t *testing.T, open opener)
		}{
			{"SharedWriters", testSharedWriters},
			{"SharedSubscribers", testSharedSubscribers},
		}...)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, opener{t: t, open: b.New(t)})
		})
	}
}

// opener opens stores on one test's storage; each is closed when the test ends.
type opener struct {
	t    *testing.T
	open func(opts store.Options) (store.Store, error)
}

func (o opener) store(opts store.Options) store.Store {
	o.t.Helper()
	s, err := o.open(opts)
	if err != nil {
		o.t.Fatal(err)
	}
	o.t.Cleanup(func() { s.Close() })
	return s
}

var bg = context.Background()

func newJob(t testing.TB, s store.Store) *store.Job {
	t.Helper()
	j, created, err := s.Create(bg, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/reports"}})
	if err != nil || !created {
		t.Fatalf("Create: %v created=%v", err, created)
	}
	return j
}

func percent(p float64) func(*store.Job) error {
	return func(j *store.Job) error {
		j.State = store.Running
		j.Progress = &store.Progress{Percent: &p}
		return nil
	}
}

// finishWith ends a job as succeeded with body as its result.
func finishWith(t testing.TB, s store.Store, id string, body []byte) *store.Job {
	t.Helper()
	rw, err := s.NewResult(bg, id)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rw.Write(body); err != nil {
		t.Fatal(err)
	}
	j, err := s.Finish(bg, id, store.Outcome{State: store.Succeeded, Response: &store.ResponseHead{Status: 200}, Body: rw})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

func readResult(t testing.TB, s store.Store, id string) (*store.Result, []byte) {
	t.Helper()
	res, err := s.Result(bg, id)
	if err != nil {
		t.Fatalf("Result(%s): %v", id, err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatalf("reading the result of %s: %v", id, err)
	}
	return res, body
}

// checkEvents checks that a job's stored events run 1..seq, the last one done when the job
// has finished, each one line of JSON whose seq is the event's.
func checkEvents(t testing.TB, s store.Store, id string) []store.Event {
	t.Helper()
	j, err := s.Get(bg, id)
	if err != nil {
		t.Fatal(err)
	}
	evs, err := s.Events(bg, id, 0, 100000)
	if err != nil || uint64(len(evs)) != j.Seq {
		t.Fatalf("job %s at seq %d has %d events: %v", id, j.Seq, len(evs), err)
	}
	for i, ev := range evs {
		var doc store.Job
		if err := json.Unmarshal(ev.Data, &doc); err != nil {
			t.Fatal(err)
		}
		last := i == len(evs)-1
		if ev.Seq != uint64(i+1) || doc.Seq != ev.Seq || ev.JobID != id || ev.Done() != (last && j.State.Terminal()) {
			t.Fatalf("job %s event %d: seq %d doc seq %d kind %s", id, i, ev.Seq, doc.Seq, ev.Kind)
		}
		if bytes.ContainsAny(ev.Data, "\r\n") {
			t.Fatalf("event %d is not one line: %q", i, ev.Data)
		}
		if last && doc.State != j.State {
			t.Fatalf("job %s: last event in state %s, document in %s", id, doc.State, j.State)
		}
	}
	return evs
}

func testLifecycle(t *testing.T, o opener) {
	s := o.store(store.Options{})
	j := newJob(t, s)
	if j.State != store.Queued || j.Seq != 1 || !store.ValidID(j.ID) {
		t.Fatalf("new job: %+v", j)
	}
	if j.Links.Self != "/_jobs/"+j.ID || j.Links.Events != "/_jobs/"+j.ID+"/events" {
		t.Fatalf("links: %+v", j.Links)
	}
	if got, err := s.Get(bg, j.ID); err != nil || got.Seq != 1 || got.Request.URI != "/reports" {
		t.Fatalf("Get: %+v %v", got, err)
	}
	for i := 1; i <= 3; i++ {
		u, err := s.Update(bg, j.ID, percent(float64(i*25)))
		if err != nil {
			t.Fatal(err)
		}
		if u.Seq != uint64(i+1) || u.StartedAt == nil || u.State != store.Running {
			t.Fatalf("update %d: seq %d started %v", i, u.Seq, u.StartedAt)
		}
	}
	if u, err := s.Update(bg, j.ID, func(*store.Job) error { return store.ErrNoChange }); err != nil || u.Seq != 4 {
		t.Fatalf("ErrNoChange: %+v %v", u, err)
	}
	rw, err := s.NewResult(bg, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(rw, "hello, result")
	done, err := s.Finish(bg, j.ID, store.Outcome{State: store.Succeeded, Response: &store.ResponseHead{Status: 201, Header: http.Header{
		"Content-Type": {"text/plain"}, "X-Up": {"1"}, "Authorization": {"Bearer leaked"},
	}}, Body: rw})
	if err != nil {
		t.Fatal(err)
	}
	rw.Discard() // after Finish: does nothing
	if done.State != store.Succeeded || done.Seq != 5 || done.FinishedAt == nil || done.ExpiresAt == nil ||
		done.Response == nil || done.Response.Status != 201 || done.Response.ContentLength != 13 || done.Response.ContentType != "text/plain" {
		t.Fatalf("finished job: %+v", done)
	}
	if _, err := s.Update(bg, j.ID, percent(99)); !errors.Is(err, store.ErrFinished) {
		t.Fatalf("update after finish: %v, want ErrFinished", err)
	}
	if _, err := s.Finish(bg, j.ID, store.Outcome{State: store.Failed}); !errors.Is(err, store.ErrFinished) {
		t.Fatalf("finish after finish: %v, want ErrFinished", err)
	}
	if _, changed, err := s.Cancel(bg, j.ID); err != nil || changed {
		t.Fatalf("cancel after finish: changed=%v err=%v", changed, err)
	}
	res, body := readResult(t, s, j.ID)
	if res.Status != 201 || string(body) != "hello, result" || res.Size != 13 || res.Header.Get("X-Up") != "1" || res.Header.Get("Authorization") != "" {
		t.Fatalf("result: %d %q %v", res.Status, body, res.Header)
	}
	checkEvents(t, s, j.ID)
	if err := s.Delete(bg, j.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(bg, j.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if _, err := s.Events(bg, j.ID, 0, 10); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("events after delete: %v", err)
	}
	if _, err := s.Result(bg, j.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("result after delete: %v", err)
	}
	if err := s.Delete(bg, j.ID); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}
	// Refused outcomes change nothing.
	k := newJob(t, s)
	for _, out := range []store.Outcome{
		{State: store.Running},
		{State: store.Succeeded, Response: &store.ResponseHead{Status: 42}},
	} {
		if _, err := s.Finish(bg, k.ID, out); !errors.Is(err, store.ErrInvalid) {
			t.Fatalf("Finish(%+v): %v, want ErrInvalid", out, err)
		}
	}
	if _, err := s.Update(bg, k.ID, func(j *store.Job) error { j.State = "paused"; return nil }); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("unknown state: %v", err)
	}
	if got, _ := s.Get(bg, k.ID); got.Seq != 1 {
		t.Fatalf("refused changes moved the job to seq %d", got.Seq)
	}
	if f, err := s.Finish(bg, k.ID, store.Outcome{State: store.Failed, Error: &store.JobError{Code: "upstream_error", Message: "boom"}}); err != nil ||
		f.Error == nil || f.Error.Code != "upstream_error" || f.Response != nil {
		t.Fatalf("finish without a response: %+v %v", f, err)
	}
	if _, err := s.Result(bg, k.ID); !errors.Is(err, store.ErrNoResult) {
		t.Fatalf("result of a job without one: %v", err)
	}
}

// testLargeResult streams a 4 MiB body in 64 KiB writes and replays it byte for byte; a second
// Finish neither succeeds nor touches it.
func testLargeResult(t *testing.T, o opener) {
	s := o.store(store.Options{})
	j := newJob(t, s)
	rw, err := s.NewResult(bg, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.New()
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	for i := range 64 {                                     // 4 MiB
		chunk[0], chunk[len(chunk)-1] = byte(i), byte(255-i)
		if _, err := rw.Write(chunk); err != nil {
			t.Fatal(err)
		}
		want.Write(chunk)
	}
	if _, err := s.Finish(bg, j.ID, store.Outcome{State: store.Succeeded, Response: &store.ResponseHead{Status: 200}, Body: rw}); err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		res, err := s.Result(bg, j.ID)
		if err != nil {
			t.Fatal(err)
		}
		got := sha256.New()
		n, err := io.Copy(got, res.Body)
		res.Body.Close()
		if err != nil || n != 64*65536 || res.Size != n || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
			t.Fatalf("replayed %d bytes (size %d, %v), checksum match %v", n, res.Size, err, bytes.Equal(got.Sum(nil), want.Sum(nil)))
		}
	}
	check()
	rw2, _ := s.NewResult(bg, j.ID)
	rw2.Write(bytes.Repeat([]byte{'x'}, 700<<10))
	if _, err := s.Finish(bg, j.ID, store.Outcome{State: store.Failed, Response: &store.ResponseHead{Status: 500}, Body: rw2}); !errors.Is(err, store.ErrFinished) {
		t.Fatalf("second finish: %v", err)
	}
	check()
}

func testResultLimit(t *testing.T, o opener) {
	s := o.store(store.Options{MaxResultSize: 10000})
	j := newJob(t, s)
	rw, _ := s.NewResult(bg, j.ID)
	if _, err := rw.Write(make([]byte, 6000)); err != nil {
		t.Fatal(err)
	}
	_, err := rw.Write(make([]byte, 6000))
	var le *store.LimitError
	if !errors.As(err, &le) || le.Limit != "max_result_size" || !errors.Is(err, store.ErrTooLarge) {
		t.Fatalf("write past the limit: %v", err)
	}
	if !strings.Contains(err.Error(), "max_result_size") {
		t.Fatalf("message does not name the option: %v", err)
	}
	rw.Discard()
	f, err := s.Finish(bg, j.ID, store.Outcome{State: store.Failed, Error: &store.JobError{Code: store.CodeResultTooLarge, Message: err.Error()}})
	if err != nil || f.Error.Code != store.CodeResultTooLarge || f.Response != nil {
		t.Fatalf("finish too large: %+v %v", f, err)
	}
	if _, err := s.Result(bg, j.ID); !errors.Is(err, store.ErrNoResult) {
		t.Fatalf("result of a job without one: %v", err)
	}
}

func testEventAndDataLimits(t *testing.T, o opener) {
	s := o.store(store.Options{MaxEventSize: 2048, MaxDataSize: 256})
	j := newJob(t, s)
	_, err := s.Update(bg, j.ID, func(j *store.Job) error {
		j.Progress = &store.Progress{Data: json.RawMessage(`"` + strings.Repeat("d", 300) + `"`)}
		return nil
	})
	var le *store.LimitError
	if !errors.As(err, &le) || le.Limit != "max_data_size" {
		t.Fatalf("oversized data: %v", err)
	}
	_, err = s.Update(bg, j.ID, func(j *store.Job) error {
		j.Progress = &store.Progress{Message: strings.Repeat("m", 3000)}
		return nil
	})
	if !errors.As(err, &le) || le.Limit != "max_event_size" {
		t.Fatalf("oversized event: %v", err)
	}
	_, err = s.Update(bg, j.ID, func(j *store.Job) error {
		j.Progress = &store.Progress{Data: json.RawMessage(`{not json`)}
		return nil
	})
	if !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("malformed data: %v", err)
	}
	if got, _ := s.Get(bg, j.ID); got.Seq != 1 || got.Progress != nil {
		t.Fatalf("after refused updates: %+v", got)
	}
	checkEvents(t, s, j.ID)
}

func testIdempotencyKey(t *testing.T, o opener) {
	s := o.store(store.Options{})
	spec := store.NewJob{Owner: "alice", IdempotencyKey: "k1", Fingerprint: []byte("POST /a body1"), Request: store.RequestInfo{Method: "POST", URI: "/a"}}
	first, created, err := s.Create(bg, spec)
	if err != nil || !created {
		t.Fatal(err, created)
	}
	again, created, err := s.Create(bg, spec)
	if err != nil || created || again.ID != first.ID {
		t.Fatalf("same key: %v created=%v id %s vs %s", err, created, again.ID, first.ID)
	}
	other := spec
	other.Fingerprint = []byte("POST /a body2")
	if _, _, err := s.Create(bg, other); !errors.Is(err, store.ErrIdempotencyMismatch) {
		t.Fatalf("same key, other request: %v", err)
	}
	bob := spec
	bob.Owner = "bob"
	b, created, err := s.Create(bg, bob)
	if err != nil || !created || b.ID == first.ID {
		t.Fatalf("same key, other owner: %v created=%v", err, created)
	}
	// Finished, the job still answers for its key; once deleted, the key is free again.
	if _, _, err := s.Cancel(bg, first.ID); err != nil {
		t.Fatal(err)
	}
	if again, created, err := s.Create(bg, spec); err != nil || created || again.ID != first.ID || again.State != store.Canceled {
		t.Fatalf("same key, finished job: %v created=%v", err, created)
	}
	if err := s.Delete(bg, first.ID); err != nil {
		t.Fatal(err)
	}
	if j, created, err := s.Create(bg, spec); err != nil || !created || j.ID == first.ID {
		t.Fatalf("key after delete: %v created=%v", err, created)
	}
	// Concurrent creations with one key make one job.
	race := store.NewJob{Owner: "carol", IdempotencyKey: "k2", Request: store.RequestInfo{Method: "POST", URI: "/a"}}
	ids := make(chan string, 8)
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			j, _, err := s.Create(bg, race)
			if err != nil {
				t.Error(err)
				return
			}
			ids <- j.ID
		})
	}
	wg.Wait()
	close(ids)
	seen := map[string]bool{}
	for id := range ids {
		seen[id] = true
	}
	if len(seen) != 1 {
		t.Fatalf("8 concurrent creations with one key made %d jobs", len(seen))
	}
}

func testOwnerHash(t *testing.T, o opener) {
	s := o.store(store.Options{})
	secret := "Bearer very-secret-token-1234"
	j, _, err := s.Create(bg, store.NewJob{Owner: secret, Request: store.RequestInfo{Method: "GET", URI: "/x"}})
	if err != nil {
		t.Fatal(err)
	}
	if !j.OwnedBy(s.OwnerHash(secret)) || j.OwnedBy(s.OwnerHash("Bearer other")) {
		t.Fatal("OwnedBy does not tell owners apart")
	}
	if got, _ := s.Get(bg, j.ID); !got.OwnedBy(s.OwnerHash(secret)) {
		t.Fatal("the stored job lost its owner")
	}
	if bytes.Contains(s.OwnerHash(secret), []byte("secret")) || len(s.OwnerHash(secret)) != 32 {
		t.Fatalf("owner hash %x", s.OwnerHash(secret))
	}
}

func testList(t *testing.T, o opener) {
	s := o.store(store.Options{})
	var alice []string
	for i := range 7 {
		j, _, err := s.Create(bg, store.NewJob{Owner: "alice", Request: store.RequestInfo{Method: "GET", URI: "/a"}})
		if err != nil {
			t.Fatal(err)
		}
		alice = append(alice, j.ID)
		if i%2 == 0 {
			if _, _, err := s.Cancel(bg, j.ID); err != nil {
				t.Fatal(err)
			}
		}
	}
	newJob(t, s) // someone else's
	owner := "alice"
	var got []string
	cursor := ""
	for pages := 0; ; pages++ {
		page, err := s.List(bg, store.ListQuery{Owner: &owner, Limit: 3, Cursor: cursor})
		if err != nil {
			t.Fatal(err)
		}
		if len(page.Jobs) > 3 {
			t.Fatalf("page of %d jobs, limit 3", len(page.Jobs))
		}
		for _, j := range page.Jobs {
			got = append(got, j.ID)
		}
		if page.Next == "" {
			break
		}
		cursor = page.Next
		if pages > 5 {
			t.Fatal("paging does not end")
		}
	}
	if len(got) != 7 {
		t.Fatalf("listed %d of alice's 7 jobs", len(got))
	}
	for i := range got {
		if got[i] != alice[6-i] {
			t.Fatalf("order: got %v, want newest first of %v", got, alice)
		}
	}
	page, err := s.List(bg, store.ListQuery{Owner: &owner, State: store.Canceled})
	if err != nil || len(page.Jobs) != 4 {
		t.Fatalf("alice's canceled: %d %v", len(page.Jobs), err)
	}
	for _, j := range page.Jobs {
		if j.State != store.Canceled {
			t.Fatalf("state filter let through %s", j.State)
		}
	}
	if page, err := s.List(bg, store.ListQuery{Owner: &owner, State: store.Queued}); err != nil || len(page.Jobs) != 3 {
		t.Fatalf("alice's queued: %d %v", len(page.Jobs), err)
	}
	all, err := s.List(bg, store.ListQuery{Limit: 5})
	if err != nil || len(all.Jobs) != 5 || all.Next == "" {
		t.Fatalf("all, page 1: %d next %q %v", len(all.Jobs), all.Next, err)
	}
	rest, err := s.List(bg, store.ListQuery{Limit: 5, Cursor: all.Next})
	if err != nil || len(rest.Jobs) != 3 || rest.Next != "" {
		t.Fatalf("all, page 2: %d next %q %v", len(rest.Jobs), rest.Next, err)
	}
	seen := map[string]bool{}
	for _, j := range append(all.Jobs, rest.Jobs...) {
		if seen[j.ID] {
			t.Fatalf("job %s listed twice", j.ID)
		}
		seen[j.ID] = true
	}
	if _, err := s.List(bg, store.ListQuery{Cursor: "!!"}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("bad cursor: %v", err)
	}
	if _, err := s.List(bg, store.ListQuery{State: "paused"}); !errors.Is(err, store.ErrInvalid) {
		t.Fatalf("bad state: %v", err)
	}
	// A deleted job leaves the listings.
	if err := s.Delete(bg, alice[6]); err != nil {
		t.Fatal(err)
	}
	if page, err := s.List(bg, store.ListQuery{Owner: &owner}); err != nil || len(page.Jobs) != 6 || page.Jobs[0].ID != alice[5] {
		t.Fatalf("after delete: %d %v", len(page.Jobs), err)
	}
}

func testMalformedIDs(t *testing.T, o opener) {
	s := o.store(store.Options{})
	for _, id := range []string{"", "x", strings.Repeat("A", 31), strings.Repeat("A", 33), strings.Repeat("A", 31) + "/", "../../../../etc/passwd", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA*"} {
		if _, err := s.Get(bg, id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Get(%q): %v", id, err)
		}
		if _, err := s.Result(bg, id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Result(%q): %v", id, err)
		}
		if _, err := s.NewResult(bg, id); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("NewResult(%q): %v", id, err)
		}
		if _, err := s.Subscribe(bg, id, 0); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Subscribe(%q): %v", id, err)
		}
		if _, err := s.Update(bg, id, percent(1)); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("Update(%q): %v", id, err)
		}
	}
	// A well-formed id of no job: the body is taken, then refused at Finish.
	gone := strings.Repeat("A", 32)
	if _, err := s.Get(bg, gone); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Get of no job: %v", err)
	}
	rw, err := s.NewResult(bg, gone)
	if err != nil {
		t.Fatal(err)
	}
	rw.Write(make([]byte, 1<<20))
	if _, err := s.Finish(bg, gone, store.Outcome{State: store.Succeeded, Response: &store.ResponseHead{Status: 200}, Body: rw}); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("Finish of no job: %v", err)
	}
	for name, err := range map[string]error{
		"Update": func() error { _, err := s.Update(bg, gone, percent(1)); return err }(),
		"Cancel": func() error { _, _, err := s.Cancel(bg, gone); return err }(),
		"Delete": s.Delete(bg, gone),
		"Events": func() error { _, err := s.Events(bg, gone, 0, 1); return err }(),
		"Wait":   func() error { _, err := s.Wait(bg, gone, 0); return err }(),
		"Result": func() error { _, err := s.Result(bg, gone); return err }(),
	} {
		if !errors.Is(err, store.ErrNotFound) {
			t.Errorf("%s of no job: %v", name, err)
		}
	}
}

// testConcurrentChanges: concurrent updates, a cancel and, for half the jobs, a delete. Every
// surviving job's events must run 1, 2, … with no gap, and its stored document must be its
// newest event's.
func testConcurrentChanges(t *testing.T, o opener) {
	s := o.store(store.Options{})
	concurrentChanges(t, []store.Store{s})
}

func concurrentChanges(t *testing.T, stores []store.Store) {
	const (
		jobs        = 12
		writersEach = 4
		updatesEach = 25
	)
	ids := make([]string, jobs)
	var wg sync.WaitGroup
	for n := range jobs {
		ids[n] = newJob(t, stores[n%len(stores)]).ID
		for w := range writersEach + 2 {
			s := stores[(n+w)%len(stores)]
			wg.Go(func() {
				switch {
				case w < writersEach:
					for i := range updatesEach {
						_, err := s.Update(bg, ids[n], percent(float64(i)))
						if err != nil && !errors.Is(err, store.ErrFinished) && !errors.Is(err, store.ErrNotFound) {
							t.Error(err)
							return
						}
					}
				case w == writersEach:
					if _, _, err := s.Cancel(bg, ids[n]); err != nil && !errors.Is(err, store.ErrNotFound) {
						t.Error(err)
					}
				case n%2 == 0:
					if err := s.Delete(bg, ids[n]); err != nil {
						t.Error(err)
					}
				}
			})
		}
	}
	wg.Wait()
	for n, id := range ids {
		for _, s := range stores {
			j, err := s.Get(bg, id)
			if n%2 == 0 {
				if !errors.Is(err, store.ErrNotFound) {
					t.Fatalf("deleted job %s: %v", id, err)
				}
				continue
			}
			if err != nil || j.State != store.Canceled {
				t.Fatalf("job %s: %v, state %v", id, err, j)
			}
			evs := checkEvents(t, s, id)
			var last store.Job
			if err := json.Unmarshal(evs[len(evs)-1].Data, &last); err != nil || last.Seq != j.Seq {
				t.Fatalf("job %s: last event %s: %v", id, evs[len(evs)-1].Data, err)
			}
		}
	}
}

// follow reads a subscription to its end and returns the seqs it saw, failing the test on any
// error, on a seq that does not increase, or on an end that is not a done event.
func follow(t *testing.T, sub store.Subscription, timeout time.Duration) []uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(bg, timeout)
	defer cancel()
	var seqs []uint64
	var last store.Event
	for {
		ev, err := sub.Next(ctx)
		if err == io.EOF {
			if !last.Done() {
				t.Errorf("stream ended after seq %d without a done event", last.Seq)
			}
			return seqs
		}
		if err != nil {
			t.Errorf("Next after seq %d: %v", last.Seq, err)
			return seqs
		}
		if ev.Seq <= last.Seq {
			t.Errorf("seq %d after seq %d", ev.Seq, last.Seq)
		}
		seqs = append(seqs, ev.Seq)
		last = ev
	}
}

// testSeam subscribes at random moments and from random seqs while many writers change many
// jobs. With a live ring larger than any job's log nobody can fall behind, so every subscriber
// must see every seq after the one it subscribed from, exactly once, and end on done. With a
// tiny ring, subscribers may skip ahead but must still only ever see seq increase and end on
// done.
func testSeam(t *testing.T, o opener) {
	for _, tc := range []struct {
		name       string
		liveEvents int
		exact      bool
	}{
		{"no-skipping", 1 << 16, true},
		{"tiny-ring", 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := o.store(store.Options{LiveEvents: tc.liveEvents})
			seam(t, []store.Store{s}, tc.exact)
			s.Close()
		})
	}
}

func seam(t *testing.T, stores []store.Store, exact bool) {
	const (
		jobs        = 6
		writersEach = 3
		updatesEach = 30
		subsEach    = 8
	)
	rng := rand.New(rand.NewPCG(1, 2))
	var wg sync.WaitGroup
	for n := range jobs {
		job := newJob(t, stores[n%len(stores)])
		var writers sync.WaitGroup
		for w := range writersEach {
			s := stores[(n+w)%len(stores)]
			writers.Go(func() {
				for i := range updatesEach {
					if _, err := s.Update(bg, job.ID, percent(float64(i))); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		final := uint64(1 + writersEach*updatesEach + 1)
		for k := range subsEach {
			s := stores[(n+k+1)%len(stores)]
			after := uint64(rng.IntN(int(final)))
			yieldFirst := rng.IntN(3)
			wg.Go(func() {
				for range yieldFirst * 10 {
					// Subscribe at a different point of the write stream each time.
					if _, err := s.Get(bg, job.ID); err != nil {
						t.Error(err)
					}
				}
				sub, err := s.Subscribe(bg, job.ID, after)
				if err != nil {
					t.Error(err)
					return
				}
				defer sub.Close()
				seqs := follow(t, sub, 60*time.Second)
				if len(seqs) == 0 || seqs[len(seqs)-1] != final {
					t.Errorf("subscriber from %d ended at %v, want %d", after, seqs[max(0, len(seqs)-1):], final)
					return
				}
				if !exact {
					return
				}
				// A cursor past the job's seq at subscription time follows from that seq
				// instead, so the first event is at most after+1.
				if seqs[0] > after+1 {
					t.Errorf("subscriber from %d started at %d: gap", after, seqs[0])
				}
				for i, seq := range seqs {
					if seq != seqs[0]+uint64(i) {
						t.Errorf("subscriber from %d: seq %d at position %d: gap or duplicate", after, seq, i)
						return
					}
				}
			})
		}
		wg.Go(func() {
			writers.Wait()
			if _, _, err := stores[0].Cancel(bg, job.ID); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
}

// forceLive drains a subscription's stored log so that it follows the live tail, as far as an
// implementation that checks the context before reading lets it: what the callers check holds
// whether or not the subscription got there.
func forceLive(t *testing.T, sub store.Subscription) {
	t.Helper()
	ctx, cancel := context.WithCancel(bg)
	cancel()
	for range 100000 {
		if _, err := sub.Next(ctx); errors.Is(err, context.Canceled) {
			return
		} else if err != nil {
			t.Fatal(err)
		}
	}
	t.Fatal("the stored log does not end")
}

// testSlowSubscriber: a subscriber that stops reading costs the writer nothing and, when it
// reads again, is handed the newest document, not a queue of stale ones: from the live ring
// (8 events) if it had reached it, from the compacted log (10 events) if not.
func testSlowSubscriber(t *testing.T, o opener) {
	s := o.store(store.Options{LiveEvents: 8, MaxEventsPerJob: 10})
	job := newJob(t, s)
	stalled, err := s.Subscribe(bg, job.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	forceLive(t, stalled)
	for i := range 300 {
		if _, err := s.Update(bg, job.ID, percent(float64(i)/5)); err != nil {
			t.Fatal(err)
		}
	}
	// The live tail may deliver asynchronously: wait (bounded) until the newest is there.
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	var ev store.Event
	skipped := 0
	for ev.Seq < 301 {
		ev, err = stalled.Next(ctx)
		if err != nil {
			t.Fatalf("stalled subscriber after seq %d: %v", ev.Seq, err)
		}
		skipped++
	}
	if ev.Seq != 301 || skipped > 8+1 {
		t.Fatalf("stalled subscriber read %d events to reach seq %d, want the newest (301) within the ring of 8", skipped, ev.Seq)
	}
	if _, _, err := s.Cancel(bg, job.ID); err != nil {
		t.Fatal(err)
	}
	if ev, err := stalled.Next(ctx); err != nil || !ev.Done() || ev.Seq != 302 {
		t.Fatalf("after cancel: %+v %v", ev, err)
	}
	if _, err := stalled.Next(ctx); err != io.EOF {
		t.Fatalf("after done: %v, want io.EOF", err)
	}
}

func testSubscribeEdges(t *testing.T, o opener) {
	s := o.store(store.Options{MaxEventsPerJob: 10})
	job := newJob(t, s)
	for i := range 30 {
		if _, err := s.Update(bg, job.ID, percent(float64(i))); err != nil {
			t.Fatal(err)
		}
	}
	// Events 1..21 are compacted away: a reader from 5 gets the current document alone.
	evs, err := s.Events(bg, job.ID, 5, 100)
	if err != nil || len(evs) != 1 || evs[0].Seq != 31 {
		t.Fatalf("compacted replay: %d events (%v)", len(evs), err)
	}
	evs, err = s.Events(bg, job.ID, 25, 100)
	if err != nil || len(evs) != 6 || evs[0].Seq != 26 {
		t.Fatalf("replay within the kept log: %d events (%v)", len(evs), err)
	}
	if evs, err := s.Events(bg, job.ID, 25, 2); err != nil || len(evs) != 2 || evs[1].Seq != 27 {
		t.Fatalf("replay with a limit: %d events (%v)", len(evs), err)
	}
	if evs, err := s.Events(bg, job.ID, 31, 100); err != nil || len(evs) != 0 {
		t.Fatalf("replay after the newest: %d events (%v)", len(evs), err)
	}
	if _, _, err := s.Cancel(bg, job.ID); err != nil {
		t.Fatal(err)
	}
	sub, err := s.Subscribe(bg, job.ID, 5)
	if err != nil {
		t.Fatal(err)
	}
	if seqs := follow(t, sub, 10*time.Second); len(seqs) != 1 || seqs[0] != 32 {
		t.Fatalf("compacted subscription saw %v, want [32]", seqs)
	}
	sub.Close()
	// A client that has seen done: nothing more.
	for _, after := range []uint64{32, 1000} {
		sub, err = s.Subscribe(bg, job.ID, after)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sub.Next(bg); err != io.EOF {
			t.Fatalf("subscribe after done (from %d): %v, want io.EOF", after, err)
		}
		sub.Close()
	}
}

func testWait(t *testing.T, o opener) {
	s := o.store(store.Options{})
	job := newJob(t, s)
	if ev, err := s.Wait(bg, job.ID, 0); err != nil || ev.Seq != 1 {
		t.Fatalf("wait on an older seq: %+v %v", ev, err)
	}
	woke := make(chan store.Event, 1)
	go func() {
		ev, err := s.Wait(bg, job.ID, 1)
		if err != nil {
			t.Error(err)
		}
		woke <- ev
	}()
	if _, err := s.Update(bg, job.ID, percent(10)); err != nil {
		t.Fatal(err)
	}
	if ev := <-woke; ev.Seq != 2 {
		t.Fatalf("waiter woke with seq %d, want 2", ev.Seq)
	}
	if _, _, err := s.Cancel(bg, job.ID); err != nil {
		t.Fatal(err)
	}
	if ev, err := s.Wait(bg, job.ID, 2); err != nil || ev.Seq != 3 || !ev.Done() {
		t.Fatalf("wait past the done event: %+v %v", ev, err)
	}
	// A finished job makes the waiter wait its time out in full.
	short, cancel := context.WithTimeout(bg, 50*time.Millisecond)
	defer cancel()
	if _, err := s.Wait(short, job.ID, 3); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait on a finished job: %v", err)
	}
}

func testDeleteEndsWatchers(t *testing.T, o opener) {
	s := o.store(store.Options{})
	doomed := newJob(t, s)
	sub, err := s.Subscribe(bg, doomed.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	forceLive(t, sub)
	if err := s.Delete(bg, doomed.ID); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	if _, err := sub.Next(ctx); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("subscriber of a deleted job: %v", err)
	}
}

func testCloseEndsWatchers(t *testing.T, o opener) {
	s := o.store(store.Options{})
	alive := newJob(t, s)
	live, err := s.Subscribe(bg, alive.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	forceLive(t, live)
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	wg.Go(func() {
		_, err := live.Next(bg)
		errs <- err
	})
	waiting := make(chan struct{})
	wg.Go(func() {
		close(waiting)
		_, err := s.Wait(bg, alive.ID, 1)
		errs <- err
	})
	<-waiting
	s.Close()
	wg.Wait()
	close(errs)
	for err := range errs {
		// A waiter that had not yet watched when the store closed finds it closed too.
		if !errors.Is(err, store.ErrClosed) {
			t.Fatalf("watcher after close: %v, want ErrClosed", err)
		}
	}
	if _, _, err := s.Create(bg, store.NewJob{Request: store.RequestInfo{Method: "GET"}}); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("create after close: %v", err)
	}
	if _, err := s.Get(bg, alive.ID); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("get after close: %v", err)
	}
	if _, err := s.Subscribe(bg, alive.ID, 0); !errors.Is(err, store.ErrClosed) {
		t.Fatalf("subscribe after close: %v", err)
	}
}

func testRouteDurations(t *testing.T, o opener) {
	s, err := o.open(store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ds, err := s.RouteDurations(bg, "POST /reports/*"); err != nil || len(ds) != 0 {
		t.Fatalf("a route never saved: %v %v", ds, err)
	}
	var many []time.Duration
	for i := range store.MaxRouteDurations + 10 {
		many = append(many, time.Duration(i+1)*time.Second)
	}
	if err := s.SaveRouteDurations(bg, "POST /reports/*", many); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveRouteDurations(bg, "GET /reports/*", []time.Duration{time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", strings.Repeat("x", 513)} {
		if err := s.SaveRouteDurations(bg, bad, many); !errors.Is(err, store.ErrInvalid) {
			t.Errorf("route name of %d bytes: %v, want ErrInvalid", len(bad), err)
		}
	}
	s.Close()
	// Kept across a restart: the newest MaxRouteDurations, oldest first, routes apart.
	s = o.store(store.Options{})
	ds, err := s.RouteDurations(bg, "POST /reports/*")
	if err != nil || len(ds) != store.MaxRouteDurations || ds[0] != 11*time.Second || ds[len(ds)-1] != time.Duration(store.MaxRouteDurations+10)*time.Second {
		t.Fatalf("after reopening: %d durations %v..., %v", len(ds), ds[:min(3, len(ds))], err)
	}
	if ds, _ := s.RouteDurations(bg, "GET /reports/*"); len(ds) != 1 || ds[0] != time.Millisecond {
		t.Fatalf("the other route: %v", ds)
	}
}

// testSecretKept: the secret is 32 bytes, the same after reopening, and so are owner hashes
// and the jobs (a finished job survives the restart).
func testSecretKept(t *testing.T, o opener) {
	s, err := o.open(store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	secret, hash := s.Secret(), s.OwnerHash("alice")
	if len(secret) != 32 || bytes.Equal(secret, make([]byte, 32)) {
		t.Fatalf("secret %x", secret)
	}
	j := newJob(t, s)
	finishWith(t, s, j.ID, []byte("kept"))
	s.Close()
	s = o.store(store.Options{})
	if !bytes.Equal(s.Secret(), secret) || !bytes.Equal(s.OwnerHash("alice"), hash) {
		t.Fatal("secret or owner hash changed on reopening")
	}
	if _, body := readResult(t, s, j.ID); string(body) != "kept" {
		t.Fatalf("result after reopening: %q", body)
	}
	checkEvents(t, s, j.ID)
}

// testJobsAlwaysEnd: a job whose document sits at the event limit can still be canceled and
// finished; what it said of its progress is dropped, a long message cut.
func testJobsAlwaysEnd(t *testing.T, o opener) {
	s := o.store(store.Options{})
	fill := func(j *store.Job) error {
		j.State = store.Running
		j.Progress = &store.Progress{Message: strings.Repeat("m", store.DefaultMaxEventSize-1000)}
		return nil
	}
	var ids []string
	for range 2 {
		j := newJob(t, s)
		if _, err := s.Update(bg, j.ID, fill); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.ID)
	}
	if j, _, err := s.Cancel(bg, ids[0]); err != nil || j.State != store.Canceled {
		t.Fatalf("cancel a full job: %v", err)
	}
	if j, err := s.Finish(bg, ids[1], store.Outcome{State: store.Failed, Error: &store.JobError{Code: "upstream_timeout", Message: strings.Repeat("e", 100000)}}); err != nil ||
		j.State != store.Failed || len(j.Error.Message) > 1024+len("…") {
		t.Fatalf("finish a full job with a long error: %v", err)
	}
}

// testRetention: finished jobs go, with their events and results, once retention ends;
// unfinished ones stay.
func testRetention(t *testing.T, o opener) {
	s := o.store(store.Options{Retain: 300 * time.Millisecond, SweepInterval: 50 * time.Millisecond})
	var finished []string
	for i := range 5 {
		j := newJob(t, s)
		finishWith(t, s, j.ID, []byte(fmt.Sprintf("a body, number %d", i)))
		finished = append(finished, j.ID)
	}
	running := newJob(t, s)
	if _, err := s.Update(bg, running.ID, percent(1)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for _, id := range finished {
		for {
			_, err := s.Get(bg, id)
			if errors.Is(err, store.ErrNotFound) {
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			if time.Now().After(deadline) {
				t.Fatalf("job %s still there 30 s after its retention of 300 ms", id)
			}
			time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
		}
		if _, err := s.Events(bg, id, 0, 10); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("events of an expired job: %v", err)
		}
		if _, err := s.Result(bg, id); !errors.Is(err, store.ErrNotFound) {
			t.Fatalf("result of an expired job: %v", err)
		}
	}
	if j, err := s.Get(bg, running.ID); err != nil || j.State != store.Running {
		t.Fatalf("a running job was swept: %v", err)
	}
	if page, err := s.List(bg, store.ListQuery{}); err != nil || len(page.Jobs) != 1 || page.Jobs[0].ID != running.ID {
		t.Fatalf("listing after retention: %d jobs, %v", len(page.Jobs), err)
	}
}

// testSharedWriters: two stores on one storage (two instances) change the same jobs at once;
// seqs stay contiguous and both see the same jobs.
func testSharedWriters(t *testing.T, o opener) {
	a, b := o.store(store.Options{}), o.store(store.Options{})
	if !bytes.Equal(a.Secret(), b.Secret()) {
		t.Fatal("two instances have different secrets: callback tokens would not verify across them")
	}
	if !bytes.Equal(a.OwnerHash("alice"), b.OwnerHash("alice")) {
		t.Fatal("two instances hash owners differently")
	}
	concurrentChanges(t, []store.Store{a, b})
}

// testSharedSubscribers: subscribers on either instance see every change made on either, in
// order, with no gap or duplicate.
func testSharedSubscribers(t *testing.T, o opener) {
	a, b := o.store(store.Options{LiveEvents: 1 << 16}), o.store(store.Options{LiveEvents: 1 << 16})
	seam(t, []store.Store{a, b}, true)
	// A waiter on b wakes for a change made on a; a deletion on a ends b's subscribers.
	job := newJob(t, a)
	woke := make(chan store.Event, 1)
	go func() {
		ev, err := b.Wait(bg, job.ID, 1)
		if err != nil {
			t.Error(err)
		}
		woke <- ev
	}()
	if _, err := a.Update(bg, job.ID, percent(5)); err != nil {
		t.Fatal(err)
	}
	if ev := <-woke; ev.Seq != 2 {
		t.Fatalf("waiter on the other instance woke with seq %d", ev.Seq)
	}
	sub, err := b.Subscribe(bg, job.ID, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	forceLive(t, sub)
	if err := a.Delete(bg, job.ID); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(bg, 30*time.Second)
	defer cancel()
	if _, err := sub.Next(ctx); !errors.Is(err, store.ErrNotFound) {
		t.Fatalf("subscriber on the other instance of a deleted job: %v", err)
	}
}
