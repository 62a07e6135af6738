package redisstore

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/store/redisstore/redistest"
)

// BenchmarkCreate creates jobs from 64 goroutines in the bbolt store and in the Redis store,
// in the same run, bbolt first. (-count N runs each N times in a row: to alternate, run the
// command N times with -count 1.) Both acknowledge a job only once it is durable: bbolt
// fsyncs its file (group commit), Redis fsyncs its append-only file (appendfsync always)
// before it replies. BENCH_REDIS_QUERY is appended to the Redis URL (say ?pool_size=64).
//
//	for i in 1 2 3 4 5; do go test -run '^$' -bench BenchmarkCreate -benchtime 3s -count 1 ./store/redisstore; done
func BenchmarkCreate(b *testing.B) {
	spec := store.NewJob{Owner: "bench", Request: store.RequestInfo{Method: "POST", URI: "/reports"}, Route: "POST /reports/*", Running: true}
	run := func(b *testing.B, s store.Store) {
		b.SetParallelism(32) // 64 goroutines on 2 CPUs
		b.ResetTimer()
		start := time.Now()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, _, err := s.Create(context.Background(), spec); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "jobs/s")
	}
	b.Run("bbolt", func(b *testing.B) {
		s, err := store.Open(filepath.Join(b.TempDir(), "progress.db"), store.Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		run(b, s)
	})
	b.Run("redis", func(b *testing.B) {
		srv := redistest.Start(b)
		s, err := Open(context.Background(), srv.URL()+os.Getenv("BENCH_REDIS_QUERY"), Options{})
		if err != nil {
			b.Fatal(err)
		}
		defer s.Close()
		run(b, s)
	})
}

// BenchmarkFanout: 10,000 subscribers spread over three store instances (three Caddy
// instances, each with its one Redis reader) follow 100 jobs, 100 subscribers each; a fourth
// instance updates every job once a second, 10,000 deliveries a second in all, for 10 s. It
// reports the write-to-delivery latency (from before Update to the subscriber's Next
// returning) and how many deliveries were lost. Run it with -benchtime 1x.
//
//	go test -run '^$' -bench BenchmarkFanout -benchtime 1x -count 3 ./store/redisstore
func BenchmarkFanout(b *testing.B) {
	const (
		instances   = 3
		jobs        = 100
		subsPerJob  = 100
		rounds      = 10
		roundPeriod = time.Second
	)
	srv := redistest.Start(b)
	ctx := context.Background()
	open := func() store.Store {
		s, err := Open(ctx, srv.URL(), Options{Prefix: "fanout:"})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { s.Close() })
		return s
	}
	writer := open()
	readers := make([]store.Store, instances)
	for i := range readers {
		readers[i] = open()
	}
	for b.Loop() {
		ids := make([]string, jobs)
		for i := range ids {
			j, _, err := writer.Create(ctx, store.NewJob{Request: store.RequestInfo{Method: "POST", URI: "/f"}, Running: true})
			if err != nil {
				b.Fatal(err)
			}
			ids[i] = j.ID
		}
		// sent[job][seq] is when the update that made seq began.
		sent := make([][]atomic.Int64, jobs)
		for i := range sent {
			sent[i] = make([]atomic.Int64, rounds+3)
		}
		var (
			mu        sync.Mutex
			latencies []time.Duration
			received  atomic.Int64
			subs      sync.WaitGroup
			ready     sync.WaitGroup
		)
		for j := range jobs {
			for k := range subsPerJob {
				s := readers[(j*subsPerJob+k)%instances]
				sub, err := s.Subscribe(ctx, ids[j], 1)
				if err != nil {
					b.Fatal(err)
				}
				ready.Add(1)
				subs.Go(func() {
					defer sub.Close()
					mine := make([]time.Duration, 0, rounds+1)
					next, cancel := context.WithTimeout(ctx, time.Duration(rounds+30)*roundPeriod)
					defer cancel()
					first := true
					for {
						if first {
							ready.Done()
							first = false
						}
						ev, err := sub.Next(next)
						if err != nil {
							break // io.EOF after done, or the deadline
						}
						at := time.Now()
						received.Add(1)
						if t0 := sent[j][ev.Seq].Load(); t0 != 0 {
							mine = append(mine, at.Sub(time.Unix(0, t0)))
						}
					}
					mu.Lock()
					latencies = append(latencies, mine...)
					mu.Unlock()
				})
			}
		}
		ready.Wait()
		start := time.Now()
		for r := range rounds {
			tick := start.Add(time.Duration(r) * roundPeriod)
			time.Sleep(time.Until(tick)) // pacing the load, not waiting for a result
			for j, id := range ids {
				seq := uint64(r + 2)
				sent[j][seq].Store(time.Now().UnixNano())
				if _, err := writer.Update(ctx, id, func(doc *store.Job) error {
					p := float64(r)
					doc.Progress = &store.Progress{Percent: &p}
					return nil
				}); err != nil {
					b.Fatal(err)
				}
			}
		}
		for j, id := range ids {
			sent[j][rounds+2].Store(time.Now().UnixNano())
			if _, _, err := writer.Cancel(ctx, id); err != nil {
				b.Fatal(err)
			}
		}
		elapsed := time.Since(start)
		subs.Wait()
		want := int64(jobs * subsPerJob * (rounds + 1))
		slices.Sort(latencies)
		pct := func(p float64) float64 {
			if len(latencies) == 0 {
				return -1
			}
			return float64(latencies[min(len(latencies)-1, int(p*float64(len(latencies))))].Microseconds()) / 1000
		}
		b.ReportMetric(pct(0.50), "p50-ms")
		b.ReportMetric(pct(0.99), "p99-ms")
		b.ReportMetric(float64(latencies[len(latencies)-1].Microseconds())/1000, "max-ms")
		b.ReportMetric(float64(want-received.Load()), "lost")
		b.ReportMetric(float64(received.Load())/elapsed.Seconds(), "deliveries/s")
	}
}
