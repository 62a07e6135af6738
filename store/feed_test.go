package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"
)

// follow reads a subscription to its end and returns the seqs it saw, failing the test on any
// error, on a seq that does not increase, or on an end that is not a done event.
func follow(t *testing.T, sub Subscription, timeout time.Duration) []uint64 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var seqs []uint64
	var last Event
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

// TestSeamUnderConcurrentWriters subscribes at random moments and from random seqs while many
// writers change many jobs. With a live ring larger than any job's log nobody can fall behind,
// so every subscriber must see every seq after the one it subscribed from, exactly once, and
// end on done. With a tiny ring, subscribers may skip ahead but must still only ever see seq
// increase and end on done.
func TestSeamUnderConcurrentWriters(t *testing.T) {
	for _, tc := range []struct {
		name       string
		liveEvents int
		exact      bool
	}{
		{"no-skipping", 1 << 16, true},
		{"tiny-ring", 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := openTest(t, Options{LiveEvents: tc.liveEvents})
			ctx := context.Background()
			const (
				jobs        = 8
				writersEach = 4
				updatesEach = 40
				subsEach    = 12
			)
			rng := rand.New(rand.NewPCG(1, 2))
			var wg sync.WaitGroup
			for range jobs {
				job := newJob(t, s)
				var writers sync.WaitGroup
				for range writersEach {
					writers.Add(1)
					go func() {
						defer writers.Done()
						for i := range updatesEach {
							if _, err := s.Update(ctx, job.ID, percent(float64(i))); err != nil {
								t.Error(err)
								return
							}
						}
					}()
				}
				final := uint64(1 + writersEach*updatesEach + 1)
				for range subsEach {
					after := uint64(rng.IntN(int(final)))
					yieldFirst := rng.IntN(3)
					wg.Add(1)
					go func() {
						defer wg.Done()
						for range yieldFirst * 20 {
							// Subscribe at a different point of the write stream each time.
							if _, err := s.Get(ctx, job.ID); err != nil {
								t.Error(err)
							}
						}
						sub, err := s.Subscribe(ctx, job.ID, after)
						if err != nil {
							t.Error(err)
							return
						}
						defer sub.Close()
						seqs := follow(t, sub, 30*time.Second)
						if len(seqs) == 0 || seqs[len(seqs)-1] != final {
							t.Errorf("subscriber from %d ended at %v, want %d", after, seqs[max(0, len(seqs)-1):], final)
							return
						}
						if !tc.exact {
							return
						}
						// A cursor past the job's seq at subscription time follows from that
						// seq instead, so the first event is at most after+1.
						if seqs[0] > after+1 {
							t.Errorf("subscriber from %d started at %d: gap", after, seqs[0])
						}
						for i, seq := range seqs {
							if seq != seqs[0]+uint64(i) {
								t.Errorf("subscriber from %d: seq %d at position %d: gap or duplicate", after, seq, i)
								return
							}
						}
					}()
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					writers.Wait()
					if _, _, err := s.Cancel(ctx, job.ID); err != nil {
						t.Error(err)
					}
				}()
			}
			wg.Wait()
		})
	}
}

// forceLive drains a subscription's stored log so that it follows the live ring.
func forceLive(t *testing.T, sub Subscription) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for {
		if _, err := sub.Next(ctx); errors.Is(err, context.Canceled) {
			return
		} else if err != nil {
			t.Fatal(err)
		}
	}
}

// TestSlowSubscriberGetsLatest: a subscriber that stops reading costs the publisher nothing
// and, when it reads again, is handed the newest document, not a queue of stale ones.
func TestSlowSubscriberGetsLatest(t *testing.T) {
	s := openTest(t, Options{LiveEvents: 8})
	ctx := context.Background()
	job := newJob(t, s)
	stalled, err := s.Subscribe(ctx, job.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer stalled.Close()
	forceLive(t, stalled)
	for i := range 500 {
		if _, err := s.Update(ctx, job.ID, percent(float64(i)/5)); err != nil {
			t.Fatal(err)
		}
	}
	ev, err := stalled.Next(ctx)
	if err != nil || ev.Seq != 501 {
		t.Fatalf("stalled subscriber got seq %d (%v), want the newest, 501", ev.Seq, err)
	}
	if _, _, err := s.Cancel(ctx, job.ID); err != nil {
		t.Fatal(err)
	}
	if ev, err := stalled.Next(ctx); err != nil || !ev.Done() || ev.Seq != 502 {
		t.Fatalf("after cancel: %+v %v", ev, err)
	}
	if _, err := stalled.Next(ctx); err != io.EOF {
		t.Fatalf("after done: %v, want io.EOF", err)
	}
}

func TestSubscribeEdges(t *testing.T) {
	s := openTest(t, Options{MaxEventsPerJob: 10})
	ctx := context.Background()
	job := newJob(t, s)
	for i := range 30 {
		if _, err := s.Update(ctx, job.ID, percent(float64(i))); err != nil {
			t.Fatal(err)
		}
	}
	// Events 1..21 are compacted away: a reader from 5 gets the current document alone.
	evs, err := s.Events(ctx, job.ID, 5, 100)
	if err != nil || len(evs) != 1 || evs[0].Seq != 31 {
		t.Fatalf("compacted replay: %d events (%v)", len(evs), err)
	}
	evs, err = s.Events(ctx, job.ID, 25, 100)
	if err != nil || len(evs) != 6 || evs[0].Seq != 26 {
		t.Fatalf("replay within the kept log: %d events (%v)", len(evs), err)
	}
	if _, _, err := s.Cancel(ctx, job.ID); err != nil {
		t.Fatal(err)
	}
	sub, err := s.Subscribe(ctx, job.ID, 5)
	if err != nil {
		t.Fatal(err)
	}
	if seqs := follow(t, sub, 10*time.Second); len(seqs) != 1 || seqs[0] != 32 {
		t.Fatalf("compacted subscription saw %v, want [32]", seqs)
	}
	sub.Close()
	// A client that has seen done: nothing more.
	for _, after := range []uint64{32, 1000} {
		sub, err = s.Subscribe(ctx, job.ID, after)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := sub.Next(ctx); err != io.EOF {
			t.Fatalf("subscribe after done (from %d): %v, want io.EOF", after, err)
		}
		sub.Close()
	}
	if _, err := s.Subscribe(ctx, "nope", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown job: %v", err)
	}
}

func TestWait(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	job := newJob(t, s)
	if ev, err := s.Wait(ctx, job.ID, 0); err != nil || ev.Seq != 1 {
		t.Fatalf("wait on an older seq: %+v %v", ev, err)
	}
	woke := make(chan Event, 1)
	go func() {
		ev, err := s.Wait(ctx, job.ID, 1)
		if err != nil {
			t.Error(err)
		}
		woke <- ev
	}()
	if _, err := s.Update(ctx, job.ID, percent(10)); err != nil {
		t.Fatal(err)
	}
	if ev := <-woke; ev.Seq != 2 {
		t.Fatalf("waiter woke with seq %d, want 2", ev.Seq)
	}
	if _, _, err := s.Cancel(ctx, job.ID); err != nil {
		t.Fatal(err)
	}
	// A finished job makes the waiter wait its time out in full.
	short, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := s.Wait(short, job.ID, 3); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait on a finished job: %v", err)
	}
	if _, err := s.Wait(ctx, "AAAAAAAAAAAAAAAAAAAAAA", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("wait on an unknown job: %v", err)
	}
}

func TestDeleteAndCloseEndWatchers(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	doomed := newJob(t, s)
	sub, err := s.Subscribe(ctx, doomed.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	forceLive(t, sub)
	if err := s.Delete(ctx, doomed.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.Next(ctx); !errors.Is(err, ErrNotFound) {
		t.Fatalf("subscriber of a deleted job: %v", err)
	}
	if err := s.Delete(ctx, doomed.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second delete: %v", err)
	}

	alive := newJob(t, s)
	var wg sync.WaitGroup
	errs := make(chan error, 2)
	live, err := s.Subscribe(ctx, alive.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer live.Close()
	forceLive(t, live)
	wg.Add(2)
	go func() {
		defer wg.Done()
		_, err := live.Next(ctx)
		errs <- err
	}()
	waiting := make(chan struct{})
	go func() {
		defer wg.Done()
		close(waiting)
		_, err := s.Wait(ctx, alive.ID, 1)
		errs <- err
	}()
	<-waiting
	s.Close()
	wg.Wait()
	close(errs)
	for err := range errs {
		// A waiter that had not yet watched when the store closed finds it closed too.
		if !errors.Is(err, ErrClosed) {
			t.Fatalf("watcher after close: %v, want ErrClosed", err)
		}
	}
	if _, _, err := s.Create(ctx, NewJob{Request: RequestInfo{Method: "GET"}}); !errors.Is(err, ErrClosed) {
		t.Fatalf("create after close: %v", err)
	}
}

func TestRecoveryEndsInterruptedJobs(t *testing.T) {
	dir := t.TempDir()
	path := dir + "/progress.db"
	s, err := openBolt(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	queued := newJob(t, s)
	running := newJob(t, s)
	if _, err := s.Update(ctx, running.ID, percent(50)); err != nil {
		t.Fatal(err)
	}
	finished := newJob(t, s)
	if _, _, err := s.Cancel(ctx, finished.ID); err != nil {
		t.Fatal(err)
	}
	// The spool of a Finish that crashed before its commit, a file trashed by a delete that
	// committed, the spool of a refused Finish, and a stray file.
	for _, name := range []string{running.ID + "-123", trashPrefix + finished.ID + "-456", finished.ID + "-789", "half-written"} {
		if err := writeFile(s.resultsDir+"/"+name, "orphan"); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()

	s, err = openBolt(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, id := range []string{queued.ID, running.ID} {
		j, err := s.Get(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		if j.State != Failed || j.Error == nil || j.Error.Code != CodeInterrupted || j.ExpiresAt == nil {
			t.Fatalf("recovered job: %+v", j)
		}
		evs, err := s.Events(ctx, id, j.Seq-1, 10)
		if err != nil || len(evs) != 1 || !evs[0].Done() {
			t.Fatalf("recovered job's last event: %+v %v", evs, err)
		}
	}
	if j, _ := s.Get(ctx, finished.ID); j.State != Canceled || j.Seq != 2 {
		t.Fatalf("a finished job was touched by recovery: %+v", j)
	}
	entries, _ := readDirNames(s.resultsDir)
	if len(entries) != 0 {
		t.Fatalf("results folder after recovery: %v", entries)
	}
}

func TestRetention(t *testing.T) {
	s := openTest(t, Options{Retain: time.Hour, InlineResultSize: 16})
	ctx := context.Background()
	var finished []string
	for i := range sweepBatch*2 + 5 {
		j := newJob(t, s)
		rw, _ := s.NewResult(ctx, j.ID)
		fmt.Fprintf(rw, "a body longer than sixteen bytes, number %d", i)
		if _, err := s.Finish(ctx, j.ID, Outcome{State: Succeeded, Response: &ResponseHead{Status: 200}, Body: rw}); err != nil {
			t.Fatal(err)
		}
		finished = append(finished, j.ID)
	}
	running := newJob(t, s)
	if _, err := s.Update(ctx, running.ID, percent(1)); err != nil {
		t.Fatal(err)
	}
	if n, err := s.sweep(time.Now().Add(30*time.Minute), nil); err != nil || n != 0 {
		t.Fatalf("sweep before retention ends: %d %v", n, err)
	}
	n, err := s.sweep(time.Now().Add(61*time.Minute), nil)
	if err != nil || n != len(finished) {
		t.Fatalf("swept %d of %d (%v)", n, len(finished), err)
	}
	for _, id := range finished {
		if _, err := s.Get(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Fatalf("expired job %s: %v", id, err)
		}
	}
	if j, err := s.Get(ctx, running.ID); err != nil || j.State != Running {
		t.Fatalf("a running job was swept: %v", err)
	}
	if err := s.Delete(ctx, running.ID); err != nil {
		t.Fatal(err)
	}
	assertEmpty(t, s)
}

func TestSecondOpenerFailsWithinTimeout(t *testing.T) {
	s := openTest(t, Options{})
	start := time.Now()
	_, err := openBolt(s.path, Options{OpenTimeout: 200 * time.Millisecond})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second opener: %v, want ErrLocked", err)
	}
	if elapsed := time.Since(start); elapsed > 5*time.Second {
		t.Fatalf("second opener gave up after %s", elapsed)
	}
	if want := s.path; !containsAll(err.Error(), want, "another") {
		t.Fatalf("error does not say which file or why: %v", err)
	}
}

// TestSeamWhenRingOverflowsDuringReplay drives the feed directly: while the subscriber reads
// the stored log, more events are committed and published than the ring holds. The
// subscriber must go back to the stored log rather than skip them, because it never fell
// behind the live tail: it had not reached it yet.
func TestSeamWhenRingOverflowsDuringReplay(t *testing.T) {
	f := newFeed(4)
	topic, err := f.watch("job")
	if err != nil {
		t.Fatal(err)
	}
	ev := func(seq uint64, kind EventKind) Event {
		return Event{JobID: "job", Seq: seq, Kind: kind, Data: []byte("{}")}
	}
	var log []Event
	commit := func(seq uint64, kind EventKind) {
		log = append(log, ev(seq, kind))
		f.publish(ev(seq, kind))
	}
	for seq := uint64(1); seq <= 5; seq++ {
		log = append(log, ev(seq, KindProgress)) // committed before the subscriber watched
	}
	loads := 0
	load := func(_ context.Context, after uint64, limit int) ([]Event, error) {
		loads++
		var out []Event
		for _, e := range log {
			if e.Seq > after && len(out) < limit {
				out = append(out, e)
			}
		}
		if loads == 2 {
			// The second read saw the log up to seq 5 (a snapshot, like a read transaction);
			// before the subscriber looks at the ring, 15 more events land, more than the
			// ring holds.
			for seq := uint64(6); seq <= 19; seq++ {
				commit(seq, KindProgress)
			}
			commit(20, KindDone)
		}
		return out, nil
	}
	sub := newSubscription(f, topic, "job", 0, load)
	defer sub.Close()
	seqs := follow(t, sub, 5*time.Second)
	for i, seq := range seqs {
		if seq != uint64(i+1) {
			t.Fatalf("saw %v: gap at the seam", seqs)
		}
	}
	if len(seqs) != 20 {
		t.Fatalf("saw %v, want 1..20", seqs)
	}
}

// TestOpenSettlesInterruptedFileMoves: a crash between a commit and the rename that follows it,
// or between a delete's move of the file and its commit, is finished or undone by Open.
func TestOpenSettlesResultFiles(t *testing.T) {
	path := t.TempDir() + "/progress.db"
	s, err := openBolt(path, Options{InlineResultSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	finish := func() string {
		j := newJob(t, s)
		rw, _ := s.NewResult(ctx, j.ID)
		io.WriteString(rw, "a body that goes to a file")
		if _, err := s.Finish(ctx, j.ID, Outcome{State: Succeeded, Response: &ResponseHead{Status: 200}, Body: rw}); err != nil {
			t.Fatal(err)
		}
		return j.ID
	}
	kept, lostDelete := finish(), finish()
	// As if a delete moved the file and died before its commit, and as if a second Finish of
	// the same job died after spooling its body.
	if _, err := s.trashResult(resultFile(t, s, lostDelete)); err != nil {
		t.Fatal(err)
	}
	if err := writeFile(s.resultsDir+"/"+kept+"-42", "refused"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	s, err = openBolt(path, Options{InlineResultSize: 8})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, id := range []string{kept, lostDelete} {
		res, err := s.Result(ctx, id)
		if err != nil {
			t.Fatalf("result of %s after reopen: %v", id, err)
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if string(body) != "a body that goes to a file" {
			t.Fatalf("result of %s after reopen: %q", id, body)
		}
	}
	if names, _ := readDirNames(s.resultsDir); len(names) != 2 {
		t.Fatalf("results folder after reopen: %v", names)
	}
}

// TestJobsAlwaysEnd: a job whose document sits at the event limit (or a limit lowered since)
// can still be canceled, finished and recovered; what it said of its progress is dropped.
func TestJobsAlwaysEnd(t *testing.T) {
	path := t.TempDir() + "/progress.db"
	s, err := openBolt(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	fill := func(j *Job) error {
		j.State = Running
		j.Progress = &Progress{Message: strings.Repeat("m", DefaultMaxEventSize-1000)}
		return nil
	}
	var ids []string
	for range 3 {
		j := newJob(t, s)
		if _, err := s.Update(ctx, j.ID, fill); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, j.ID)
	}
	if j, _, err := s.Cancel(ctx, ids[0]); err != nil || j.State != Canceled {
		t.Fatalf("cancel a full job: %v", err)
	}
	if j, err := s.Finish(ctx, ids[1], Outcome{State: Failed, Error: &JobError{Code: "upstream_timeout", Message: strings.Repeat("e", 100000)}}); err != nil ||
		j.State != Failed || len(j.Error.Message) > keptOnTrim+len("…") {
		t.Fatalf("finish a full job with a long error: %v", err)
	}
	s.Close()
	s, err = openBolt(path, Options{MaxEventSize: 4096})
	if err != nil {
		t.Fatalf("reopen with a lower limit and a full running job: %v", err)
	}
	defer s.Close()
	if j, err := s.Get(ctx, ids[2]); err != nil || j.State != Failed || j.Error.Code != CodeInterrupted {
		t.Fatalf("recovered full job: %+v %v", j, err)
	}
}

// TestSubscriptionPollAndReady: Poll hands out what is there without waiting, says so when
// nothing is, and Ready is signalled by the next change, which Poll then returns; after the
// done event Poll reports io.EOF.
func TestSubscriptionPollAndReady(t *testing.T) {
	s := openTest(t, Options{})
	ctx := context.Background()
	job := newJob(t, s)
	sub, err := s.Subscribe(ctx, job.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if ev, ok, err := sub.Poll(ctx); !ok || err != nil || ev.Seq != 1 {
		t.Fatalf("first Poll: %+v %v %v, want seq 1", ev, ok, err)
	}
	if ev, ok, err := sub.Poll(ctx); ok || err != nil {
		t.Fatalf("Poll with nothing new: %+v %v %v, want none", ev, ok, err)
	}
	if _, err := s.Update(ctx, job.ID, percent(10)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sub.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("Ready was not signalled by an update")
	}
	if ev, ok, err := sub.Poll(ctx); !ok || err != nil || ev.Seq != 2 {
		t.Fatalf("Poll after the update: %+v %v %v, want seq 2", ev, ok, err)
	}
	if _, _, err := s.Cancel(ctx, job.ID); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sub.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("Ready was not signalled by the cancel")
	}
	if ev, ok, err := sub.Poll(ctx); !ok || err != nil || !ev.Done() {
		t.Fatalf("Poll after cancel: %+v %v %v, want the done event", ev, ok, err)
	}
	if _, _, err := sub.Poll(ctx); err != io.EOF {
		t.Fatalf("Poll after done: %v, want io.EOF", err)
	}
}
