package store

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// openTest opens a store in a fresh folder and closes it when the test ends.
func openTest(t testing.TB, opts Options) *boltStore {
	t.Helper()
	s, err := openBolt(filepath.Join(t.TempDir(), "progress.db"), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func newJob(t testing.TB, s Store) *Job {
	t.Helper()
	j, created, err := s.Create(context.Background(), NewJob{Request: RequestInfo{Method: "POST", URI: "/reports"}})
	if err != nil || !created {
		t.Fatalf("Create: %v created=%v", err, created)
	}
	return j
}

// resultFile is the name of the file holding job id's result body, from its record.
func resultFile(t testing.TB, s *boltStore, id string) string {
	t.Helper()
	rid, _ := parseID(id)
	var head resultHead
	err := s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketResults).Get(rid[:])
		if v == nil {
			return ErrNoResult
		}
		var err error
		head, _, err = decodeResult(v)
		return err
	})
	if err != nil || head.File == "" {
		t.Fatalf("result file of %s: %v (record %+v)", id, err, head)
	}
	return head.File
}

func percent(p float64) func(*Job) error {
	return func(j *Job) error {
		j.State = Running
		j.Progress = &Progress{Percent: &p}
		return nil
	}
}

func TestJobLifecycle(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	j := newJob(t, s)
	if j.State != Queued || j.Seq != 1 || len(j.ID) != idTextLen {
		t.Fatalf("new job: %+v", j)
	}
	if j.Links.Self != "/_jobs/"+j.ID || j.Links.Events != "/_jobs/"+j.ID+"/events" {
		t.Fatalf("links: %+v", j.Links)
	}
	for i := 1; i <= 3; i++ {
		u, err := s.Update(ctx, j.ID, percent(float64(i*25)))
		if err != nil {
			t.Fatal(err)
		}
		if u.Seq != uint64(i+1) || u.StartedAt == nil {
			t.Fatalf("update %d: seq %d started %v", i, u.Seq, u.StartedAt)
		}
	}
	rw, err := s.NewResult(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(rw, "hello, result")
	done, err := s.Finish(ctx, j.ID, Outcome{State: Succeeded, Response: &ResponseHead{Status: 201, Header: http.Header{
		"Content-Type": {"text/plain"}, "X-Up": {"1"}, "Authorization": {"Bearer leaked"},
	}}, Body: rw})
	if err != nil {
		t.Fatal(err)
	}
	if done.State != Succeeded || done.Seq != 5 || done.FinishedAt == nil || done.ExpiresAt == nil ||
		done.Response == nil || done.Response.Status != 201 || done.Response.ContentLength != 13 || done.Response.ContentType != "text/plain" {
		t.Fatalf("finished job: %+v", done)
	}
	if _, err := s.Update(ctx, j.ID, percent(99)); !errors.Is(err, ErrFinished) {
		t.Fatalf("update after finish: %v, want ErrFinished", err)
	}
	if _, changed, err := s.Cancel(ctx, j.ID); err != nil || changed {
		t.Fatalf("cancel after finish: changed=%v err=%v", changed, err)
	}
	res, err := s.Result(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.Status != 201 || string(body) != "hello, result" || res.Header.Get("X-Up") != "1" || res.Header.Get("Authorization") != "" {
		t.Fatalf("result: %d %q %v", res.Status, body, res.Header)
	}
	evs, err := s.Events(ctx, j.ID, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	if len(evs) != 5 {
		t.Fatalf("%d events, want 5", len(evs))
	}
	for i, ev := range evs {
		var doc Job
		if err := json.Unmarshal(ev.Data, &doc); err != nil {
			t.Fatal(err)
		}
		if ev.Seq != uint64(i+1) || doc.Seq != ev.Seq || ev.Done() != (i == 4) {
			t.Fatalf("event %d: seq %d doc seq %d kind %s", i, ev.Seq, doc.Seq, ev.Kind)
		}
		if bytes.ContainsAny(ev.Data, "\r\n") {
			t.Fatalf("event %d is not one line: %q", i, ev.Data)
		}
	}
	if err := s.Delete(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, j.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get after delete: %v", err)
	}
	if _, err := s.Events(ctx, j.ID, 0, 10); !errors.Is(err, ErrNotFound) {
		t.Fatalf("events after delete: %v", err)
	}
	assertEmpty(t, s)
}

// assertEmpty checks that no key of any job is left in the file or the results folder.
func assertEmpty(t *testing.T, s *boltStore) {
	t.Helper()
	err := s.db.View(func(tx *bolt.Tx) error {
		for _, b := range allBuckets {
			if bytes.Equal(b, bucketMeta) {
				continue
			}
			if k, _ := tx.Bucket(b).Cursor().First(); k != nil {
				t.Errorf("bucket %s still holds %x", b, k)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	entries, _ := os.ReadDir(s.resultsDir)
	for _, e := range entries {
		t.Errorf("results folder still holds %s", e.Name())
	}
}

func TestLargeResultSpoolsToFile(t *testing.T) {
	s := openTest(t, Options{InlineResultSize: 1024})
	ctx := context.Background()
	j := newJob(t, s)
	rw, err := s.NewResult(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.New()
	chunk := bytes.Repeat([]byte("0123456789abcdef"), 4096) // 64 KiB
	for i := 0; i < 64; i++ {                               // 4 MiB
		chunk[0] = byte(i)
		rw.Write(chunk)
		want.Write(chunk)
	}
	if _, err := s.Finish(ctx, j.ID, Outcome{State: Succeeded, Response: &ResponseHead{Status: 200}, Body: rw}); err != nil {
		t.Fatal(err)
	}
	file := resultFile(t, s, j.ID)
	if _, err := os.Stat(s.resultPath(file)); err != nil {
		t.Fatalf("large result not in a file: %v", err)
	}
	res, err := s.Result(ctx, j.ID)
	if err != nil {
		t.Fatal(err)
	}
	got := sha256.New()
	n, _ := io.Copy(got, res.Body)
	res.Body.Close()
	if n != 64*65536 || res.Size != n || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
		t.Fatalf("replayed %d bytes (size %d), checksum match %v", n, res.Size, bytes.Equal(got.Sum(nil), want.Sum(nil)))
	}
	// A second Finish must neither succeed nor touch the committed body.
	rw2, _ := s.NewResult(ctx, j.ID)
	rw2.Write(bytes.Repeat([]byte{'x'}, 4096))
	if _, err := s.Finish(ctx, j.ID, Outcome{State: Failed, Response: &ResponseHead{Status: 500}, Body: rw2}); !errors.Is(err, ErrFinished) {
		t.Fatalf("second finish: %v", err)
	}
	if fi, err := os.Stat(s.resultPath(file)); err != nil || fi.Size() != n || resultFile(t, s, j.ID) != file {
		t.Fatalf("committed body after a refused finish: %v %v", fi, err)
	}
	if err := s.Delete(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	assertEmpty(t, s)
}

func TestResultLimit(t *testing.T) {
	s := openTest(t, Options{MaxResultSize: 10000, InlineResultSize: 100})
	ctx := context.Background()
	j := newJob(t, s)
	rw, _ := s.NewResult(ctx, j.ID)
	if _, err := rw.Write(make([]byte, 6000)); err != nil {
		t.Fatal(err)
	}
	_, err := rw.Write(make([]byte, 6000))
	var le *LimitError
	if !errors.As(err, &le) || le.Limit != "max_result_size" || !errors.Is(err, ErrTooLarge) {
		t.Fatalf("write past the limit: %v", err)
	}
	if !strings.Contains(err.Error(), "max_result_size") {
		t.Fatalf("message does not name the option: %v", err)
	}
	rw.Discard()
	f, err := s.Finish(ctx, j.ID, Outcome{State: Failed, Error: &JobError{Code: CodeResultTooLarge, Message: err.Error()}})
	if err != nil || f.Error.Code != CodeResultTooLarge || f.Response != nil {
		t.Fatalf("finish too large: %+v %v", f, err)
	}
	if _, err := s.Result(ctx, j.ID); !errors.Is(err, ErrNoResult) {
		t.Fatalf("result of a job without one: %v", err)
	}
	entries, _ := os.ReadDir(s.resultsDir)
	if len(entries) != 0 {
		t.Fatalf("discarded spool left %d files", len(entries))
	}
}

func TestOwnerHashNotOwner(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	secret := "Bearer very-secret-token-1234"
	j, _, err := s.Create(ctx, NewJob{Owner: secret, IdempotencyKey: "idem-secret-5678", Request: RequestInfo{Method: "GET", URI: "/x"}})
	if err != nil {
		t.Fatal(err)
	}
	if !j.OwnedBy(s.OwnerHash(secret)) || j.OwnedBy(s.OwnerHash("Bearer other")) {
		t.Fatal("OwnedBy does not tell owners apart")
	}
	s.Close()
	raw, err := os.ReadFile(s.path)
	if err != nil {
		t.Fatal(err)
	}
	for _, needle := range []string{"very-secret-token", "idem-secret"} {
		if bytes.Contains(raw, []byte(needle)) {
			t.Fatalf("store file holds %q in plain text", needle)
		}
	}
}

func TestMalformedIDsAreNotFound(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	for _, id := range []string{"", "x", strings.Repeat("A", 21), strings.Repeat("A", 23), "AAAAAAAAAAAAAAAAAAAAA/", "../../../../etc/passwd"} {
		if _, err := s.Get(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Errorf("Get(%q): %v", id, err)
		}
		if _, err := s.Result(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Errorf("Result(%q): %v", id, err)
		}
		if _, err := s.NewResult(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Errorf("NewResult(%q): %v", id, err)
		}
	}
	// A well-formed id of no job: the body is taken, then refused at Finish, and nothing stays.
	gone := idEncoding.EncodeToString(make([]byte, idLen))
	rw, err := s.NewResult(ctx, gone)
	if err != nil {
		t.Fatal(err)
	}
	rw.Write(make([]byte, 2*DefaultInlineResultSize))
	if _, err := s.Finish(ctx, gone, Outcome{State: Succeeded, Response: &ResponseHead{Status: 200}, Body: rw}); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Finish of no job: %v", err)
	}
	if names, _ := readDirNames(s.resultsDir); len(names) != 0 {
		t.Fatalf("results folder after a refused Finish: %v", names)
	}
}

// TestIDsFollowCreation checks what the write pattern relies on: ids of later jobs sort after
// earlier ones as raw keys, and each still carries at least 128 random bits.
func TestIDsFollowCreation(t *testing.T) {
	start := time.Date(2026, 11, 24, 14, 0, 0, 0, time.UTC)
	prev, _ := newID(start)
	for i := 1; i <= 1000; i++ {
		id, text := newID(start.Add(time.Duration(i) * time.Millisecond))
		if bytes.Compare(prev[:], id[:]) >= 0 {
			t.Fatalf("id %x of a later millisecond sorts before %x", id, prev)
		}
		if back, ok := parseID(text); !ok || back != id {
			t.Fatalf("%q does not parse back to %x", text, id)
		}
		prev = id
	}
	if idRandLen*8 < 128 {
		t.Fatalf("%d random bits", idRandLen*8)
	}
	a, _ := newID(start)
	b, _ := newID(start)
	if a == b {
		t.Fatal("two ids of the same millisecond are equal")
	}
}

// TestLiveChanges attacks the in-memory copies of unfinished jobs (live.go): concurrent
// updates, a cancel and, for half the jobs, a delete. Every surviving job's events must run
// 1, 2, … with no gap, its stored document must be its newest event's, and no finished or
// deleted job may stay in memory.
func TestLiveChanges(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	const (
		jobs        = 16
		writersEach = 4
		updatesEach = 30
	)
	ids := make([]string, jobs)
	var wg sync.WaitGroup
	for n := range jobs {
		ids[n] = newJob(t, s).ID
		for w := range writersEach + 2 {
			wg.Go(func() {
				switch {
				case w < writersEach:
					for i := range updatesEach {
						_, err := s.Update(ctx, ids[n], percent(float64(i)))
						if err != nil && !errors.Is(err, ErrFinished) && !errors.Is(err, ErrNotFound) {
							t.Error(err)
							return
						}
					}
				case w == writersEach:
					if _, _, err := s.Cancel(ctx, ids[n]); err != nil && !errors.Is(err, ErrNotFound) {
						t.Error(err)
					}
				case n%2 == 0:
					if err := s.Delete(ctx, ids[n]); err != nil {
						t.Error(err)
					}
				}
			})
		}
	}
	wg.Wait()
	for n, id := range ids {
		j, err := s.Get(ctx, id)
		if n%2 == 0 {
			if !errors.Is(err, ErrNotFound) {
				t.Fatalf("deleted job %s: %v", id, err)
			}
			continue
		}
		if err != nil || j.State != Canceled {
			t.Fatalf("job %s: %v, state %v", id, err, j)
		}
		evs, err := s.Events(ctx, id, 0, 1000)
		if err != nil || uint64(len(evs)) != j.Seq {
			t.Fatalf("job %s at seq %d has %d events: %v", id, j.Seq, len(evs), err)
		}
		for i, ev := range evs {
			if ev.Seq != uint64(i+1) {
				t.Fatalf("job %s: event %d has seq %d", id, i, ev.Seq)
			}
		}
		var last Job
		if err := json.Unmarshal(evs[len(evs)-1].Data, &last); err != nil || !evs[len(evs)-1].Done() || last.Seq != j.Seq || last.State != Canceled {
			t.Fatalf("job %s: last event %s: %v", id, evs[len(evs)-1].Data, err)
		}
	}
	// A repeated Idempotency-Key makes no live entry either.
	spec := NewJob{IdempotencyKey: "k", Request: RequestInfo{Method: "POST", URI: "/a"}}
	first, _, err := s.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	if _, created, err := s.Create(ctx, spec); err != nil || created {
		t.Fatalf("repeated key: %v created=%v", err, created)
	}
	if _, _, err := s.Cancel(ctx, first.ID); err != nil {
		t.Fatal(err)
	}
	if n := s.live.size(); n != 0 {
		t.Fatalf("%d jobs left in memory after all ended", n)
	}
}
