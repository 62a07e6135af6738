package store

// Benchmarks of the bbolt store against raw bbolt on the same disk, in the same run. Every
// commit is fsynced (nothing here sets NoSync). They do not run in a plain `go test`; see
// BENCHMARKS.md at the repository root for the command and the figures.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// benchEventSize is the size of the job document each benchmark event carries, and of the
// value the raw bbolt baselines write.
const benchEventSize = 512

var benchValue = bytes.Repeat([]byte("x"), benchEventSize)

// benchMessage is a progress message that makes the document of a running job, as the
// benchmarks write it, about benchEventSize bytes long.
var benchMessage = func() string {
	_, idText := newID(time.Now())
	now := time.Now().UTC()
	j := &Job{
		ID: idText, State: Running, Seq: 1000, Request: RequestInfo{Method: "POST", URI: "/reports"},
		Links: linksFor(DefaultBasePath, idText), CreatedAt: now, StartedAt: &now, UpdatedAt: now,
		Progress: &Progress{Message: "m"},
	}
	doc, err := json.Marshal(j)
	if err != nil {
		panic(err)
	}
	return strings.Repeat("m", max(benchEventSize-len(doc)+1, 1))
}()

// benchProgress is the change every benchmark Update makes.
func benchProgress(j *Job) error {
	j.State = Running
	j.Progress = &Progress{Message: benchMessage}
	return nil
}

func benchOpenStore(b *testing.B, dir string, opts Options) *boltStore {
	b.Helper()
	s, err := openBolt(filepath.Join(dir, "progress.db"), opts)
	if err != nil {
		b.Fatal(err)
	}
	return s
}

func benchOpenRaw(b *testing.B, dir string) *bolt.DB {
	b.Helper()
	db, err := bolt.Open(filepath.Join(dir, "raw.db"), 0o600, nil)
	if err != nil {
		b.Fatal(err)
	}
	return db
}

// benchCreate makes n jobs, concurrently so that they share commits.
func benchCreate(b *testing.B, s *boltStore, n int) []string {
	b.Helper()
	ids := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			j, _, err := s.Create(context.Background(), NewJob{Request: RequestInfo{Method: "POST", URI: "/reports"}})
			if err == nil {
				ids[i] = j.ID
			}
			errs[i] = err
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	return ids
}

// benchWriters runs b.N calls of op spread over `writers` goroutines (not writers*b.N) and
// reports the rate.
func benchWriters(b *testing.B, writers int, op func(w int, i uint64) error) {
	b.Helper()
	var (
		next atomic.Int64
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
	)
	b.ReportAllocs()
	b.ResetTimer()
	for w := range writers {
		wg.Go(func() {
			for {
				i := next.Add(1)
				if i > int64(b.N) {
					return
				}
				if err := op(w, uint64(i)); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
}

var benchWriterCounts = []int{1, 16, 64, 256}

// BenchmarkAppend measures acknowledged (durable) event appends: the store's Update against
// bbolt's own db.Update and db.Batch writing a value of the same size.
func BenchmarkAppend(b *testing.B) {
	b.Run("store", func(b *testing.B) {
		for _, n := range benchWriterCounts {
			b.Run(fmt.Sprintf("writers=%d", n), func(b *testing.B) {
				s := benchOpenStore(b, b.TempDir(), Options{})
				defer s.Close()
				ids := benchCreate(b, s, n)
				ctx := context.Background()
				benchWriters(b, n, func(w int, _ uint64) error {
					_, err := s.Update(ctx, ids[w], benchProgress)
					return err
				})
			})
		}
	})
	raw := func(name string, write func(db *bolt.DB, fn func(*bolt.Tx) error) error) {
		b.Run(name, func(b *testing.B) {
			for _, n := range benchWriterCounts {
				b.Run(fmt.Sprintf("writers=%d", n), func(b *testing.B) {
					db := benchOpenRaw(b, b.TempDir())
					defer db.Close()
					if err := db.Update(func(tx *bolt.Tx) error {
						_, err := tx.CreateBucket(bucketEvents)
						return err
					}); err != nil {
						b.Fatal(err)
					}
					benchWriters(b, n, func(_ int, i uint64) error {
						key := binary.BigEndian.AppendUint64(nil, i)
						return write(db, func(tx *bolt.Tx) error {
							return tx.Bucket(bucketEvents).Put(key, benchValue)
						})
					})
				})
			}
		})
	}
	raw("raw-update", (*bolt.DB).Update)
	raw("raw-batch", (*bolt.DB).Batch)
}

const benchReplayEvents = 10000

// BenchmarkReplay10k reads the 10,000 stored events of one job, as a client resuming from seq
// 0 would, against a raw bbolt cursor over 10,000 values of the same size.
func BenchmarkReplay10k(b *testing.B) {
	ctx := context.Background()
	s := benchOpenStore(b, b.TempDir(), Options{MaxEventsPerJob: 2 * benchReplayEvents})
	defer s.Close()
	id := benchCreate(b, s, 1)[0]
	// 9,999 updates after the create: seq 1 to 10,000. Concurrent writers share commits.
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, 64)
	for w := range errs {
		wg.Go(func() {
			for next.Add(1) < benchReplayEvents {
				if _, err := s.Update(ctx, id, benchProgress); err != nil {
					errs[w] = err
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	if j, err := s.Get(ctx, id); err != nil || j.Seq != benchReplayEvents {
		b.Fatalf("setup: job %+v, %v", j, err)
	}

	check := func(b *testing.B, n int, last uint64) {
		if n != benchReplayEvents || last != benchReplayEvents {
			b.Fatalf("replayed %d events up to seq %d", n, last)
		}
	}
	b.Run("events-pages", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var after uint64
			n := 0
			for after < benchReplayEvents {
				evs, err := s.Events(ctx, id, after, replayPage)
				if err != nil || len(evs) == 0 {
					b.Fatalf("Events after %d: %d events, %v", after, len(evs), err)
				}
				n += len(evs)
				after = evs[len(evs)-1].Seq
			}
			check(b, n, after)
		}
	})
	b.Run("events-one-call", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			evs, err := s.Events(ctx, id, 0, benchReplayEvents)
			if err != nil || len(evs) == 0 {
				b.Fatal(len(evs), err)
			}
			check(b, len(evs), evs[len(evs)-1].Seq)
		}
	})
	b.Run("subscription", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			sub, err := s.Subscribe(ctx, id, 0)
			if err != nil {
				b.Fatal(err)
			}
			n := 0
			var last uint64
			for last < benchReplayEvents {
				ev, err := sub.Next(ctx)
				if err != nil {
					b.Fatal(err)
				}
				n++
				last = ev.Seq
			}
			sub.Close()
			check(b, n, last)
		}
	})
	b.Run("raw-cursor", func(b *testing.B) {
		db := benchOpenRaw(b, b.TempDir())
		defer db.Close()
		rid, _ := newID(time.Now())
		if err := db.Update(func(tx *bolt.Tx) error {
			bk, err := tx.CreateBucket(bucketEvents)
			if err != nil {
				return err
			}
			for seq := uint64(1); seq <= benchReplayEvents; seq++ {
				if err := bk.Put(eventKey(rid, seq), benchValue); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			b.Fatal(err)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for b.Loop() {
			// Copy every value out of the memory map.
			vals := make([][]byte, 0, benchReplayEvents)
			err := db.View(func(tx *bolt.Tx) error {
				c := tx.Bucket(bucketEvents).Cursor()
				for k, v := c.First(); k != nil; k, v = c.Next() {
					vals = append(vals, bytes.Clone(v))
				}
				return nil
			})
			if err != nil || len(vals) != benchReplayEvents {
				b.Fatal(len(vals), err)
			}
		}
	})
}

const benchSubscribers = 10000

// benchFanout runs `benchSubscribers` goroutines, each calling next until it fails and counting
// down `remaining` per event; the one that reaches zero signals done. publish(i) must make
// every subscriber receive exactly one event. ns/op is the time from publish until the last
// subscriber has its event.
func benchFanout(b *testing.B, next func(i int) error, publish func(seq uint64) error, stop func()) {
	var (
		remaining atomic.Int64
		done      = make(chan struct{}, 1)
		wg        sync.WaitGroup
	)
	for i := range benchSubscribers {
		wg.Go(func() {
			for next(i) == nil {
				if remaining.Add(-1) == 0 {
					done <- struct{}{}
				}
			}
		})
	}
	defer func() {
		stop()
		wg.Wait()
	}()
	seq := uint64(0)
	round := func() {
		seq++
		remaining.Store(benchSubscribers)
		if err := publish(seq); err != nil {
			b.Fatal(err)
		}
		<-done
	}
	round() // every subscriber is parked and live before the clock starts
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		round()
	}
	b.StopTimer()
}

// benchContexts gives every subscriber a context of its own, as every HTTP request has.
func benchContexts(parent context.Context) ([]context.Context, func()) {
	ctxs := make([]context.Context, benchSubscribers)
	cancels := make([]context.CancelFunc, benchSubscribers)
	for i := range ctxs {
		ctxs[i], cancels[i] = context.WithCancel(parent)
	}
	return ctxs, func() {
		for _, cancel := range cancels {
			cancel()
		}
	}
}

// BenchmarkFanout10k delivers each event to 10,000 subscribers of one job.
func BenchmarkFanout10k(b *testing.B) {
	b.Run("store", func(b *testing.B) {
		// Update, then every subscription's Next returns it: commit included.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		s := benchOpenStore(b, b.TempDir(), Options{})
		defer s.Close()
		id := benchCreate(b, s, 1)[0]
		subs := make([]Subscription, benchSubscribers)
		for i := range subs {
			sub, err := s.Subscribe(ctx, id, 1)
			if err != nil {
				b.Fatal(err)
			}
			subs[i] = sub
		}
		ctxs, cancelAll := benchContexts(ctx)
		benchFanout(b, func(i int) error {
			_, err := subs[i].Next(ctxs[i])
			return err
		}, func(uint64) error {
			_, err := s.Update(ctx, id, benchProgress)
			return err
		}, func() {
			cancelAll()
			s.Close()
			for _, sub := range subs {
				sub.Close()
			}
		})
	})
	b.Run("feed-only", func(b *testing.B) {
		// feed.publish to 10,000 subscriptions: no commit, no encoding.
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		f := newFeed(DefaultLiveEvents)
		_, id := newID(time.Now())
		doc := append([]byte(nil), benchValue...)
		subs := make([]*subscription, benchSubscribers)
		for i := range subs {
			t, err := f.watch(id)
			if err != nil {
				b.Fatal(err)
			}
			subs[i] = newSubscription(f, t, id, 0, func(context.Context, uint64, int) ([]Event, error) { return nil, nil })
		}
		ctxs, cancelAll := benchContexts(ctx)
		benchFanout(b, func(i int) error {
			_, err := subs[i].Next(ctxs[i])
			return err
		}, func(seq uint64) error {
			f.publish(Event{JobID: id, Seq: seq, Kind: KindProgress, Data: doc})
			return nil
		}, func() {
			cancelAll()
			f.close()
			for _, sub := range subs {
				sub.Close()
			}
		})
	})
	b.Run("chan-baseline", func(b *testing.B) {
		// One buffered channel per subscriber, one send to each per event.
		chans := make([]chan struct{}, benchSubscribers)
		for i := range chans {
			chans[i] = make(chan struct{}, 1)
		}
		benchFanout(b, func(i int) error {
			if _, ok := <-chans[i]; !ok {
				return io.EOF
			}
			return nil
		}, func(uint64) error {
			for _, c := range chans {
				c <- struct{}{}
			}
			return nil
		}, func() {
			for _, c := range chans {
				close(c)
			}
		})
	})
}

const (
	benchOpenJobs   = 1_000_000
	benchBuildBatch = 10_000
	benchActiveJobs = 100
	benchRetain     = 10 * 365 * 24 * time.Hour // the cached file must not expire
)

// benchAddJobs writes n jobs into the store file at path directly, through the store's own
// write path inside big transactions (the public API would fsync each commit): a created event,
// then a done event when finished, or a running event otherwise; with their owner, expiry and
// active index entries as the store keeps them.
func benchAddJobs(path string, n int, finished bool) error {
	s, err := openBolt(path, Options{Retain: benchRetain})
	if err != nil {
		return err
	}
	owners := make([][]byte, 1000)
	for i := range owners {
		owners[i] = s.OwnerHash("owner-" + strconv.Itoa(i))
	}
	for done := 0; done < n; {
		batch := min(benchBuildBatch, n-done)
		err := s.db.Update(func(tx *bolt.Tx) error {
			now := time.Now().UTC()
			for i := range batch {
				_, id := newID(now)
				j := &Job{
					ID: id, State: Queued, Request: RequestInfo{Method: "POST", URI: "/reports?n=" + strconv.Itoa(done+i)},
					Links: linksFor(DefaultBasePath, id), OwnerHash: owners[(done+i)%len(owners)], CreatedAt: now,
				}
				if _, err := s.write(tx, nil, j, now); err != nil {
					return err
				}
				next := j.clone()
				if finished {
					next.State = Succeeded
					next.Response = &ResponseInfo{Status: 200, ContentType: "application/json", ContentLength: 2}
				} else {
					next.State = Running
					next.Progress = &Progress{Message: "working"}
				}
				if _, err := s.write(tx, j, next, now); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			s.Close()
			return err
		}
		done += batch
	}
	return s.Close()
}

// benchCachedFile returns the path of a file cached across runs under
// os.TempDir()/caddy-progress-bench, running build(tmp) to make it when it is absent (a build is
// written under another name and renamed when complete).
func benchCachedFile(b *testing.B, name string, build func(tmp string) error) string {
	dir := filepath.Join(os.TempDir(), "caddy-progress-bench")
	path := filepath.Join(dir, name)
	if fi, err := os.Stat(path); err == nil {
		b.Logf("cached %s: %d bytes", path, fi.Size())
		return path
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		b.Fatal(err)
	}
	tmp := path + ".building"
	os.Remove(tmp)
	os.RemoveAll(tmp + ".results")
	start := time.Now()
	if err := build(tmp); err != nil {
		b.Fatal(err)
	}
	os.RemoveAll(tmp + ".results")
	if err := os.Rename(tmp, path); err != nil {
		b.Fatal(err)
	}
	fi, _ := os.Stat(path)
	b.Logf("built %s: %d bytes in %s", path, fi.Size(), time.Since(start).Round(time.Millisecond))
	return path
}

// benchCompact writes a compacted copy of the store file src to dst with bbolt's Compact: the
// same 1,000,000 jobs with an almost empty freelist.
func benchCompact(src, dst string) error {
	from, err := bolt.Open(src, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		return err
	}
	defer from.Close()
	to, err := bolt.Open(dst, 0o600, nil)
	if err != nil {
		return err
	}
	if err := bolt.Compact(to, from, 64<<20); err != nil {
		to.Close()
		return err
	}
	return to.Close()
}

func benchCopyFile(b *testing.B, from, to string) {
	in, err := os.Open(from)
	if err != nil {
		b.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		b.Fatal(err)
	}
	if err := out.Close(); err != nil {
		b.Fatal(err)
	}
}

// benchVmRSS reads the resident set size of this process from /proc/self/status.
func benchVmRSS() int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return -1
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err != nil {
				return -1
			}
			return kb << 10
		}
	}
	return -1
}

// benchOpenMemory opens the store at path once, outside the timer, and reports how much the Go
// heap in use and the resident set (heap returned to the OS first, both times) grew while it
// was open, and how many free pages bbolt's freelist holds.
func benchOpenMemory(b *testing.B, path string) {
	b.StopTimer()
	var before, after runtime.MemStats
	settle := func() {
		runtime.GC() // a second cycle frees what finalizers released in the first
		debug.FreeOSMemory()
	}
	settle()
	runtime.ReadMemStats(&before)
	rss := benchVmRSS()
	s, err := openBolt(path, Options{})
	if err != nil {
		b.Fatal(err)
	}
	settle()
	runtime.ReadMemStats(&after)
	rssOpen := benchVmRSS()
	free := s.db.Stats().FreePageN
	if err := s.Close(); err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(int64(after.HeapInuse)-int64(before.HeapInuse)), "heap-B")
	b.ReportMetric(float64(rssOpen-rss), "rss-B")
	b.ReportMetric(float64(free), "free-pages")
}

// BenchmarkOpen1M opens a store file holding 1,000,000 finished jobs: the time to open must
// not depend on how many finished jobs are kept.
func BenchmarkOpen1M(b *testing.B) {
	cached := benchCachedFile(b, "open1m-v2.db", func(tmp string) error {
		return benchAddJobs(tmp, benchOpenJobs, true)
	})
	fi, err := os.Stat(cached)
	if err != nil {
		b.Fatal(err)
	}
	compacted := benchCachedFile(b, "open1m-v2-compacted.db", func(tmp string) error {
		return benchCompact(cached, tmp)
	})
	small := filepath.Join(b.TempDir(), "open1k.db")
	if err := benchAddJobs(small, 1000, true); err != nil {
		b.Fatal(err)
	}
	openClose := func(b *testing.B, path string) {
		s, err := openBolt(path, Options{})
		if err != nil {
			b.Fatal(err)
		}
		if err := s.Close(); err != nil {
			b.Fatal(err)
		}
	}
	// The copy the recovery benchmark adds running jobs to: made once per run, outside the
	// timer, and only if that benchmark runs.
	var copied string
	dir := b.TempDir()

	b.Run("store", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			openClose(b, cached)
		}
		benchOpenMemory(b, cached)
		b.ReportMetric(float64(fi.Size()), "file-B")
	})
	b.Run("store-compacted", func(b *testing.B) {
		// The same jobs, rewritten by bbolt's Compact: the open cost that is left once the
		// freelist is small.
		b.ReportAllocs()
		for b.Loop() {
			openClose(b, compacted)
		}
		benchOpenMemory(b, compacted)
		if fi, err := os.Stat(compacted); err == nil {
			b.ReportMetric(float64(fi.Size()), "file-B")
		}
	})
	b.Run("store-1k-jobs", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			openClose(b, small)
		}
		benchOpenMemory(b, small)
		if fi, err := os.Stat(small); err == nil {
			b.ReportMetric(float64(fi.Size()), "file-B")
		}
	})
	b.Run("store-recover-100", func(b *testing.B) {
		// Before each open, 100 running jobs are added to the copy (outside the timer); the
		// timed open recovers them (each ends as failed, "interrupted").
		if copied == "" {
			copied = filepath.Join(dir, "open1m-copy.db")
			benchCopyFile(b, cached, copied)
		}
		b.ReportAllocs()
		b.ResetTimer()
		for range b.N {
			b.StopTimer()
			if err := benchAddJobs(copied, benchActiveJobs, false); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			s, err := openBolt(copied, Options{})
			if err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			var active int
			s.db.View(func(tx *bolt.Tx) error {
				active = tx.Bucket(bucketActive).Stats().KeyN
				return nil
			})
			if active != 0 {
				b.Fatalf("%d jobs left active after recovery", active)
			}
			b.StartTimer()
			if err := s.Close(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("raw-bolt", func(b *testing.B) {
		// bolt.Open and Close of the same 1M file, default options: no write transaction.
		b.ReportAllocs()
		for b.Loop() {
			db, err := bolt.Open(cached, 0o600, nil)
			if err != nil {
				b.Fatal(err)
			}
			if err := db.Close(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// benchLifeWriters matches the HTTP harness's 2 connections × 16 streams.
const (
	benchLifeWriters = 32
	benchLifePrefill = 50000
)

// benchWriteBytes reads what this process has written to storage (/proc/self/io), so that a
// benchmark can report the bytes a job costs the disk, page rewrites included.
func benchWriteBytes() int64 {
	data, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "write_bytes: "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

// BenchmarkJobLife measures what the `progress` handler asks of the store per job: a Create of
// a running job, then a Finish with the upstream's 29-byte answer, by 32 concurrent writers,
// on a store that already holds benchLifePrefill finished jobs (a fresh file flatters random
// keys: its trees fit in a few pages). It reports finished jobs per second and the bytes
// written to storage per job.
func BenchmarkJobLife(b *testing.B) {
	ctx := context.Background()
	s := benchOpenStore(b, b.TempDir(), Options{})
	defer s.Close()
	body := []byte(`{"ok":true,"took_ms":0,"n":42}` + "\n")[:29]
	life := func() error {
		j, _, err := s.Create(ctx, NewJob{Request: RequestInfo{Method: "POST", URI: "/reports/generate"}, Route: "reports", Running: true})
		if err != nil {
			return err
		}
		rw, err := s.NewResult(ctx, j.ID)
		if err != nil {
			return err
		}
		if _, err := rw.Write(body); err != nil {
			return err
		}
		_, err = s.Finish(ctx, j.ID, Outcome{State: Succeeded, Body: rw,
			Response: &ResponseHead{Status: 200, Header: map[string][]string{"Content-Type": {"application/json"}}}})
		return err
	}
	var next atomic.Int64
	var wg sync.WaitGroup
	errs := make([]error, benchLifeWriters)
	for w := range errs {
		wg.Go(func() {
			for next.Add(1) <= benchLifePrefill {
				if errs[w] = life(); errs[w] != nil {
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		b.Fatal(err)
	}
	written := benchWriteBytes()
	benchWriters(b, benchLifeWriters, func(int, uint64) error { return life() })
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "jobs/s")
	b.ReportMetric(float64(benchWriteBytes()-written)/float64(b.N), "disk-B/job")
}
