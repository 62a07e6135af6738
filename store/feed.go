package store

import (
	"context"
	"io"
	"sync"
	"sync/atomic"
)

// feed is the in-memory live tail that subscriptions and long-poll waiters read. It knows
// nothing of where events are stored, so every Store implementation can share it.
//
// Only jobs someone is watching have a topic; publishing to any other job is one map look-up.
// A topic holds an immutable snapshot of its newest events, which readers load without a lock,
// and one wake-up channel per watcher, signalled without blocking on every publish. Publishing
// never waits for a subscriber, and ten thousand subscribers woken by one event do not queue on
// one lock (as they would on a shared channel closed for all).
type feed struct {
	mu     sync.RWMutex
	topics map[string]*topic
	closed bool
	size   int // events per snapshot
}

type topic struct {
	mu     sync.Mutex // serialises publishers; guards wakers
	snap   atomic.Pointer[snapshot]
	wakers map[chan struct{}]struct{}
	refs   int // guarded by feed.mu
}

// snapshot is a topic's state at one moment; it never changes once published.
type snapshot struct {
	events []Event // contiguous in seq, oldest first; at most 2×size-1 of them
	err    error   // set when the job is deleted or the store closes
}

// waker is a watcher's wake-up channel: one buffered signal means "look again".
func newWaker() chan struct{} { return make(chan struct{}, 1) }

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
		t = &topic{wakers: make(map[chan struct{}]struct{})}
		t.snap.Store(&snapshot{})
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
		t.push(ev, f.size)
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

func (t *topic) push(ev Event, size int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	old := t.snap.Load()
	if old.err != nil {
		return
	}
	kept := old.events
	if n := len(kept); n > 0 && kept[n-1].Seq+1 != ev.Seq {
		// Not contiguous (cannot happen while commits publish in order); start afresh rather
		// than let a reader take a hole for a run.
		kept = nil
	}
	if len(kept) == cap(kept) {
		// Full: carry the newest size-1 events into an array with room for size more. Until
		// it fills, each push appends in place, past the end of every published snapshot
		// (older snapshots are prefixes of the newest and never see the new element), so a
		// push allocates a new array once per size events rather than copying the window
		// every time.
		kept = kept[max(0, len(kept)-size+1):]
		grown := make([]Event, len(kept), len(kept)+size)
		copy(grown, kept)
		kept = grown
	}
	t.snap.Store(&snapshot{events: append(kept, ev)})
	t.wakeLocked()
}

func (t *topic) fail(err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.snap.Load(); old.err == nil {
		t.snap.Store(&snapshot{events: old.events, err: err})
		t.wakeLocked()
	}
}

func (t *topic) wakeLocked() {
	for w := range t.wakers {
		select {
		case w <- struct{}{}:
		default: // already signalled
		}
	}
}

// addWaker registers a watcher's wake-up channel; it is signalled on every later change.
func (t *topic) addWaker(w chan struct{}) {
	t.mu.Lock()
	t.wakers[w] = struct{}{}
	t.mu.Unlock()
}

func (t *topic) removeWaker(w chan struct{}) {
	t.mu.Lock()
	delete(t.wakers, w)
	t.mu.Unlock()
}

// covers reports whether the topic holds every published event after seq `after`, so that a
// reader caught up with the stored log to `after` can switch to the topic without a gap.
func (t *topic) covers(after uint64) bool {
	evs := t.snap.Load().events
	return len(evs) == 0 || evs[0].Seq <= after+1
}

// holdsAfter reports whether the topic holds the event right after seq `after`, or an older
// one: its events are contiguous, and every later event is published to it, so a reader at
// `after` has nothing to read from the stored log.
func (t *topic) holdsAfter(after uint64) bool {
	evs := t.snap.Load().events
	return len(evs) > 0 && evs[0].Seq <= after+1
}

// next returns the event after seq `after` if the topic has it, else the newest event if that
// is past `after` (the reader fell behind: progress is state, so it skips ahead). With nothing
// newer it returns ok false: wait on the watcher's waker.
func (t *topic) next(after uint64) (ev Event, ok bool, err error) {
	s := t.snap.Load()
	if s.err != nil {
		return Event{}, false, s.err
	}
	if n := len(s.events); n > 0 && s.events[n-1].Seq > after {
		if first := s.events[0].Seq; first <= after+1 {
			return s.events[after+1-first], true, nil
		}
		return s.events[n-1], true, nil
	}
	return Event{}, false, nil
}

// newest returns the newest event if it is past `after`.
func (t *topic) newest(after uint64) (ev Event, ok bool, err error) {
	s := t.snap.Load()
	if s.err != nil {
		return Event{}, false, s.err
	}
	if n := len(s.events); n > 0 && s.events[n-1].Seq > after {
		return s.events[n-1], true, nil
	}
	return Event{}, false, nil
}

// replayPage is how many stored events a subscription reads at a time.
const replayPage = 256

// loadFunc reads up to limit stored events after seq `after` (see Store.Events).
type loadFunc func(ctx context.Context, after uint64, limit int) ([]Event, error)

// subscription implements Subscription on a feed topic and a stored log.
//
// Seam: the topic is watched before the stored log is first read, so every event committed
// after that read is also published to the ring; the subscription reads the log until the ring
// covers what follows (it holds the next event, or the log has nothing more and the ring
// nothing newer), then reads the ring. Events seen on both sides are dropped by seq.
type subscription struct {
	feed  *feed
	topic *topic
	wake  chan struct{}
	id    string
	load  loadFunc
	last  uint64
	live  bool
	ended bool
	buf   []Event
	once  sync.Once
}

func newSubscription(f *feed, t *topic, id string, after uint64, load loadFunc) *subscription {
	s := &subscription{feed: f, topic: t, wake: newWaker(), id: id, load: load, last: after}
	t.addWaker(s.wake)
	return s
}

func (s *subscription) Next(ctx context.Context) (Event, error) {
	for {
		ev, ok, err := s.Poll(ctx)
		if err != nil || ok {
			return ev, err
		}
		select {
		case <-s.wake:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Ready is the subscription's wake-up channel: signalled on every change of the job's topic.
func (s *subscription) Ready() <-chan struct{} { return s.wake }

// Poll returns the next event if there is one now: from the replay buffer, the stored log, or
// the topic. With nothing to deliver it returns ok false, and Ready will be signalled on the
// next change.
func (s *subscription) Poll(ctx context.Context) (Event, bool, error) {
	for {
		if s.ended {
			return Event{}, false, io.EOF
		}
		if len(s.buf) > 0 {
			ev := s.buf[0]
			s.buf[0] = Event{}
			s.buf = s.buf[1:]
			if len(s.buf) == 0 {
				s.buf = nil // let the replayed page go
			}
			if ev.Seq <= s.last {
				continue
			}
			return s.deliver(ev), true, nil
		}
		if !s.live {
			if s.topic.holdsAfter(s.last) {
				// Everything after s.last is in the topic (or will be published to it): no
				// need to read the stored log to learn that it has nothing more.
				s.live = true
				continue
			}
			evs, err := s.load(ctx, s.last, replayPage)
			if err != nil {
				return Event{}, false, err
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
		ev, ok, err := s.topic.next(s.last)
		if err != nil || !ok {
			return Event{}, false, err
		}
		return s.deliver(ev), true, nil
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
	s.once.Do(func() {
		s.topic.removeWaker(s.wake)
		s.feed.unwatch(s.id, s.topic)
	})
}
