package engine

import (
	"context"
	"errors"
	"sync"
)

// errQueueFull: the route's queue is at its limit.
var errQueueFull = errors.New("queue full")

// queue admits at most `limit` jobs of a route to the upstream at once; the rest wait in
// order, up to `maxWaiting` of them.
type queue struct {
	mu         sync.Mutex
	limit      int // 0: no limit
	maxWaiting int
	running    int
	waiting    []*ticket
}

// ticket is one job's place: granted is closed when the job may run; moved is signalled
// (without blocking) when its position in the queue changes.
type ticket struct {
	q        *queue
	granted  chan struct{}
	moved    chan struct{}
	position int // 0 once granted; guarded by q.mu
	released bool
}

func newQueue(limit, maxWaiting int) *queue {
	return &queue{limit: limit, maxWaiting: maxWaiting}
}

// reserve takes a place for a new job: a running slot, or the end of the queue.
func (q *queue) reserve() (*ticket, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	t := &ticket{q: q, granted: make(chan struct{}), moved: make(chan struct{}, 1)}
	if q.limit == 0 || (q.running < q.limit && len(q.waiting) == 0) {
		q.running++
		close(t.granted)
		return t, nil
	}
	if len(q.waiting) >= q.maxWaiting {
		return nil, errQueueFull
	}
	q.waiting = append(q.waiting, t)
	t.position = len(q.waiting)
	return t, nil
}

// Position is the ticket's 1-based place in the queue, 0 once it may run.
func (t *ticket) Position() int {
	t.q.mu.Lock()
	defer t.q.mu.Unlock()
	return t.position
}

// wait blocks until the ticket is granted, calling onMove with the new position whenever it
// changes, or until ctx ends (then the place is given up).
func (t *ticket) wait(ctx context.Context, onMove func(position int)) error {
	for {
		select {
		case <-t.granted:
			return nil
		case <-t.moved:
			if p := t.Position(); p > 0 {
				onMove(p)
			}
		case <-ctx.Done():
			t.release()
			return ctx.Err()
		}
	}
}

// release gives the place back: a running slot passes to the first waiter; a waiting place
// closes up the queue behind it. Calling it twice does nothing.
func (t *ticket) release() {
	q := t.q
	q.mu.Lock()
	defer q.mu.Unlock()
	if t.released {
		return
	}
	t.released = true
	select {
	case <-t.granted:
		q.running--
		if len(q.waiting) > 0 && (q.limit == 0 || q.running < q.limit) {
			next := q.waiting[0]
			q.waiting = q.waiting[1:]
			q.running++
			next.position = 0
			close(next.granted)
		}
	default:
		for i, w := range q.waiting {
			if w == t {
				q.waiting = append(q.waiting[:i], q.waiting[i+1:]...)
				break
			}
		}
	}
	for i, w := range q.waiting {
		if w.position != i+1 {
			w.position = i + 1
			select {
			case w.moved <- struct{}{}:
			default:
			}
		}
	}
}
