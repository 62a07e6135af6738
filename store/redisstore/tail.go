package redisstore

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-progress/progress/store"
)

// tailBlock is how long one XREAD blocks when nothing comes. On a timeout the reader looks
// after its bookkeeping (see idle); a request to read every followed stream again unblocks it
// sooner (CLIENT UNBLOCK).
const tailBlock = 5 * time.Second

// changesCount bounds the announcements one XREAD returns; eventsCount the events one XRANGE
// of a job's stream returns (the reader reads again while a page comes back full).
const (
	changesCount = 1000
	eventsCount  = 256
)

// pruneEvery is how often the reader drops the jobs nobody here watches any more.
const pruneEvery = time.Second

// tailer is the store's one reader: it follows, on one connection, the changes stream, where
// every event appended to a job's stream is announced (job id and seq, and the event itself
// when it is small; see announce in scripts.go), and this instance's control stream. An
// announcement of a job that local subscribers or waiters watch that carries the very next
// seq is published to the local feed as it is; for any other with a seq past what it
// published, it reads the job's stream from its cursor (XRANGE, pipelined over the jobs of
// one batch) and publishes the events in seq order. Its cost follows the events written, not
// the number of jobs followed: XREAD names two keys however many jobs the instance follows.
//
// The announcements are numbered (field n), and the stream is capped (MAXLEN ~): a reader
// that finds a number missing, because it fell further behind than the cap or the stream
// expired meanwhile, cannot tell which jobs changed, so it reads every followed stream from
// its cursor again (resync), as it does whenever it (re)connects. Events are published by
// seq, so what is read twice is published once.
type tailer struct {
	s       *redisStore
	changes string // the changes stream
	ctl     string // this instance's control stream: the ids of the jobs it runs that other instances ended (tellOwner in the scripts)

	mu      sync.Mutex
	cursors map[string]uint64 // job id → newest seq published to the feed
	stale   uint64            // bumped when every followed stream must be read again (see resyncLater)

	// The reader's own state, on its goroutine.
	lastID    string // newest entry read from the changes stream
	lastN     uint64 // its number: the next entry must be lastN+1, else some went unread
	ctlCursor string // newest entry read from the control stream
	synced    uint64 // the value of stale the last resync answered
	pruned    time.Time

	reading atomic.Uint64 // the value of stale when the reader issued the XREAD in flight
	connID  atomic.Int64  // CLIENT ID of the reader's connection; 0 between connections
	kick    chan struct{} // asks the kicker to unblock the reader
	done    chan struct{} // closed when the reader returns
	resyncs atomic.Int64  // how many times the reader read every followed stream again

	// hold, set by a test, stops the reader before its next XREAD (see TestFallBehindResyncs).
	hold atomic.Pointer[readerHold]
}

// readerHold stops the reader: it closes arrived, then waits for release to be closed.
type readerHold struct{ arrived, release chan struct{} }

func newTailer(s *redisStore) *tailer {
	return &tailer{
		s: s, changes: s.key("changes"), ctl: s.key("ctl", s.inst),
		cursors: make(map[string]uint64), ctlCursor: "0-0", kick: make(chan struct{}, 1), done: make(chan struct{}),
	}
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
//
// An event written between the caller's read and now may have been announced, and its
// announcement passed over by the reader, before the job was in the followed set; so follow
// reads the job's stream once, after adding it. Whatever is written after that read is
// announced after every announcement the reader has looked at with the job not yet followed.
func (t *tailer) follow(ctx context.Context, id string, from uint64) {
	t.mu.Lock()
	_, ok := t.cursors[id]
	if !ok {
		t.cursors[id] = from
	}
	t.mu.Unlock()
	if ok {
		return
	}
	if err := t.fetch(ctx, t.s.rdb, []string{id}); err != nil {
		// The reader reads it for us, with every other followed stream.
		t.resyncLater()
	}
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

// resyncLater asks the reader to read every followed stream again, unblocking it.
func (t *tailer) resyncLater() {
	t.mu.Lock()
	t.stale++
	t.mu.Unlock()
	signal(t.kick)
}

// pipeliner is a client or a connection.
type pipeliner interface {
	Pipelined(ctx context.Context, fn func(redis.Pipeliner) error) ([]redis.Cmder, error)
}

// fetch reads the streams of followed jobs from their cursors, pipelined, and publishes what
// it reads.
func (t *tailer) fetch(ctx context.Context, c pipeliner, ids []string) error {
	for len(ids) > 0 {
		var jobs []string
		var cmds []*redis.XMessageSliceCmd
		_, err := c.Pipelined(ctx, func(p redis.Pipeliner) error {
			t.mu.Lock()
			defer t.mu.Unlock()
			for _, id := range ids {
				if cur, ok := t.cursors[id]; ok {
					jobs = append(jobs, id)
					cmds = append(cmds, p.XRangeN(ctx, t.s.key("ev", id), strconv.FormatUint(cur+1, 10)+"-0", "+", eventsCount))
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
		ids = ids[:0:0]
		for i, id := range jobs {
			msgs := cmds[i].Val()
			more, err := t.publish(id, msgs)
			if err != nil {
				return err
			}
			if more && len(msgs) == eventsCount {
				ids = append(ids, id)
			}
		}
	}
	return nil
}

// publish hands the entries read from a job's stream to the feed, those past the job's
// cursor, in seq order. It reports whether the job is still followed.
func (t *tailer) publish(id string, msgs []redis.XMessage) (bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.cursors[id]
	if !ok {
		return false, nil
	}
	for _, m := range msgs {
		ev, ok, err := eventOf(id, m)
		if err != nil {
			return false, err
		}
		if !ok { // the tombstone of a deleted job
			delete(t.cursors, id)
			t.s.feed.Fail(id, store.ErrNotFound)
			return false, nil
		}
		if ev.Seq > cur {
			cur = ev.Seq
			t.s.feed.Publish(ev)
		}
	}
	t.cursors[id] = cur
	return true, nil
}

// prune drops the jobs nobody here watches any more and returns the others.
func (t *tailer) prune() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.pruned = time.Now()
	ids := make([]string, 0, len(t.cursors))
	for id := range t.cursors {
		if !t.s.feed.Watched(id) {
			delete(t.cursors, id)
			continue
		}
		ids = append(ids, id)
	}
	return ids
}

// run is the reader: connect, then read the changes stream until the store closes. When
// Redis cannot be reached it ends every subscription (clients reconnect with Last-Event-ID
// and get 503 until Redis is back) and tries again.
func (t *tailer) run() {
	defer t.s.loops.Done()
	defer close(t.done)
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

// read follows the changes stream on one connection until it fails.
func (t *tailer) read(conn *redis.Conn) error {
	ctx := t.s.ctx
	id, err := conn.ClientID(ctx).Result()
	if err != nil {
		return err
	}
	t.connID.Store(id)
	defer t.connID.Store(0)
	// Where the changes stream stands first, then every followed stream: what was written
	// before that position (before the reader began, or while it was away) is read now, what
	// is written after it is announced after it.
	if err := t.position(ctx, conn); err != nil {
		return err
	}
	if err := t.resync(ctx, conn); err != nil {
		return err
	}
	for {
		t.mu.Lock()
		stale := t.stale
		t.mu.Unlock()
		if stale != t.synced {
			if err := t.resync(ctx, conn); err != nil {
				return err
			}
		}
		t.reading.Store(stale)
		if h := t.hold.Swap(nil); h != nil {
			close(h.arrived)
			select {
			case <-h.release:
			case <-ctx.Done():
				return nil
			}
		}
		res, err := conn.XRead(ctx, &redis.XReadArgs{Streams: []string{t.changes, t.ctl, t.lastID, t.ctlCursor}, Count: changesCount, Block: tailBlock}).Result()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, redis.Nil) { // timed out, or unblocked to resync
			if err := t.idle(ctx, conn); err != nil {
				return err
			}
			continue
		}
		if err != nil {
			return err
		}
		for _, st := range res {
			if st.Stream == t.ctl {
				t.endedElsewhere(st.Messages)
				continue
			}
			jobs, gap, err := t.announced(st.Messages)
			switch {
			case err != nil:
			case gap:
				err = t.resync(ctx, conn)
			case len(jobs) > 0:
				err = t.fetch(ctx, conn, jobs)
			}
			if err != nil {
				return err
			}
		}
		if time.Since(t.pruned) > pruneEvery {
			t.prune()
		}
	}
}

// announced reads a batch of the changes stream. It publishes the events the announcements
// carry that are the next of their followed jobs, and returns the followed jobs whose streams
// must be read for events past their cursors (or a tombstone), and whether entries went
// unread before or within the batch.
func (t *tailer) announced(msgs []redis.XMessage) (jobs []string, gap bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, m := range msgs {
		n, err := strconv.ParseUint(field(m, "n"), 10, 64)
		if err != nil {
			return nil, false, fmt.Errorf("store: entry %s of %s: number %q", m.ID, t.changes, field(m, "n"))
		}
		if n != t.lastN+1 {
			gap = true
		}
		t.lastID, t.lastN = m.ID, n
		id, seq := field(m, "j"), field(m, "s")
		cur, ok := t.cursors[id]
		if !ok {
			continue
		}
		s, err := strconv.ParseUint(seq, 10, 64)
		if err == nil && s <= cur {
			continue // published already (this instance wrote it, say)
		}
		if !t.s.feed.Watched(id) {
			delete(t.cursors, id)
			continue
		}
		if ev, ok := carried(id, s, m); ok && s == cur+1 {
			t.cursors[id] = s
			t.s.feed.Publish(ev)
			continue
		}
		jobs = append(jobs, id)
	}
	if gap {
		return nil, true, nil
	}
	return dedup(jobs), false, nil
}

// carried is the event an announcement of job id at seq carries, if it carries one (any
// other announcement has its job's stream read).
func carried(id string, seq uint64, m redis.XMessage) (store.Event, bool) {
	if _, ok := m.Values["d"]; !ok {
		return store.Event{}, false
	}
	ev, ok, err := eventFields(id, seq, m)
	return ev, ok && err == nil
}

// dedup drops repeated ids (a batch announces a busy job several times), keeping the order.
func dedup(ids []string) []string {
	if len(ids) < 2 {
		return ids
	}
	seen := make(map[string]struct{}, len(ids))
	out := ids[:0]
	for _, id := range ids {
		if _, ok := seen[id]; !ok {
			seen[id] = struct{}{}
			out = append(out, id)
		}
	}
	return out
}

// field is a string field of a stream entry, "" if absent.
func field(m redis.XMessage, name string) string {
	v, _ := m.Values[name].(string)
	return v
}

// position reads where the changes stream stands: its newest entry.
func (t *tailer) position(ctx context.Context, conn *redis.Conn) error {
	last, err := conn.XRevRangeN(ctx, t.changes, "+", "-", 1).Result()
	if err != nil {
		return err
	}
	t.lastID, t.lastN = "0-0", 0
	if len(last) == 1 {
		n, _ := strconv.ParseUint(field(last[0], "n"), 10, 64)
		t.lastID, t.lastN = last[0].ID, n
	}
	return nil
}

// resync reads every followed stream from its cursor.
func (t *tailer) resync(ctx context.Context, conn *redis.Conn) error {
	t.mu.Lock()
	t.synced = t.stale
	t.mu.Unlock()
	t.resyncs.Add(1)
	return t.fetch(ctx, conn, t.prune())
}

// idle runs when an XREAD found nothing. It drops the jobs nobody watches, and checks the
// changes stream is the one the reader reads: if it expired while nothing was written and was
// made again with lower entry ids (the clock of Redis went back), reading after the last id
// would pass over its entries.
func (t *tailer) idle(ctx context.Context, conn *redis.Conn) error {
	t.prune()
	last, err := conn.XRevRangeN(ctx, t.changes, "+", "-", 1).Result()
	if err != nil {
		return err
	}
	switch {
	case len(last) == 0:
		t.lastID = "0-0" // gone: whatever comes is new
	case idBefore(last[0].ID, t.lastID):
		if err := t.position(ctx, conn); err != nil {
			return err
		}
		return t.resync(ctx, conn)
	}
	return nil
}

// idBefore reports whether stream entry id a comes before b.
func idBefore(a, b string) bool {
	am, as, _ := strings.Cut(a, "-")
	bm, bs, _ := strings.Cut(b, "-")
	amn, _ := strconv.ParseUint(am, 10, 64)
	bmn, _ := strconv.ParseUint(bm, 10, 64)
	if amn != bmn {
		return amn < bmn
	}
	asn, _ := strconv.ParseUint(as, 10, 64)
	bsn, _ := strconv.ParseUint(bs, 10, 64)
	return asn < bsn
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

// kicker unblocks the reader's XREAD when it must read every followed stream again.
// CLIENT UNBLOCK does nothing to a connection that is not blocked yet, so it tries again
// until the reader has seen the request.
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
			want := t.stale
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

// stop unblocks the reader so that it sees the store closing (its context is canceled). An
// XREAD sent after the unblock would wait out its block time, so stop unblocks again until the
// reader has returned.
func (t *tailer) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*tailBlock)
	defer cancel()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		if id := t.connID.Load(); id != 0 {
			t.s.rdb.ClientUnblock(ctx, id)
		}
		select {
		case <-t.done:
			return
		case <-ctx.Done():
			return
		case <-tick.C:
		}
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
		s.tail.follow(ctx, id, job.Seq)
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
		s.tail.follow(ctx, id, job.Seq)
	}
	return s.feed.Wait(ctx, t, after)
}
