package redisstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-progress/progress/store"
)

// tailBlock is how long one XREAD blocks when nothing comes; a change of the followed set
// unblocks it sooner (CLIENT UNBLOCK).
const tailBlock = 5 * time.Second

// tailCount bounds the entries one XREAD returns per stream.
const tailCount = 256

// tailer is the store's one reader of the event streams: it follows, on one connection, the
// streams of the jobs that local subscribers and waiters watch, and publishes what it reads to
// the local feed in seq order.
type tailer struct {
	s *redisStore

	mu      sync.Mutex
	cursors map[string]uint64 // job id → newest seq published to the feed
	gen     uint64            // bumped when a job is added to cursors

	ctlCursor string // newest entry read from this instance's control stream

	reading atomic.Uint64 // gen of the XREAD in flight
	connID  atomic.Int64  // CLIENT ID of the reader's connection; 0 between connections
	kick    chan struct{} // asks the kicker to unblock the reader
}

func newTailer(s *redisStore) *tailer {
	return &tailer{s: s, cursors: make(map[string]uint64), ctlCursor: "0-0", kick: make(chan struct{}, 1)}
}

func signal(c chan struct{}) {
	select {
	case c <- struct{}{}:
	default:
	}
}

// follow makes the reader follow job id from seq `from` on, if it does not already. The
// caller watches the job's topic already, and has read the job at seq `from` after it began to
// watch: every later event reaches the topic.
func (t *tailer) follow(id string, from uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.cursors[id]; ok {
		return
	}
	t.cursors[id] = from
	t.gen++
	signal(t.kick)
}

// forget stops following a deleted job.
func (t *tailer) forget(id string) {
	t.mu.Lock()
	delete(t.cursors, id)
	t.mu.Unlock()
}

// offer publishes an event if it is the next one of a followed job (an event this instance
// wrote, say); any other the reader fetches in its turn.
func (t *tailer) offer(ev store.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.cursors[ev.JobID]; ok && ev.Seq == c+1 {
		t.cursors[ev.JobID] = ev.Seq
		t.s.feed.Publish(ev)
	}
}

// streams drops the jobs nobody watches any more and returns the XREAD arguments for the
// others, and for this instance's control stream (see ctl): the stream keys, then the ids to
// read after.
func (t *tailer) streams() ([]string, uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	keys := make([]string, 0, 2*len(t.cursors)+2)
	for id := range t.cursors {
		if !t.s.feed.Watched(id) {
			delete(t.cursors, id)
			continue
		}
		keys = append(keys, t.s.key("ev", id))
	}
	n := len(keys)
	keys = append(keys, t.ctl())
	for _, k := range keys[:n] {
		keys = append(keys, strconv.FormatUint(t.cursors[k[len(k)-32:]], 10)+"-0")
	}
	return append(keys, t.ctlCursor), t.gen
}

// ctl is this instance's control stream: the ids of the jobs it runs that other instances
// ended (tellOwner in the scripts).
func (t *tailer) ctl() string { return t.s.key("ctl", t.s.inst) }

// run is the reader: connect, then XREAD the followed streams until the store closes. When
// Redis cannot be reached it ends every subscription (clients reconnect with Last-Event-ID
// and get 503 until Redis is back) and tries again.
func (t *tailer) run() {
	defer t.s.loops.Done()
	backoff := 50 * time.Millisecond
	for t.s.ctx.Err() == nil {
		conn := t.s.rdb.Conn()
		err := t.read(conn)
		conn.Close()
		if t.s.ctx.Err() != nil {
			return
		}
		t.s.feed.FailAll(t.s.fail(err))
		if !t.s.wait(backoff) {
			return
		}
		backoff = min(2*backoff, time.Second)
	}
}

// read follows the streams on one connection until it fails.
func (t *tailer) read(conn *redis.Conn) error {
	ctx := t.s.ctx
	id, err := conn.ClientID(ctx).Result()
	if err != nil {
		return err
	}
	t.connID.Store(id)
	defer t.connID.Store(0)
	for {
		args, gen := t.streams()
		t.reading.Store(gen)
		res, err := conn.XRead(ctx, &redis.XReadArgs{Streams: args, Count: tailCount, Block: tailBlock}).Result()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, redis.Nil) {
			continue // timed out, or unblocked to read a new set
		}
		if err != nil {
			return err
		}
		for _, st := range res {
			if st.Stream == t.ctl() {
				t.endedElsewhere(st.Messages)
				continue
			}
			job := st.Stream[len(st.Stream)-32:]
			for _, m := range st.Messages {
				ev, ok, err := eventOf(job, m)
				if err != nil {
					return err
				}
				if !ok {
					t.forget(job)
					t.s.feed.Fail(job, store.ErrNotFound)
					break
				}
				t.deliver(ev)
			}
		}
	}
}

// endedElsewhere hands the jobs that other instances ended to the store's listener.
func (t *tailer) endedElsewhere(msgs []redis.XMessage) {
	f := t.s.onEnded.Load()
	for _, m := range msgs {
		t.ctlCursor = m.ID
		if id, ok := m.Values["id"].(string); ok && f != nil {
			(*f)(id)
		}
	}
}

// deliver publishes an event read from a stream if it is newer than what the feed has.
func (t *tailer) deliver(ev store.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.cursors[ev.JobID]; ok && ev.Seq > c {
		t.cursors[ev.JobID] = ev.Seq
		t.s.feed.Publish(ev)
	}
}

// kicker unblocks the reader's XREAD when a job was added to the followed set, so that the
// reader starts again with it. CLIENT UNBLOCK does nothing to a connection that is not blocked
// yet, so it tries again until the reader reads the new set.
func (t *tailer) kicker() {
	defer t.s.loops.Done()
	for {
		select {
		case <-t.kick:
		case <-t.s.ctx.Done():
			return
		}
		for range 2000 {
			t.mu.Lock()
			want := t.gen
			t.mu.Unlock()
			if t.reading.Load() >= want {
				break
			}
			if id := t.connID.Load(); id != 0 {
				n, err := t.s.rdb.ClientUnblock(t.s.ctx, id).Result()
				if err == nil && n == 1 {
					break
				}
			}
			if !t.s.wait(2 * time.Millisecond) {
				return
			}
		}
	}
}

// stop unblocks the reader so that it sees the store closing.
func (t *tailer) stop() {
	if id := t.connID.Load(); id != 0 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		t.s.rdb.ClientUnblock(ctx, id)
	}
}

func (s *redisStore) Subscribe(ctx context.Context, id string, after uint64) (store.Subscription, error) {
	if !store.ValidID(id) {
		return nil, store.ErrNotFound
	}
	t, err := s.feed.Watch(id)
	if err != nil {
		return nil, err
	}
	// Watch first, read second: whatever is written after this read reaches the topic.
	job, err := s.Get(ctx, id)
	if err != nil {
		s.feed.Unwatch(id, t)
		return nil, err
	}
	if !job.State.Terminal() {
		s.tail.follow(id, job.Seq)
	}
	after = min(after, job.Seq) // a cursor from the future: follow from now
	return s.feed.Subscribe(t, id, after, job.State.Terminal() && after == job.Seq, func(ctx context.Context, after uint64, limit int) ([]store.Event, error) {
		return s.Events(ctx, id, after, limit)
	}), nil
}

func (s *redisStore) Wait(ctx context.Context, id string, after uint64) (store.Event, error) {
	if !store.ValidID(id) {
		return store.Event{}, store.ErrNotFound
	}
	t, err := s.feed.Watch(id)
	if err != nil {
		return store.Event{}, err
	}
	defer s.feed.Unwatch(id, t)
	job, err := s.Get(ctx, id)
	if err != nil {
		return store.Event{}, err
	}
	if job.Seq > after {
		evs, err := s.Events(ctx, id, job.Seq-1, 1)
		if err != nil {
			return store.Event{}, err
		}
		if len(evs) == 1 {
			return evs[0], nil
		}
		return store.Event{}, fmt.Errorf("store: job %s at seq %d has no event %d", id, job.Seq, job.Seq)
	}
	if !job.State.Terminal() {
		s.tail.follow(id, job.Seq)
	}
	return s.feed.Wait(ctx, t, after)
}
