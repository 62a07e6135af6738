package store

import (
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
)

// committer is the store's group commit. bbolt allows one writer at a time and every commit
// costs two fsyncs, so writes queue here and one goroutine commits, as soon as the previous
// commit ends, everything that queued meanwhile in one transaction. A lone writer waits for
// one commit, not for a batch timer (bbolt's db.Batch waits up to 10 ms to fill a batch);
// many writers share each commit, so throughput grows with concurrency.
type committer struct {
	db       *bolt.DB
	maxBatch int
	observe  func(took time.Duration, writes int) // nil: nobody is measuring

	mu     sync.RWMutex // held for reading while sending, so close cannot race a send
	closed bool
	ops    chan *op
	done   chan struct{}
}

// op is one write. apply runs inside the shared transaction and may run more than once (when
// another op in its batch fails, the batch is retried without it), so it must only set what it
// captures. published runs after the commit, in commit order, before the writer is answered:
// the place to hand committed events to subscribers.
type op struct {
	apply     func(tx *bolt.Tx) error
	published func()
	result    chan error
}

func newCommitter(db *bolt.DB, maxBatch int, observe func(time.Duration, int)) *committer {
	c := &committer{db: db, maxBatch: maxBatch, observe: observe, ops: make(chan *op, maxBatch), done: make(chan struct{})}
	go c.run()
	return c
}

// do queues a write and waits until it is durable (or has failed). It does not give up when a
// context ends: a caller must learn whether its write happened.
func (c *committer) do(apply func(tx *bolt.Tx) error, published func()) error {
	o := &op{apply: apply, published: published, result: make(chan error, 1)}
	c.mu.RLock()
	if c.closed {
		c.mu.RUnlock()
		return ErrClosed
	}
	c.ops <- o
	c.mu.RUnlock()
	return <-o.result
}

// close answers every queued write, then stops the commit goroutine.
func (c *committer) close() {
	c.mu.Lock()
	if !c.closed {
		c.closed = true
		close(c.ops)
	}
	c.mu.Unlock()
	<-c.done
}

func (c *committer) run() {
	defer close(c.done)
	batch := make([]*op, 0, c.maxBatch)
	for first := range c.ops {
		batch = append(batch[:0], first)
	fill:
		for len(batch) < c.maxBatch {
			select {
			case o, ok := <-c.ops:
				if !ok {
					break fill
				}
				batch = append(batch, o)
			default:
				break fill
			}
		}
		c.commit(batch)
		clear(batch)
	}
}

// commit runs a batch in one transaction. If one op fails, the ops before it are committed
// together, the failing one alone (so it gets its own error against the same state), and the
// ops after it together: the order of writes is kept.
func (c *committer) commit(batch []*op) {
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
	case err == nil:
		for _, o := range batch {
			if o.published != nil {
				o.published()
			}
			o.result <- nil
		}
	case failed < 0 || len(batch) == 1:
		// The commit itself failed (a full disk, say), or the lone op did.
		for _, o := range batch {
			o.result <- err
		}
	default:
		c.commit(batch[:failed])
		c.commit(batch[failed : failed+1])
		c.commit(batch[failed+1:])
	}
}
