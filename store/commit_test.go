package store

import (
	"context"
	"encoding/binary"
	"errors"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

func openCommitter(t *testing.T, maxBatch int) (*committer, *bolt.DB) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(t.TempDir(), "commit.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	if err := db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucket([]byte("w"))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return newCommitter(maxBatch, boltCommits{db: db}.commit), db
}

// TestCommitterConcurrentWriters: writers on many goroutines, some of whose writes fail, each
// get their own outcome; every successful write is stored once, a failed one not at all, and
// the published hooks run in commit order (the order the keys were stored in).
func TestCommitterConcurrentWriters(t *testing.T) {
	c, db := openCommitter(t, 8) // small batches, so the lead is handed on often
	const writers, each = 16, 50
	errOdd := errors.New("refused")
	var (
		mu        sync.Mutex
		published []uint64
		wg        sync.WaitGroup
	)
	failures := make(chan error, writers*each)
	for w := range writers {
		wg.Go(func() {
			for i := range each {
				n := uint64(w*each + i)
				key := binary.BigEndian.AppendUint64(nil, n)
				err := c.do(func(tx *bolt.Tx) error {
					if n%7 == 3 {
						return errOdd
					}
					b := tx.Bucket([]byte("w"))
					seq, _ := b.NextSequence()
					return b.Put(key, binary.BigEndian.AppendUint64(nil, seq))
				}, func() {
					mu.Lock()
					published = append(published, n)
					mu.Unlock()
				})
				switch {
				case n%7 == 3 && !errors.Is(err, errOdd):
					failures <- errors.New("a refused write was not told so")
				case n%7 != 3 && err != nil:
					failures <- err
				}
			}
		})
	}
	wg.Wait()
	close(failures)
	for err := range failures {
		t.Error(err)
	}
	c.close()

	// NextSequence counts the transactions' successful puts in commit order; the published
	// hooks must have run in the same order.
	stored := make(map[uint64]uint64) // sequence → write
	err := db.View(func(tx *bolt.Tx) error {
		return tx.Bucket([]byte("w")).ForEach(func(k, v []byte) error {
			stored[binary.BigEndian.Uint64(v)] = binary.BigEndian.Uint64(k)
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	want := 0
	for n := range writers * each {
		if n%7 != 3 {
			want++
		}
	}
	if len(stored) != want || len(published) != want {
		t.Fatalf("stored %d writes and published %d, want %d", len(stored), len(published), want)
	}
	// Retried batches (after a failing op) use sequences that their first try rolled back,
	// so compare orders, not sequence values.
	var bySeq []uint64
	for seq := uint64(1); len(bySeq) < want; seq++ {
		if n, ok := stored[seq]; ok {
			bySeq = append(bySeq, n)
		}
	}
	for i := range bySeq {
		if bySeq[i] != published[i] {
			t.Fatalf("write %d was stored %dth but published as %d", bySeq[i], i, published[i])
		}
	}
}

// TestCommitterCloseAnswersQueuedWrites: close waits for the writes queued behind a commit in
// flight to be committed, and refuses writes after it.
func TestCommitterCloseAnswersQueuedWrites(t *testing.T) {
	c, _ := openCommitter(t, 1024)
	inCommit := make(chan struct{})
	release := make(chan struct{})
	var releaseOnce sync.Once
	letGo := func() { releaseOnce.Do(func() { close(release) }) }
	t.Cleanup(letGo) // on a failure too: the database cannot close under a commit in flight
	first := make(chan error, 1)
	go func() {
		first <- c.do(func(tx *bolt.Tx) error {
			close(inCommit)
			<-release
			return tx.Bucket([]byte("w")).Put([]byte("first"), nil)
		}, nil)
	}()
	<-inCommit
	queued := make(chan error, 3)
	for i := range 3 {
		go func() {
			queued <- c.do(func(tx *bolt.Tx) error {
				return tx.Bucket([]byte("w")).Put([]byte{byte(i)}, nil)
			}, nil)
		}()
	}
	// Wait until the three are queued behind the commit in flight.
	waitFor(t, "three writes queued", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.queue) == 3
	})
	closed := make(chan struct{})
	go func() {
		c.close()
		close(closed)
	}()
	waitFor(t, "close begun", func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.closed
	})
	if err := c.do(func(*bolt.Tx) error { return nil }, nil); !errors.Is(err, ErrClosed) {
		t.Fatalf("a write after close: %v, want ErrClosed", err)
	}
	select {
	case <-closed:
		t.Fatal("close returned with a commit in flight")
	default:
	}
	letGo()
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := <-queued; err != nil {
			t.Fatalf("a queued write: %v", err)
		}
	}
	<-closed
}

// waitFor polls a condition that another goroutine makes true, for at most 10 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for: %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestReadersSeeWhatTheLogShows: between a change's commit and its publication, a reader of
// the event log already sees the change; Get (which serves running jobs from memory) must not
// then answer the version before it. The commit observer holds the commit of the job's end
// there while the test reads.
func TestReadersSeeWhatTheLogShows(t *testing.T) {
	var hold atomic.Pointer[commitHold]
	s := openTest(t, Options{ObserveCommit: func(time.Duration, int) {
		if h := hold.Load(); h != nil && hold.CompareAndSwap(h, nil) {
			close(h.arrived)
			<-h.release
		}
	}})
	ctx := context.Background()
	j := newJob(t, s)
	if _, err := s.Update(ctx, j.ID, func(j *Job) error { j.State = Running; return nil }); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get(ctx, j.ID); err != nil || got.State != Running {
		t.Fatalf("Get of the running job: %v, %v", got, err)
	}

	h := &commitHold{arrived: make(chan struct{}), release: make(chan struct{})}
	hold.Store(h)
	finished := make(chan error, 1)
	go func() {
		_, err := s.Finish(ctx, j.ID, Outcome{State: Failed, Error: &JobError{Code: "upstream_incomplete", Message: "cut short"}})
		finished <- err
	}()
	<-h.arrived // committed, not yet published
	evs, err := s.Events(ctx, j.ID, 0, 100)
	var releaseOnce sync.Once
	release := func() { releaseOnce.Do(func() { close(h.release) }) }
	defer release()
	if err != nil || len(evs) == 0 || !evs[len(evs)-1].Done() {
		t.Fatalf("the log does not show the end yet: %d events, %v", len(evs), err)
	}
	got, err := s.Get(ctx, j.ID)
	if err != nil || got.State != Failed {
		t.Fatalf("Get after the log showed the end: state %q, %v; want failed", got.State, err)
	}
	release()
	if err := <-finished; err != nil {
		t.Fatal(err)
	}
}

// commitHold stops a commit after it is durable: arrived closes, then it waits for release.
type commitHold struct{ arrived, release chan struct{} }
