package store

import (
	"sync"
	"sync/atomic"
)

// live holds the newest committed version of every job that has not finished, so that a change
// of such a job is read, mutated and encoded before it is queued for the commit: the commit
// goroutine, which every write in the process waits for, only stores bytes. It holds no more
// than the jobs running or queued in this process: a job leaves it with its terminal commit or
// its deletion. (Jobs of an earlier process are never live: Open ends them all.)
type live struct {
	mu     sync.Mutex
	jobs   map[rawID]*liveJob
	closed bool // the store closed: readers get nothing from memory, so they see ErrClosed
}

// liveJob is one unfinished job. mu is held by the one change of the job in flight, from reading
// job to the commit, so changes of one job queue up here and their seqs stay contiguous.
type liveJob struct {
	mu  sync.Mutex
	job *Job // newest committed version, owned by the holder of mu; nil once the job has left

	// committed is the newest committed version for readers, who must not wait for mu (held
	// across a commit): Get and Wait of a running job read no page and decode no record.
	// It is nil while a change is in flight (readers then read the file), set again after the
	// commit and before the change is published, never changed once stored, and nil before
	// the creation commit and once the job has left.
	committed atomic.Pointer[Job]
}

func newLive() *live { return &live{jobs: make(map[rawID]*liveJob)} }

// add makes id live; the caller holds lj.mu until the job's creation has committed or failed.
func (l *live) add(id rawID, lj *liveJob) {
	l.mu.Lock()
	l.jobs[id] = lj
	l.mu.Unlock()
}

// get returns the live entry of id, or nil. The caller locks it and checks job: the job may
// have left meanwhile.
func (l *live) get(id rawID) *liveJob {
	l.mu.Lock()
	lj := l.jobs[id]
	l.mu.Unlock()
	return lj
}

// remove ends id's entry; the caller holds lj.mu.
func (l *live) remove(id rawID, lj *liveJob) {
	lj.job = nil
	lj.committed.Store(nil)
	l.mu.Lock()
	if l.jobs[id] == lj {
		delete(l.jobs, id)
	}
	l.mu.Unlock()
}

// committed returns the newest committed version of id if it is live, or nil. The caller
// must not change it.
func (l *live) committed(id rawID) *Job {
	l.mu.Lock()
	lj := l.jobs[id]
	closed := l.closed
	l.mu.Unlock()
	if lj == nil || closed {
		return nil
	}
	return lj.committed.Load()
}

// close makes committed answer nil from now on.
func (l *live) close() {
	l.mu.Lock()
	l.closed = true
	l.mu.Unlock()
}

// size is the number of live jobs (for tests).
func (l *live) size() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.jobs)
}
