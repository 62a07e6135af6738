package engine

import (
	"context"
	"errors"
	"math"
	"net/http"
	"slices"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-progress/progress/store"
)

// Estimated progress, for upstreams that never report (DESIGN.md section 4): the engine
// remembers how long recent successful jobs of each route took (kept in the store, so it
// survives restarts) and, while a job of that route runs, publishes a percent and an ETA
// with progress.estimated set. A real report from the upstream ends the estimates for good.

// DefaultEstimateInterval is how often a running job's estimate may be published.
const DefaultEstimateInterval = time.Second

const (
	// maxEstimatedRoutes bounds the routes remembered: route keys include the request method,
	// which clients choose, so they are normalized and capped.
	maxEstimatedRoutes = 1024
	// saveEvery bounds how often one route's run times are written to the store: an estimate
	// is worth less than a write per job, and a crash loses only the last few samples.
	saveEvery = 5 * time.Second
	// refreshEvery republishes an unchanged percent now and then, so the ETA counts down.
	refreshEvery = 10 * time.Second
)

// estimator holds the recent run times of every route, loaded from the store on first use.
type estimator struct {
	mu     sync.Mutex
	routes map[string]*routeTimes
}

type routeTimes struct {
	loaded bool
	times  []time.Duration // oldest first, at most store.MaxRouteDurations
	dirty  bool
	saved  time.Time
}

// routeKey names a route for estimates: the method and the route's name (its matcher).
func routeKey(method, name string) string {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch,
		http.MethodDelete, http.MethodOptions:
	default:
		method = "OTHER"
	}
	if name == "" {
		name = "*"
	}
	return method + " " + name
}

// times returns a copy of the run times of route key, loading them from the store once.
func (e *Engine) routeTimes(key string) []time.Duration {
	e.estimates.mu.Lock()
	defer e.estimates.mu.Unlock()
	rt := e.estimates.lookup(key)
	if rt == nil {
		return nil
	}
	if !rt.loaded {
		// Under the lock: the first job of a route after a start waits for one read.
		ds, err := e.Store.RouteDurations(context.Background(), key)
		if err != nil && !errors.Is(err, store.ErrClosed) {
			e.Log.Warn("reading a route's run times", zap.String("route", key), zap.Error(err))
		}
		rt.times = append(ds, rt.times...)
		rt.loaded = true
	}
	return slices.Clone(rt.times)
}

func (est *estimator) lookup(key string) *routeTimes {
	if est.routes == nil {
		est.routes = make(map[string]*routeTimes)
	}
	rt := est.routes[key]
	if rt == nil {
		if len(est.routes) >= maxEstimatedRoutes {
			return nil
		}
		rt = new(routeTimes)
		est.routes[key] = rt
	}
	return rt
}

// recordRunTime remembers how long a successful job of route key took, and writes the
// route's run times to the store at most every saveEvery.
func (e *Engine) recordRunTime(key string, d time.Duration, now time.Time) {
	e.routeTimes(key) // loaded first, so the save below keeps the older samples
	e.estimates.mu.Lock()
	rt := e.estimates.lookup(key)
	if rt == nil {
		e.estimates.mu.Unlock()
		return
	}
	rt.times = append(rt.times, d)
	if n := len(rt.times) - store.MaxRouteDurations; n > 0 {
		rt.times = slices.Delete(rt.times, 0, n)
	}
	rt.dirty = true
	var save []time.Duration
	if now.Sub(rt.saved) >= saveEvery {
		save, rt.dirty, rt.saved = slices.Clone(rt.times), false, now
	}
	e.estimates.mu.Unlock()
	if save != nil {
		e.saveRunTimes(key, save)
	}
}

func (e *Engine) saveRunTimes(key string, ds []time.Duration) {
	if err := e.Store.SaveRouteDurations(context.Background(), key, ds); err != nil && !errors.Is(err, store.ErrClosed) {
		e.Log.Warn("saving a route's run times", zap.String("route", key), zap.Error(err))
	}
}

// saveAllRunTimes writes every route's unsaved run times; the engine calls it when it closes.
func (e *Engine) saveAllRunTimes() {
	e.estimates.mu.Lock()
	pending := make(map[string][]time.Duration)
	for key, rt := range e.estimates.routes {
		if rt.dirty {
			pending[key] = slices.Clone(rt.times)
			rt.dirty = false
		}
	}
	e.estimates.mu.Unlock()
	for key, ds := range pending {
		e.saveRunTimes(key, ds)
	}
}

// estimate is a job's estimated percent and seconds left after running for elapsed, from the
// run times of earlier jobs of its route. ok is false without any history. The expected
// run time is the median; once a job outlives it, the 90th percentile; past that the percent
// creeps towards 99 and the ETA is unknown (eta < 0).
func estimate(times []time.Duration, elapsed time.Duration) (percent, eta float64, ok bool) {
	if len(times) == 0 {
		return 0, 0, false
	}
	sorted := slices.Clone(times)
	slices.Sort(sorted)
	expected := sorted[len(sorted)/2]
	if elapsed >= expected*95/100 {
		expected = max(expected, sorted[min(len(sorted)-1, len(sorted)*9/10)])
	}
	if expected <= 0 {
		return 0, 0, false
	}
	if elapsed < expected {
		percent = min(99, 100*elapsed.Seconds()/expected.Seconds())
		return math.Floor(percent), (expected - elapsed).Seconds(), true
	}
	// Overdue: approach 99% without reaching it, and admit the ETA is unknown.
	over := elapsed.Seconds()/expected.Seconds() - 1
	percent = 95 + 4*(1-math.Exp(-over))
	return math.Floor(percent), -1, true
}

// usuallyWithin reports whether nine in ten of the run times are shorter than d.
func usuallyWithin(times []time.Duration, d time.Duration) bool {
	longer := 0
	for _, t := range times {
		if t >= d {
			longer++
		}
	}
	return longer*10 <= len(times)
}

// followEstimates publishes estimated progress for a running job until ctx ends, the job
// gets a real report, or it finishes. It returns a function that stops it and waits.
func (e *Engine) followEstimates(ctx context.Context, id, key string, started time.Time, every time.Duration) (stop func()) {
	times := e.routeTimes(key)
	if len(times) == 0 || every <= 0 || usuallyWithin(times, every) {
		// No history, estimates off, or jobs of the route normally end before the first
		// estimate would be due: no goroutine, no timer (this is the fast-route common case).
		return func() {}
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	e.background.Add(1)
	go func() {
		defer e.background.Done()
		defer close(done)
		ticker := time.NewTicker(every)
		defer ticker.Stop()
		lastPercent, lastAt := -1.0, time.Time{}
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-ticker.C:
				percent, eta, ok := estimate(times, now.Sub(started))
				if !ok || (percent == lastPercent && now.Sub(lastAt) < refreshEvery) {
					continue
				}
				_, err := e.Store.Update(context.WithoutCancel(ctx), id, func(j *store.Job) error {
					if j.Progress != nil && !j.Progress.Estimated {
						return errReported
					}
					j.Progress = &store.Progress{Percent: &percent, Estimated: true}
					j.ETASeconds = nil
					if eta >= 0 {
						j.ETASeconds = &eta
					}
					return nil
				})
				if err != nil {
					return // reported for real, finished, gone, or the store is closing
				}
				e.Metrics().progressEvent(SourceEstimate)
				lastPercent, lastAt = percent, now
			}
		}
	}()
	return func() {
		cancel()
		<-done
	}
}

// errReported ends estimates for a job whose upstream reports progress itself.
var errReported = errors.New("the upstream reports progress itself")
