package store

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// openJournalTest opens a store whose checkpoints run only when a test asks (or the journal
// fills), so that the tests see changes that are in the journal and not yet in bbolt.
func openJournalTest(t *testing.T, path string, opts Options) *boltStore {
	t.Helper()
	if opts.CheckpointInterval == 0 {
		opts.CheckpointInterval = time.Hour
	}
	s, err := openBolt(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// abandon stops s as a crash would: no checkpoint, nothing written on the way out.
func abandon(s *boltStore) {
	close(s.stopSweep)
	s.sweeping.Wait()
	close(s.stopCheckpoints)
	s.checkpointing.Wait()
	s.journal.closeFiles()
	s.db.Close()
}

// inFile reads a job as bbolt has it, without the journal.
func inFile(t *testing.T, s *boltStore, id string) *Job {
	t.Helper()
	rid, _ := parseID(id)
	var j *Job
	if err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		j, err = s.loadJob(tx, rid)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return j
}

func runningJob(t *testing.T, s Store) *Job {
	t.Helper()
	j, created, err := s.Create(context.Background(), NewJob{Request: RequestInfo{Method: "POST", URI: "/reports"}, Running: true})
	if err != nil || !created {
		t.Fatalf("Create: %v created=%v", err, created)
	}
	return j
}

func report(t *testing.T, s Store, id string, message string) *Job {
	t.Helper()
	j, err := s.Update(context.Background(), id, func(j *Job) error {
		j.Progress = &Progress{Message: message}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// checkLog checks that a job's stored events are seq 1..last, with no gap, and that event
// seq n's document says message(n) where message is not nil.
func checkLog(t *testing.T, s Store, id string, last uint64, message func(seq uint64) string) {
	t.Helper()
	evs, err := s.Events(context.Background(), id, 0, 10000)
	if err != nil {
		t.Fatal(err)
	}
	if uint64(len(evs)) != last {
		t.Fatalf("%d events, want %d", len(evs), last)
	}
	for i, ev := range evs {
		if ev.Seq != uint64(i)+1 {
			t.Fatalf("event %d has seq %d", i, ev.Seq)
		}
		if message != nil {
			if want := message(ev.Seq); want != "" && !strings.Contains(string(ev.Data), `"message":"`+want+`"`) {
				t.Fatalf("event seq %d: %.200s…, want message %.40q…", ev.Seq, ev.Data, want)
			}
		}
	}
}

// TestJournalTakesProgress: progress of a running job is readable everywhere before any
// checkpoint while bbolt still has the version before it, and a checkpoint moves it to bbolt.
func TestJournalTakesProgress(t *testing.T) {
	ctx := context.Background()
	s := openJournalTest(t, filepath.Join(t.TempDir(), "progress.db"), Options{})
	defer s.Close()
	job := runningJob(t, s)
	for i := range 5 {
		report(t, s, job.ID, "step "+string(rune('a'+i)))
	}
	if got := inFile(t, s, job.ID).Seq; got != 1 {
		t.Fatalf("bbolt has seq %d before the checkpoint, want 1 (the reports went to bbolt, not the journal)", got)
	}
	if j, err := s.Get(ctx, job.ID); err != nil || j.Seq != 6 || j.Progress.Message != "step e" {
		t.Fatalf("Get: %+v %v", j, err)
	}
	// Get from the file, as a reader does while a change is in flight.
	rid, _ := parseID(job.ID)
	s.live.get(rid).committed.Store(nil)
	if j, err := s.Get(ctx, job.ID); err != nil || j.Seq != 6 {
		t.Fatalf("Get from the file: %+v %v", j, err)
	}
	checkLog(t, s, job.ID, 6, func(seq uint64) string {
		if seq == 1 {
			return ""
		}
		return "step " + string(rune('a'+seq-2))
	})
	if ev, err := s.Wait(ctx, job.ID, 4); err != nil || ev.Seq != 6 {
		t.Fatalf("Wait: %+v %v", ev, err)
	}
	page, err := s.List(ctx, ListQuery{})
	if err != nil || len(page.Jobs) != 1 || page.Jobs[0].Seq != 6 {
		t.Fatalf("List: %+v %v", page, err)
	}
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	if got := inFile(t, s, job.ID).Seq; got != 6 {
		t.Fatalf("bbolt has seq %d after the checkpoint, want 6", got)
	}
	if p := s.journal.pendingOf(rid); len(p) != 0 {
		t.Fatalf("%d changes still pending after the checkpoint", len(p))
	}
	checkLog(t, s, job.ID, 6, nil)
}

// TestJournalReplaysAfterCrash: reports only the journal had when the process died are in
// bbolt after the next Open, and the interrupted job ends on the newest of them.
func TestJournalReplaysAfterCrash(t *testing.T) {
	path := filepath.Join(t.TempDir(), "progress.db")
	s := openJournalTest(t, path, Options{})
	job := runningJob(t, s)
	for i := range 5 {
		report(t, s, job.ID, "step "+string(rune('a'+i)))
	}
	abandon(s)

	s = openJournalTest(t, path, Options{})
	defer s.Close()
	j := inFile(t, s, job.ID)
	if j.State != Failed || j.Error == nil || j.Error.Code != CodeInterrupted || j.Seq != 7 || j.Progress.Message != "step e" {
		t.Fatalf("after the crash: %+v", j)
	}
	checkLog(t, s, job.ID, 7, nil)
	// The replayed journal was emptied: a second restart replays nothing.
	for i := range 2 {
		if _, entries, err := openJournal(path+".probe", DefaultJournalSize, nil); err != nil || len(entries) != 0 {
			t.Fatalf("probe %d: %v %d", i, err, len(entries))
		}
	}
	rid, _ := parseID(job.ID)
	if p := s.journal.pendingOf(rid); len(p) != 0 {
		t.Fatalf("%d changes pending after the replay", len(p))
	}
}

// TestJournalEndBeforeCheckpoint: a job that ends while its reports are still only in the
// journal keeps every event, and a replay of those older reports after a crash does not take
// the job back.
func TestJournalEndBeforeCheckpoint(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "progress.db")
	s := openJournalTest(t, path, Options{})
	job := runningJob(t, s)
	for range 4 {
		report(t, s, job.ID, "working")
	}
	if _, changed, err := s.Cancel(ctx, job.ID); err != nil || !changed {
		t.Fatalf("Cancel: %v %v", changed, err)
	}
	if j := inFile(t, s, job.ID); j.State != Canceled || j.Seq != 6 {
		t.Fatalf("bbolt after cancel: %s seq %d", j.State, j.Seq)
	}
	checkLog(t, s, job.ID, 6, nil)
	abandon(s) // the journal still holds seqs 2..5

	s = openJournalTest(t, path, Options{})
	defer s.Close()
	if j := inFile(t, s, job.ID); j.State != Canceled || j.Seq != 6 {
		t.Fatalf("after the replay: %s seq %d", j.State, j.Seq)
	}
	checkLog(t, s, job.ID, 6, nil)
}

// TestJournalDeleteBeforeCheckpoint: a job deleted while its reports are only in the journal
// stays deleted, through a checkpoint and through a replay.
func TestJournalDeleteBeforeCheckpoint(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "progress.db")
	s := openJournalTest(t, path, Options{})
	job := runningJob(t, s)
	report(t, s, job.ID, "working")
	if err := s.Delete(ctx, job.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.checkpoint(); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, job.ID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get after delete and checkpoint: %v", err)
	}
	other := runningJob(t, s)
	report(t, s, other.ID, "working")
	if err := s.Delete(ctx, other.ID); err != nil {
		t.Fatal(err)
	}
	abandon(s)
	s = openJournalTest(t, path, Options{})
	defer s.Close()
	for _, id := range []string{job.ID, other.ID} {
		if _, err := s.Get(ctx, id); !errors.Is(err, ErrNotFound) {
			t.Fatalf("Get %s after the replay: %v", id, err)
		}
	}
}

// TestJournalFillsUp: with the smallest journal and no timed checkpoint, reports fill both
// files many times over; writers wait for the checkpoints the full files ask for, and nothing
// is lost, in the running process or after a crash.
func TestJournalFillsUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "progress.db")
	s := openJournalTest(t, path, Options{JournalSize: MinJournalSize})
	job := runningJob(t, s)
	big := strings.Repeat("x", 4000) // about 8 KB a record: some 125 a file
	const reports = 600
	msg := func(seq uint64) string {
		if seq == 1 || seq > reports+1 {
			return "" // the creation, and the interrupted end (which keeps the last message)
		}
		return big[:seq%100] + "|" + big
	}
	for seq := uint64(2); seq <= reports+1; seq++ {
		report(t, s, job.ID, msg(seq))
	}
	checkLog(t, s, job.ID, reports+1, msg)
	if got := inFile(t, s, job.ID).Seq; got < reports/2 {
		t.Fatalf("bbolt has seq %d: the full files were not checkpointed", got)
	}
	abandon(s)
	s = openJournalTest(t, path, Options{JournalSize: MinJournalSize})
	defer s.Close()
	if j := inFile(t, s, job.ID); j.Seq != reports+2 || j.State != Failed {
		t.Fatalf("after the crash: %s seq %d", j.State, j.Seq)
	}
	checkLog(t, s, job.ID, reports+2, msg)
}

// TestJournalOff: with JournalSize below 0 every report commits to bbolt.
func TestJournalOff(t *testing.T) {
	s := openTest(t, Options{JournalSize: -1})
	job := runningJob(t, s)
	report(t, s, job.ID, "working")
	if s.journal != nil {
		t.Fatal("a journal with JournalSize -1")
	}
	if got := inFile(t, s, job.ID).Seq; got != 2 {
		t.Fatalf("bbolt has seq %d, want 2", got)
	}
}

// TestJournalTurnedOff: a store opened with the journal off after a crash with it on replays
// what the journal held, then removes its files.
func TestJournalTurnedOff(t *testing.T) {
	path := filepath.Join(t.TempDir(), "progress.db")
	s := openJournalTest(t, path, Options{})
	job := runningJob(t, s)
	for range 3 {
		report(t, s, job.ID, "working")
	}
	abandon(s)
	s = openJournalTest(t, path, Options{JournalSize: -1})
	defer s.Close()
	if j := inFile(t, s, job.ID); j.Seq != 5 || j.State != Failed {
		t.Fatalf("after the crash: %s seq %d, want failed seq 5", j.State, j.Seq)
	}
	checkLog(t, s, job.ID, 5, nil)
	for i := range 2 {
		if _, err := os.Stat(journalPath(path, i)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("journal file %d is still there: %v", i, err)
		}
	}
}

// TestJournalReadersDuringCheckpoints: while writers report and checkpoints run every few
// milliseconds, every read sees each job's log from seq 1 with no gap, and never a version
// older than one already acknowledged.
func TestJournalReadersDuringCheckpoints(t *testing.T) {
	ctx := context.Background()
	s := openJournalTest(t, filepath.Join(t.TempDir(), "progress.db"), Options{CheckpointInterval: 2 * time.Millisecond})
	defer s.Close()
	const jobs, reports, readers = 8, 150, 4
	ids := make([]string, jobs)
	acked := make([]atomic.Uint64, jobs) // the newest seq acknowledged to the writer
	for i := range ids {
		ids[i] = runningJob(t, s).ID
		acked[i].Store(1)
	}
	var writers, reading sync.WaitGroup
	done := make(chan struct{})
	for i := range jobs {
		writers.Go(func() {
			for range reports {
				j, err := s.Update(ctx, ids[i], func(j *Job) error {
					j.Progress = &Progress{Message: "working"}
					return nil
				})
				if err != nil {
					t.Error(err)
					return
				}
				acked[i].Store(j.Seq)
			}
		})
	}
	var reads atomic.Int64
	for r := range readers {
		reading.Go(func() {
			for n := r; ; n++ {
				select {
				case <-done:
					return
				default:
				}
				i := n % jobs
				floor := acked[i].Load()
				evs, err := s.Events(ctx, ids[i], 0, 10000)
				if err != nil {
					t.Error(err)
					return
				}
				for k, ev := range evs {
					if ev.Seq != uint64(k)+1 {
						t.Errorf("job %d: event %d has seq %d (a gap)", i, k, ev.Seq)
						return
					}
				}
				if uint64(len(evs)) < floor {
					t.Errorf("job %d: %d events read after seq %d was acknowledged", i, len(evs), floor)
					return
				}
				j, err := s.Get(ctx, ids[i])
				if err != nil || j.Seq < floor {
					t.Errorf("job %d: Get %v %v after seq %d was acknowledged", i, j, err, floor)
					return
				}
				reads.Add(1)
			}
		})
	}
	writers.Wait()
	close(done)
	reading.Wait()
	// If a file is still sealed (a writer filled the active one), the first call copies it
	// and the second the active file; like Close, two calls leave the journal empty.
	for range 2 {
		if err := s.checkpoint(); err != nil {
			t.Fatal(err)
		}
	}
	for i, id := range ids {
		if got := inFile(t, s, id).Seq; got != reports+1 {
			t.Errorf("job %d: bbolt has seq %d after the last checkpoint, want %d", i, got, reports+1)
		}
		checkLog(t, s, id, reports+1, nil)
	}
	t.Logf("%d reads checked while %d reports were written", reads.Load(), jobs*reports)
}
