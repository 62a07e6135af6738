package store

import (
	"errors"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// committer is a group commit. bbolt allows one writer at a time and every commit costs two
// fsyncs (a journal write, one), so writes queue here and, as soon as the previous flush ends,
// everything that queued meanwhile is made durable at once. A lone writer waits for one flush, not
// for a batch timer (bbolt's db.Batch waits up to 10 ms to fill a batch); many writers share
// each flush, so throughput grows with concurrency. The store runs two: one for bbolt
// transactions and one for the journal (journal.go).
//
// There is no commit goroutine: a writer that finds no flush in flight leads, flushing the
// queue on its own goroutine, and when it is done hands the lead to the first writer that
// queued meanwhile. A write that does not overlap another then costs no hand-off between
// goroutines (each is a wake-up that waits for a CPU, which on a busy machine is where a
// write's latency tail comes from), and a leader never waits for a flush after its own.
type committer struct {
	maxBatch int
	// flush makes a batch durable, then runs each op's published and answers it, in order.
	flush func(batch []*op)

	mu      sync.Mutex
	idle    sync.Cond // signalled when a leader stops with nothing queued
	closed  bool
	leading bool  // a writer is flushing, or has been handed the lead
	queue   []*op // writes waiting for the next flush, in arrival order
}

// op is one write: a bbolt change (apply) or a journal record (change). apply runs inside the
// shared transaction and may run more than once (when another op in its batch fails, the
// batch is retried without it), so it must only set what it captures. published runs after
// the write is durable, in commit order, before the writer is answered: the place to hand
// committed events to subscribers.
type op struct {
	apply     func(tx *bolt.Tx) error
	change    *change
	published func()
	result    chan error // the write's outcome, or errLead first
}

// finish answers o with its outcome; a durable write (err nil) is published first.
func (o *op) finish(err error) {
	if err == nil && o.published != nil {
		o.published()
	}
	o.result <- err
}

// errLead, sent to a waiting writer, hands it the lead.
var errLead = errors.New("store: lead the next commit")

func newCommitter(maxBatch int, flush func(batch []*op)) *committer {
	c := &committer{maxBatch: maxBatch, flush: flush}
	c.idle.L = &c.mu
	return c
}

// do queues a bbolt write and waits until it is durable (or has failed). It does not give up
// when a context ends: a caller must learn whether its write happened.
func (c *committer) do(apply func(tx *bolt.Tx) error, published func()) error {
	return c.wait(&op{apply: apply, published: published, result: make(chan error, 1)})
}

// wait queues o and waits for its outcome.
func (c *committer) wait(o *op) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.queue = append(c.queue, o)
	if c.leading {
		c.mu.Unlock()
		if err := <-o.result; err != errLead {
			return err
		}
	} else {
		c.leading = true
		c.mu.Unlock()
	}
	// This writer leads, and its op is the first queued: a leader only stops with the queue
	// empty, and hands the lead to the head of the queue.
	c.lead()
	return <-o.result
}

// lead commits the head of the queue (up to maxBatch ops), then hands the lead on or stops.
func (c *committer) lead() {
	c.mu.Lock()
	n := min(len(c.queue), c.maxBatch)
	batch := c.queue[:n:n]
	c.queue = append([]*op(nil), c.queue[n:]...)
	c.mu.Unlock()

	if len(batch) > 0 {
		c.flush(batch)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.queue) > 0 {
		c.queue[0].result <- errLead
		return
	}
	c.leading = false
	c.idle.Broadcast()
}

// close refuses new writes and returns once every queued write is answered.
func (c *committer) close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for c.leading {
		c.idle.Wait()
	}
}

// boltCommits is the flush of the bbolt committer.
type boltCommits struct {
	db      *bolt.DB
	observe func(took time.Duration, writes int) // nil: nobody is measuring
}

// commit runs a batch in one transaction. If one op fails, the ops before it are committed
// together, the failing one alone (so it gets its own error against the same state), and the
// ops after it together: the order of writes is kept.
func (c boltCommits) commit(batch []*op) {
	if len(batch) == 0 {
		return
	}
	failed := -1
	began := time.Now()
	err := c.db.Update(func(tx *bolt.Tx) error {
		for i, o := range batch {
			if err := o.apply(tx); err != nil {
				failed = i
				return err
			}
		}
		return nil
	})
	if c.observe != nil {
		c.observe(time.Since(began), len(batch))
	}
	switch {
	case err == nil || failed < 0 || len(batch) == 1:
		// Committed; or the commit itself failed (a full disk, say), or the lone op did.
		for _, o := range batch {
			o.finish(err)
		}
	default:
		c.commit(batch[:failed])
		c.commit(batch[failed : failed+1])
		c.commit(batch[failed+1:])
	}
}
