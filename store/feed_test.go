package store

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
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

// memLog is a job's stored log in memory, for driving a feed directly: load reads it as
// Store.Events would and counts the reads; commit appends and publishes, as a store's commit
// does.
type memLog struct {
	feed      *feed
	events    []Event
	reads     int
	afterRead func(reads int) // called at the end of every read, with the count so far
}

func (l *memLog) event(seq uint64, kind EventKind) Event {
	return Event{JobID: "job", Seq: seq, Kind: kind, Data: []byte("{}")}
}

// store appends an event committed before anyone watched: it is not published.
func (l *memLog) store(seq uint64, kind EventKind) { l.events = append(l.events, l.event(seq, kind)) }

func (l *memLog) commit(seq uint64, kind EventKind) {
	l.store(seq, kind)
	l.feed.publish(l.event(seq, kind))
}

func (l *memLog) load(_ context.Context, after uint64, limit int) ([]Event, error) {
	l.reads++
	var out []Event
	for _, e := range l.events {
		if e.Seq > after && len(out) < limit {
			out = append(out, e)
		}
	}
	if l.afterRead != nil {
		l.afterRead(l.reads)
	}
	return out, nil
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
	log := &memLog{feed: f}
	for seq := uint64(1); seq <= 5; seq++ {
		log.store(seq, KindProgress) // committed before the subscriber watched
	}
	log.afterRead = func(reads int) {
		if reads == 2 {
			// The second read saw the log up to seq 5 (a snapshot, like a read transaction);
			// before the subscriber looks at the ring, 15 more events land, more than the
			// ring holds.
			for seq := uint64(6); seq <= 19; seq++ {
				log.commit(seq, KindProgress)
			}
			log.commit(20, KindDone)
		}
	}
	load := log.load
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

// TestSubscriptionGoesLiveWithoutEmptyRead: a subscriber that reads each event only after the
// next one is committed always finds the stored log one event ahead. It must switch to the
// topic once the topic holds what follows, not keep reading the log (an XRANGE per event on
// Redis) until a read finds nothing.
func TestSubscriptionGoesLiveWithoutEmptyRead(t *testing.T) {
	f := newFeed(4)
	topic, err := f.watch("job")
	if err != nil {
		t.Fatal(err)
	}
	log := &memLog{feed: f}
	log.store(1, KindProgress) // before the watch
	load := log.load
	sub := newSubscription(f, topic, "job", 0, load)
	defer sub.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	log.commit(2, KindProgress)
	for seq := uint64(1); seq <= 10; seq++ {
		ev, err := sub.Next(ctx)
		if err != nil || ev.Seq != seq {
			t.Fatalf("Next = seq %d, %v; want seq %d", ev.Seq, err, seq)
		}
		switch {
		case seq < 8:
			log.commit(seq+2, KindProgress) // the next but one, before this event is read
		case seq == 8:
			log.commit(10, KindDone)
		}
	}
	if _, err := sub.Next(ctx); err != io.EOF {
		t.Errorf("Next after done = %v, want io.EOF", err)
	}
	if log.reads != 1 {
		t.Errorf("%d reads of the stored log, want 1 (the first): the subscription did not go live", log.reads)
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
