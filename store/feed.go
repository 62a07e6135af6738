package store

import (
	"context"
	"io"
	"sync"
)

// feed is the in-memory live tail that subscriptions and long-poll waiters read. It knows
// nothing of where events are stored, so every Store implementation can share it.
//
// Only jobs someone is watching have a topic; publishing to any other job is one map look-up.
// A topic keeps a short ring of the newest events and a channel that is closed on every
// publish: publishing costs the same whatever the number of subscribers, and never waits for
// one of them.
type feed struct {
	mu     sync.RWMutex
	topics map[string]*topic
	closed bool
	size   int // ring capacity
}

type topic struct {
	mu      sync.Mutex
	ring    []Event // circular, contiguous in seq, capacity feed.size
	first   int     // index of the oldest event in ring
	changed chan struct{}
	err     error // set when the job is deleted or the store closes
	refs    int   // guarded by feed.mu
}

func newFeed(size int) *feed {
	return &feed{topics: make(map[string]*topic), size: size}
}

// watch returns the topic of a job, making it if needed. Every watch needs an unwatch.
func (f *feed) watch(id string) (*topic, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil, ErrClosed
	}
	t := f.topics[id]
	if t == nil {
		t = &topic{ring: make([]Event, 0, f.size), changed: make(chan struct{})}
		f.topics[id] = t
	}
	t.refs++
	return t, nil
}

func (f *feed) unwatch(id string, t *topic) {
	f.mu.Lock()
	defer f.mu.Unlock()
	t.refs--
	if t.refs == 0 && f.topics[id] == t {
		delete(f.topics, id)
	}
}

// publish hands a committed event to the watchers of its job.
func (f *feed) publish(ev Event) {
	f.mu.RLock()
	t := f.topics[ev.JobID]
	f.mu.RUnlock()
	if t != nil {
		t.push(ev)
	}
}

// fail ends every watch of a job with err (the job was deleted).
func (f *feed) fail(id string, err error) {
	f.mu.RLock()
	t := f.topics[id]
	f.mu.RUnlock()
	if t != nil {
		t.fail(err)
	}
}

// close ends every watch with ErrClosed and refuses new ones.
func (f *feed) close() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	for _, t := range f.topics {
		t.fail(ErrClosed)
	}
}

func (t *topic) push(ev Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err != nil {
		return
	}
	if n := len(t.ring); n > 0 && t.newestLocked().Seq+1 != ev.Seq {
		// Not contiguous (cannot happen while commits publish in order); start afresh rather
		// than let a reader take a hole for a run.
		t.ring, t.first = t.ring[:0], 0
	}
	if len(t.ring) < cap(t.ring) {
		t.ring = append(t.ring, ev)
	} else {
		t.ring[t.first] = ev
		t.first = (t.first + 1) % len(t.ring)
	}
	close(t.changed)
	t.changed = make(chan struct{})
}

func (t *topic) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err == nil {
		t.err = err
		close(t.changed)
	}
}

func (t *topic) oldestLocked() Event { return t.ring[t.first] }

func (t *topic) newestLocked() Event {
	return t.ring[(t.first+len(t.ring)-1)%len(t.ring)]
}

// covers reports whether the ring holds every published event after seq `after`, so that a
// reader caught up with the stored log to `after` can switch to the ring without a gap.
func (t *topic) covers(after uint64) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.ring) == 0 || t.oldestLocked().Seq <= after+1
}

// next returns the event after seq `after` if the ring has it, else the newest event if that
// is past `after` (the reader fell behind: progress is state, so it skips ahead). With nothing
// newer it returns ok false and a channel closed at the next publish.
func (t *topic) next(after uint64) (ev Event, ok bool, wait <-chan struct{}, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err != nil {
		return Event{}, false, nil, t.err
	}
	if len(t.ring) > 0 {
		newest := t.newestLocked()
		if newest.Seq > after {
			oldest := t.oldestLocked()
			if oldest.Seq <= after+1 {
				return t.ring[(t.first+int(after+1-oldest.Seq))%len(t.ring)], true, nil, nil
			}
			return newest, true, nil, nil
		}
	}
	return Event{}, false, t.changed, nil
}

// newest returns the newest event if it is past `after`, else a channel to wait on.
func (t *topic) newest(after uint64) (ev Event, ok bool, wait <-chan struct{}, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.err != nil {
		return Event{}, false, nil, t.err
	}
	if len(t.ring) > 0 {
		if n := t.newestLocked(); n.Seq > after {
			return n, true, nil, nil
		}
	}
	return Event{}, false, t.changed, nil
}

// replayPage is how many stored events a subscription reads at a time.
const replayPage = 256

// loadFunc reads up to limit stored events after seq `after` (see Store.Events).
type loadFunc func(ctx context.Context, after uint64, limit int) ([]Event, error)

// subscription implements Subscription on a feed topic and a stored log.
//
// Seam: the topic is watched before the stored log is first read, so every event committed
// after that read is also published to the ring; the subscription reads the log until the ring
// covers what follows, then reads the ring. Events seen on both sides are dropped by seq.
type subscription struct {
	feed  *feed
	topic *topic
	id    string
	load  loadFunc
	last  uint64
	live  bool
	ended bool
	buf   []Event
	once  sync.Once
}

func newSubscription(f *feed, t *topic, id string, after uint64, load loadFunc) *subscription {
	return &subscription{feed: f, topic: t, id: id, load: load, last: after}
}

func (s *subscription) Next(ctx context.Context) (Event, error) {
	for {
		if s.ended {
			return Event{}, io.EOF
		}
		if len(s.buf) > 0 {
			ev := s.buf[0]
			s.buf[0] = Event{}
			s.buf = s.buf[1:]
			if ev.Seq <= s.last {
				continue
			}
			return s.deliver(ev), nil
		}
		if !s.live {
			evs, err := s.load(ctx, s.last, replayPage)
			if err != nil {
				return Event{}, err
			}
			if len(evs) > 0 {
				s.buf = evs
				continue
			}
			// The stored log has nothing after s.last. If the ring has moved past s.last+1,
			// the missing events are committed: read the log again.
			s.live = s.topic.covers(s.last)
			continue
		}
		ev, ok, wait, err := s.topic.next(s.last)
		if err != nil {
			return Event{}, err
		}
		if ok {
			return s.deliver(ev), nil
		}
		select {
		case <-wait:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

func (s *subscription) deliver(ev Event) Event {
	s.last = ev.Seq
	if ev.Done() {
		s.ended = true
		s.buf = nil
	}
	return ev
}

func (s *subscription) Close() {
	s.once.Do(func() { s.feed.unwatch(s.id, s.topic) })
}
