package redisstore

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/store/redisstore/redistest"
	"github.com/caddy-progress/progress/store/storetest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var prefixes atomic.Int64

// freshPrefix gives each test storage of its own on one server.
func freshPrefix() string { return fmt.Sprintf("t%d:", prefixes.Add(1)) }

// TestConformance runs the shared Store suite against a real redis-server.
func TestConformance(t *testing.T) {
	srv := redistest.Start(t)
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) func(opts store.Options) (store.Store, error) {
			prefix := freshPrefix()
			return func(opts store.Options) (store.Store, error) {
				return Open(context.Background(), srv.URL(), Options{Options: opts, Prefix: prefix})
			}
		},
		Shared: true,
	})
}

// openTest opens a store on srv with a prefix of the test's own.
func openTest(t *testing.T, srv *redistest.Server, prefix string, opts Options) *redisStore {
	t.Helper()
	opts.Prefix = prefix
	s, err := Open(context.Background(), srv.URL(), opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s.(*redisStore)
}

// runningJob makes a running job on s.
func runningJob(t *testing.T, s *redisStore) *store.Job {
	t.Helper()
	j, _, err := s.Create(context.Background(), store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/a"}, Running: true})
	if err != nil {
		t.Fatal(err)
	}
	return j
}

// crash stops an instance as a killed process would: its loops stop, its connections go, and
// its lease stays in Redis until it lapses.
func (s *redisStore) crash() { s.shutdown(false) }

// waitFor polls a condition until it holds or the deadline passes.
func waitFor(t *testing.T, what string, within time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond) // polling a condition, with a deadline
	}
}

// TestLeaseLapseInterruptsOnce: the jobs of an instance that dies end as failed/interrupted
// once its lease lapses, with one done event, though two instances look for them; the jobs of
// live instances are left alone.
func TestLeaseLapseInterruptsOnce(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	const lease = 600 * time.Millisecond
	opts := Options{LeaseTime: lease}
	a, b, c := openTest(t, srv, prefix, opts), openTest(t, srv, prefix, opts), openTest(t, srv, prefix, opts)
	ctx := context.Background()
	running, _, err := a.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/r"}, Running: true})
	if err != nil {
		t.Fatal(err)
	}
	queued, _, err := a.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/q"}, QueuePosition: 1})
	if err != nil {
		t.Fatal(err)
	}
	finished, _, _ := a.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/f"}})
	if _, _, err := a.Cancel(ctx, finished.ID); err != nil {
		t.Fatal(err)
	}
	onB, _, err := b.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/b"}, Running: true})
	if err != nil {
		t.Fatal(err)
	}
	sub, err := b.Subscribe(ctx, running.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	// The lapsed instance's jobs end one script at a time: follow the queued one too, so the
	// checks below wait for both ends rather than race the second.
	subQueued, err := b.Subscribe(ctx, queued.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer subQueued.Close()
	// Two lease times pass: a live instance's jobs stay as they are.
	time.Sleep(2 * lease) // lets leases lapse if renewal were broken; the check below can fail
	if j, _ := b.Get(ctx, running.ID); j.State != store.Running {
		t.Fatalf("the job of a live instance became %s", j.State)
	}
	killed := time.Now()
	a.crash()
	next, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for name, sb := range map[string]store.Subscription{"running": sub, "queued": subQueued} {
		ev, err := sb.Next(next)
		if err != nil || !ev.Done() || ev.Seq != 2 {
			t.Fatalf("subscriber on b, %s job: %+v %v", name, ev, err)
		}
	}
	// Lapse (≤ lease) + the next look (≤ lease/3), with room for a loaded machine.
	if took := time.Since(killed); took > 10*lease {
		t.Errorf("interrupted %s after the kill, lease %s", took, lease)
	}
	for _, id := range []string{running.ID, queued.ID} {
		j, err := c.Get(ctx, id)
		if err != nil || j.State != store.Failed || j.Error == nil || j.Error.Code != store.CodeInterrupted || j.Seq != 2 {
			t.Fatalf("job %s of the dead instance: %+v %v", id, j, err)
		}
		evs, err := c.Events(ctx, id, 0, 10)
		if err != nil || len(evs) != 2 || !evs[1].Done() {
			t.Fatalf("job %s: %d events, want one done event after the first (%v)", id, len(evs), err)
		}
	}
	if j, _ := c.Get(ctx, finished.ID); j.State != store.Canceled || j.Seq != 2 {
		t.Fatalf("a finished job was touched: %+v", j)
	}
	if j, _ := c.Get(ctx, onB.ID); j.State != store.Running {
		t.Fatalf("a live instance's job became %s", j.State)
	}
	waitFor(t, "the dead instance leaves the instance set", 30*time.Second, func() bool {
		ok, _ := c.rdb.SIsMember(ctx, prefix+"instances", a.inst).Result()
		return !ok
	})
}

// TestUnavailable: with Redis gone, calls fail with ErrUnavailable and live subscriptions end
// (so SSE clients reconnect); once Redis is back, everything works again, with nothing
// acknowledged lost.
func TestUnavailable(t *testing.T) {
	srv := redistest.Start(t)
	s := openTest(t, srv, freshPrefix(), Options{})
	ctx := context.Background()
	job := runningJob(t, s)
	if _, err := s.Update(ctx, job.ID, func(j *store.Job) error { j.Progress = &store.Progress{Stage: "one"}; return nil }); err != nil {
		t.Fatal(err)
	}
	sub, err := s.Subscribe(ctx, job.ID, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	srv.Stop()
	next, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := sub.Next(next); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("subscriber with Redis gone: %v, want ErrUnavailable", err)
	}
	if _, _, err := s.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/b"}}); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("create with Redis gone: %v, want ErrUnavailable", err)
	}
	if _, err := s.Get(ctx, job.ID); !errors.Is(err, store.ErrUnavailable) {
		t.Fatalf("get with Redis gone: %v, want ErrUnavailable", err)
	}
	srv.Resume()
	waitFor(t, "creating jobs again", 30*time.Second, func() bool {
		_, _, err := s.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/c"}})
		return err == nil
	})
	again, err := s.Subscribe(ctx, job.ID, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	if _, err := s.Finish(ctx, job.ID, store.Outcome{State: store.Failed}); err != nil {
		t.Fatal(err)
	}
	if ev, err := again.Next(next); err != nil || ev.Seq != 3 || !ev.Done() {
		t.Fatalf("resumed subscriber: %+v %v", ev, err)
	}
}

// TestRestartKeepsAcknowledged: with appendfsync always, a SIGKILLed Redis restarts with every
// acknowledged change, and a subscriber resuming from its last seq sees the rest.
func TestRestartKeepsAcknowledged(t *testing.T) {
	srv := redistest.Start(t)
	s := openTest(t, srv, freshPrefix(), Options{})
	ctx := context.Background()
	var ids []string
	for i := range 20 {
		j := runningJob(t, s)
		for k := range i % 5 {
			if _, err := s.Update(ctx, j.ID, func(j *store.Job) error { j.Progress = &store.Progress{Stage: fmt.Sprint(k)}; return nil }); err != nil {
				t.Fatal(err)
			}
		}
		ids = append(ids, j.ID)
	}
	srv.Restart()
	waitFor(t, "reads after the restart", 30*time.Second, func() bool {
		_, err := s.Get(ctx, ids[0])
		return err == nil
	})
	for i, id := range ids {
		j, err := s.Get(ctx, id)
		if err != nil || j.Seq != uint64(1+i%5) || j.State != store.Running {
			t.Fatalf("job %d after the restart: %+v %v", i, j, err)
		}
	}
	sub, err := s.Subscribe(ctx, ids[4], 3)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	if _, _, err := s.Cancel(ctx, ids[4]); err != nil {
		t.Fatal(err)
	}
	next, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for want := uint64(4); want <= 6; want++ {
		ev, err := sub.Next(next)
		if err != nil || ev.Seq != want {
			t.Fatalf("resumed subscriber: seq %d (%v), want %d", ev.Seq, err, want)
		}
	}
}

// TestKeysExpireAndGo: every key of a finished job carries the retention as its TTL, results
// are kept in chunks, and a deleted job leaves only its tombstone.
func TestKeysExpireAndGo(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	s := openTest(t, srv, prefix, Options{Options: store.Options{Retain: time.Hour}})
	ctx := context.Background()
	j, _, err := s.Create(ctx, store.NewJob{Owner: "o", IdempotencyKey: "k", Request: store.RequestInfo{Method: "POST", URI: "/a"}})
	if err != nil {
		t.Fatal(err)
	}
	rw, _ := s.NewResult(ctx, j.ID)
	body := make([]byte, chunkSize*2+100)
	if _, err := rw.Write(body); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Finish(ctx, j.ID, store.Outcome{State: store.Succeeded, Response: &store.ResponseHead{Status: 200}, Body: rw}); err != nil {
		t.Fatal(err)
	}
	if n, _ := s.rdb.LLen(ctx, prefix+"body:"+j.ID).Result(); n != 3 {
		t.Fatalf("a body of two chunks and a bit is kept as %d list items", n)
	}
	keys, err := s.rdb.Keys(ctx, prefix+"*").Result()
	if err != nil {
		t.Fatal(err)
	}
	jobKeys := 0
	for _, k := range keys {
		ttl, err := s.rdb.PTTL(ctx, k).Result()
		if err != nil {
			t.Fatal(err)
		}
		switch k[len(prefix):][:3] {
		case "job", "ev:", "bod", "ide":
			jobKeys++
			if ttl <= 0 || ttl > time.Hour {
				t.Errorf("key %s of a finished job has TTL %s, want the retention", k, ttl)
			}
		case "spo":
			t.Errorf("spool %s left after Finish", k)
		}
	}
	if jobKeys != 4 {
		t.Fatalf("%d keys of the job, want 4 (job, ev, body, idem): %v", jobKeys, keys)
	}
	if err := s.Delete(ctx, j.ID); err != nil {
		t.Fatal(err)
	}
	keys, _ = s.rdb.Keys(ctx, prefix+"*").Result()
	for _, k := range keys {
		switch k {
		case prefix + "ev:" + j.ID: // the tombstone, kept a minute
			if ttl, _ := s.rdb.PTTL(ctx, k).Result(); ttl <= 0 || ttl > tombstoneTTL {
				t.Errorf("tombstone TTL %s", ttl)
			}
		case prefix + "changes", prefix + "changes:n": // shared by every job, capped, kept a day
			if ttl, _ := s.rdb.PTTL(ctx, k).Result(); ttl <= 0 || ttl > 24*time.Hour {
				t.Errorf("key %s has TTL %s, want at most a day", k, ttl)
			}
		case prefix + "secret", prefix + "instances", prefix + "lease:" + s.inst, prefix + "active:" + s.inst:
		default:
			t.Errorf("key %s left after Delete", k)
		}
	}
}

// TestEndedElsewhere: the instance running a job hears when another instance cancels or
// deletes it, and not when it ends the job itself.
func TestEndedElsewhere(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	a, b := openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{})
	heard := make(chan string, 10)
	a.OnEndedElsewhere(func(id string) { heard <- id })
	ctx := context.Background()
	newJob := func() string { return runningJob(t, a).ID }
	own, canceled, deleted := newJob(), newJob(), newJob()
	if _, _, err := a.Cancel(ctx, own); err != nil {
		t.Fatal(err)
	}
	if _, _, err := b.Cancel(ctx, canceled); err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(ctx, deleted); err != nil {
		t.Fatal(err)
	}
	// The control stream is read in order: once the deletion is heard, the cancel of own
	// (written before the other two) would have been heard first.
	timeout := time.After(30 * time.Second)
	for _, want := range []string{canceled, deleted} {
		select {
		case id := <-heard:
			if id != want {
				t.Fatalf("heard %s, want %s (own job %s)", id, want, own)
			}
		case <-timeout:
			t.Fatalf("did not hear of %s", want)
		}
	}
}

// TestAnnouncedAcrossInstances: events written on any instance reach the subscribers of the
// others, in order and once, through the changes stream; following a job needs no extra read
// of every followed stream.
func TestAnnouncedAcrossInstances(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	a, b, c := openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{})
	ctx := context.Background()
	const jobs, updates = 20, 5
	var ids []string
	var subs []store.Subscription
	for range jobs {
		j := runningJob(t, a)
		ids = append(ids, j.ID)
		for _, s := range []*redisStore{b, c} {
			sub, err := s.Subscribe(ctx, j.ID, 1)
			if err != nil {
				t.Fatal(err)
			}
			defer sub.Close()
			subs = append(subs, sub)
		}
	}
	writers := []*redisStore{a, b, c}
	for k := range updates {
		for i, id := range ids {
			w := writers[(i+k)%3]
			if _, err := w.Update(ctx, id, func(j *store.Job) error { j.Progress = &store.Progress{Stage: fmt.Sprint(k)}; return nil }); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, id := range ids {
		if _, err := c.Finish(ctx, id, store.Outcome{State: store.Succeeded}); err != nil {
			t.Fatal(err)
		}
	}
	next, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for i, sub := range subs {
		for want := uint64(2); want <= 2+updates; want++ {
			ev, err := sub.Next(next)
			if err != nil || ev.Seq != want || ev.JobID != ids[i/2] {
				t.Fatalf("subscriber %d: %+v %v, want seq %d of %s", i, ev, err, want, ids[i/2])
			}
			if ev.Done() != (want == 2+updates) {
				t.Fatalf("subscriber %d: seq %d done %v", i, ev.Seq, ev.Done())
			}
		}
	}
	for name, s := range map[string]*redisStore{"b": b, "c": c} {
		if n := s.tail.resyncs.Load(); n != 1 {
			t.Errorf("instance %s read every followed stream %d times, want once (at connecting)", name, n)
		}
	}
}

// TestFallBehindResyncs: a reader that finds announcements it had not read trimmed away reads
// every followed stream again, so the event whose announcement it missed still reaches the
// subscribers, once.
func TestFallBehindResyncs(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	a, b := openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{})
	ctx := context.Background()
	newJob := func() string { return runningJob(t, a).ID }
	update := func(id, stage string) {
		t.Helper()
		if _, err := a.Update(ctx, id, func(j *store.Job) error { j.Progress = &store.Progress{Stage: stage}; return nil }); err != nil {
			t.Fatal(err)
		}
	}
	one, two := newJob(), newJob()
	subOne, err := b.Subscribe(ctx, one, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer subOne.Close()
	subTwo, err := b.Subscribe(ctx, two, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer subTwo.Close()
	// Both subscribers have read the stored log and wait on the feed: what b's reader does not
	// publish they do not get.
	for _, sub := range []store.Subscription{subOne, subTwo} {
		if ev, ok, err := sub.Poll(ctx); ok || err != nil {
			t.Fatalf("subscriber with nothing new: %+v %v", ev, err)
		}
	}
	// Stop b's reader before its next XREAD; an event of job one brings it there if it is
	// blocked in one now.
	hold := &readerHold{arrived: make(chan struct{}), release: make(chan struct{})}
	b.tail.hold.Store(hold)
	update(one, "a")
	select {
	case <-hold.arrived:
	case <-time.After(30 * time.Second):
		t.Fatal("b's reader did not come round to its next XREAD")
	}
	// Job two's event is announced and the announcement trimmed before b reads it, as if b
	// had fallen further behind than the stream's cap; job one's next event is announced
	// after the gap.
	update(two, "b")
	if err := a.rdb.XTrimMaxLen(ctx, prefix+"changes", 0).Err(); err != nil {
		t.Fatal(err)
	}
	update(one, "c")
	before := b.tail.resyncs.Load()
	close(hold.release)
	next, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for _, want := range []struct {
		sub store.Subscription
		seq uint64
	}{{subOne, 2}, {subOne, 3}, {subTwo, 2}} {
		ev, err := want.sub.Next(next)
		if err != nil || ev.Seq != want.seq {
			t.Fatalf("subscriber on b: %+v %v, want seq %d", ev, err, want.seq)
		}
	}
	if n := b.tail.resyncs.Load(); n <= before {
		t.Fatalf("b's reader did not read every followed stream again (%d times, %d before)", n, before)
	}
	// Nothing is delivered twice: the next event of each job comes next.
	update(one, "d")
	update(two, "e")
	for _, want := range []struct {
		sub store.Subscription
		seq uint64
	}{{subOne, 4}, {subTwo, 3}} {
		ev, err := want.sub.Next(next)
		if err != nil || ev.Seq != want.seq {
			t.Fatalf("subscriber on b: %+v %v, want seq %d", ev, err, want.seq)
		}
	}
}
