package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/store/redisstore/redistest"
)

// commandCounter counts, by name, the commands a client sends.
type commandCounter struct {
	mu sync.Mutex
	n  map[string]int
}

func countCommands(c *redis.Client) *commandCounter {
	cc := &commandCounter{n: make(map[string]int)}
	c.AddHook(cc)
	return cc
}

func (c *commandCounter) add(cmds ...redis.Cmder) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, cmd := range cmds {
		c.n[cmd.Name()]++
	}
}

func (c *commandCounter) count(names ...string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, name := range names {
		n += c.n[name]
	}
	return n
}

func (c *commandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (c *commandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		c.add(cmd)
		return next(ctx, cmd)
	}
}

func (c *commandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		c.add(cmds...)
		return next(ctx, cmds)
	}
}

// serverCalls is how many times Redis ran a command since its statistics were last reset
// (INFO commandstats), whoever sent it.
func serverCalls(t *testing.T, c *redis.Client, command string) int {
	t.Helper()
	info, err := c.Info(context.Background(), "commandstats").Result()
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(info, "\n") {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), "cmdstat_"+command+":calls=")
		if !ok {
			continue
		}
		calls, _, _ := strings.Cut(rest, ",")
		n, err := strconv.Atoi(calls)
		if err != nil {
			t.Fatalf("commandstats line %q", line)
		}
		return n
	}
	return 0
}

// twoInstancesAndAJob opens two instances on one new redis-server and makes a running job on
// the first.
func twoInstancesAndAJob(t *testing.T) (a, b *redisStore, j *store.Job) {
	t.Helper()
	srv := redistest.Start(t)
	prefix := freshPrefix()
	a, b = openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{})
	return a, b, runningJob(t, a)
}

// TestOwnVersionSkipsTheRead: an instance that wrote a job last changes it again with one
// script call and no read; a change another instance made meanwhile is kept, not overwritten
// by a change made from the stale version.
func TestOwnVersionSkipsTheRead(t *testing.T) {
	a, b, j := twoInstancesAndAJob(t)
	ctx := context.Background()
	onA := countCommands(a.rdb)
	setMessage := func(m string) func(*store.Job) error {
		return func(j *store.Job) error {
			if j.Progress == nil {
				j.Progress = &store.Progress{}
			}
			j.Progress.Message = m
			return nil
		}
	}
	for i := range 5 {
		if _, err := a.Update(ctx, j.ID, setMessage(strconv.Itoa(i))); err != nil {
			t.Fatal(err)
		}
	}
	if reads, scripts := onA.count("hget"), onA.count("evalsha"); reads != 0 || scripts != 5 {
		t.Fatalf("5 updates by the instance that made the job: %d reads and %d script calls, want 0 and 5", reads, scripts)
	}
	if _, err := b.Update(ctx, j.ID, func(j *store.Job) error { j.Progress.Stage = "by b"; return nil }); err != nil {
		t.Fatal(err)
	}
	got, err := a.Update(ctx, j.ID, setMessage("last"))
	if err != nil {
		t.Fatal(err)
	}
	if got.Seq != 8 || got.Progress.Stage != "by b" || got.Progress.Message != "last" {
		t.Fatalf("after b's change, a's update gave seq %d, progress %+v; want seq 8, stage \"by b\", message \"last\"", got.Seq, got.Progress)
	}
	if reads := onA.count("hget"); reads != 1 {
		t.Fatalf("a read the job %d times after b changed it, want once", reads)
	}
	evs, err := b.Events(ctx, j.ID, 0, 100)
	if err != nil {
		t.Fatal(err)
	}
	for i, ev := range evs {
		if ev.Seq != uint64(i+1) {
			t.Fatalf("events %d: seq %d, want %d", i, ev.Seq, i+1)
		}
	}
	if len(evs) != 8 {
		t.Fatalf("%d events, want 8", len(evs))
	}
}

// TestAnnouncementCarriesTheEvent: an instance following a job that another instance writes
// publishes small events from their announcements, reading the job's stream only for an event
// too large to ride along; its subscriber sees every event in order either way.
func TestAnnouncementCarriesTheEvent(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	a, b := openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{})
	ctx := context.Background()
	waitFor(t, "b's reader connected", 10*time.Second, func() bool { return b.tail.resyncs.Load() >= 1 })
	j := runningJob(t, a)
	sub, err := b.Subscribe(ctx, j.ID, 1)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	// Caught up: the subscription reads the stored log once, finds nothing after seq 1, and
	// from then on takes its events from what the reader publishes.
	if ev, ok, err := sub.Poll(ctx); ok || err != nil {
		t.Fatalf("a job with one event, followed from seq 1: %+v %v %v", ev, ok, err)
	}
	if err := a.rdb.ConfigResetStat(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	large, err := json.Marshal(strings.Repeat("x", 3000))
	if err != nil {
		t.Fatal(err)
	}
	next, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	for seq := uint64(2); seq <= 9; seq++ {
		var data json.RawMessage
		if seq == 6 {
			data = large
		}
		if _, err := a.Update(ctx, j.ID, func(j *store.Job) error {
			j.Progress = &store.Progress{Message: strconv.FormatUint(seq, 10), Data: data}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		// One event at a time, so that the reader reads each announcement in a batch of its
		// own: one stream read per event if the events did not ride along.
		ev, err := sub.Next(next)
		if err != nil || ev.Seq != seq {
			t.Fatalf("event %+v %v, want seq %d", ev, err, seq)
		}
		var doc store.Job
		if err := json.Unmarshal(ev.Data, &doc); err != nil || doc.Progress == nil || doc.Progress.Message != strconv.FormatUint(seq, 10) || (seq == 6) != (len(doc.Progress.Data) > 2048) {
			t.Fatalf("event %d: %v, document %s", seq, err, ev.Data)
		}
	}
	if n := serverCalls(t, a.rdb, "xrange"); n != 1 {
		t.Fatalf("8 events, one of them too large to ride along: %d stream reads, want 1", n)
	}
}

// TestLaggingSubscriberReadsNoStream: a subscriber that reads each event only after the next
// one is written finds the job's stream one event ahead every time it looks. Once the
// instance's reader has published the event it needs, it must take events from there, not read
// the stream (an XRANGE per event).
func TestLaggingSubscriberReadsNoStream(t *testing.T) {
	srv := redistest.Start(t)
	prefix := freshPrefix()
	a, b := openTest(t, srv, prefix, Options{}), openTest(t, srv, prefix, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	waitFor(t, "b's reader connected", 10*time.Second, func() bool { return b.tail.resyncs.Load() >= 1 })
	j := runningJob(t, a)
	report := func(seq uint64) {
		t.Helper()
		if _, err := a.Update(ctx, j.ID, func(j *store.Job) error {
			j.Progress = &store.Progress{Message: strconv.FormatUint(seq, 10)}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	report(2)
	sub, err := b.Subscribe(ctx, j.ID, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Close()
	// Seqs 1 and 2 were written before the subscription: it reads them from the stream.
	if ev, ok, err := sub.Poll(ctx); !ok || err != nil || ev.Seq != 1 {
		t.Fatalf("first Poll = %+v %v %v, want seq 1", ev, ok, err)
	}
	if err := a.rdb.ConfigResetStat(ctx).Err(); err != nil {
		t.Fatal(err)
	}
	for seq := uint64(3); seq <= 12; seq++ {
		report(seq)
		select { // b's reader has published seq (the only change since the last wait)
		case <-sub.Ready():
		case <-ctx.Done():
			t.Fatalf("b's reader never published seq %d", seq)
		}
		if ev, ok, err := sub.Poll(ctx); !ok || err != nil || ev.Seq != seq-1 {
			t.Fatalf("Poll = %+v %v %v, want seq %d", ev, ok, err, seq-1)
		}
	}
	if n := serverCalls(t, a.rdb, "xrange"); n != 0 {
		t.Fatalf("10 events read one behind the stream: %d stream reads, want 0", n)
	}
}

// TestOwnVersionAfterRedisLostIt: Redis loses an instance's acknowledged write (a crash under
// appendfsync everysec), and another instance stores a different version under the same seq.
// The first instance's next change, made from the version it remembers, is refused by the
// write mark and made again from what Redis holds: a canceled job stays canceled.
func TestOwnVersionAfterRedisLostIt(t *testing.T) {
	a, b, j := twoInstancesAndAJob(t)
	ctx := context.Background()
	key := a.key("job", j.ID)
	saved, err := a.rdb.HGetAll(ctx, key).Result()
	if err != nil {
		t.Fatal(err)
	}
	report := func(j *store.Job) error { j.Progress = &store.Progress{Message: "working"}; return nil }
	if _, err := a.Update(ctx, j.ID, report); err != nil {
		t.Fatal(err)
	}
	// Redis forgets that update: the job and its stream as they were before it.
	if err := a.rdb.HSet(ctx, key, "rec", saved["rec"], "seq", saved["seq"], "w", saved["w"]).Err(); err != nil {
		t.Fatal(err)
	}
	stream := a.key("ev", j.ID)
	first, err := a.rdb.XRangeN(ctx, stream, "1-0", "1-0", 1).Result()
	if err != nil || len(first) != 1 {
		t.Fatalf("the job's first event: %v %v", first, err)
	}
	if err := a.rdb.Del(ctx, stream).Err(); err != nil {
		t.Fatal(err)
	}
	if err := a.rdb.XAdd(ctx, &redis.XAddArgs{Stream: stream, ID: "1-0", Values: first[0].Values}).Err(); err != nil {
		t.Fatal(err)
	}
	canceled, changed, err := b.Cancel(ctx, j.ID)
	if err != nil || !changed || canceled.Seq != 2 {
		t.Fatalf("cancel on b: %+v %v %v, want seq 2", canceled, changed, err)
	}
	if _, err := a.Update(ctx, j.ID, report); !errors.Is(err, store.ErrFinished) {
		t.Fatalf("a's report on a job b canceled: %v, want ErrFinished", err)
	}
	got, err := b.Get(ctx, j.ID)
	if err != nil || got.State != store.Canceled || got.Seq != 2 {
		t.Fatalf("the job after a's report: %+v %v, want canceled at seq 2", got, err)
	}
}
