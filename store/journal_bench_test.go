package store

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"
)

// BenchmarkCheckpoint measures what copying the journal into bbolt costs per change: 1,000
// running jobs with a history of 60 events each, then `per` reports of each job, then one
// checkpoint, which alone is timed. ns/change is the figure; BENCHMARKS.md "A journal in front
// of bbolt" has the command.
func BenchmarkCheckpoint(b *testing.B) {
	const jobs, history = 1000, 60
	for _, per := range []int{1, 5} {
		b.Run(fmt.Sprintf("reports-per-job=%d", per), func(b *testing.B) {
			s := benchOpenStore(b, b.TempDir(), Options{CheckpointInterval: time.Hour, JournalSize: 64 << 20})
			defer s.Close()
			ids := benchCreate(b, s, jobs)
			ctx := context.Background()
			reportAll := func(n int) {
				var wg sync.WaitGroup
				for w := range 64 {
					wg.Go(func() {
						for i := w; i < len(ids); i += 64 {
							for range n {
								if _, err := s.Update(ctx, ids[i], benchProgress); err != nil {
									b.Error(err)
									return
								}
							}
						}
					})
				}
				wg.Wait()
			}
			for range history / 10 {
				reportAll(10)
				if err := s.checkpoint(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				reportAll(per)
				b.StartTimer()
				if err := s.checkpoint(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*jobs*per), "ns/change")
		})
	}
}
