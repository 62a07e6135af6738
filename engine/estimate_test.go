package engine

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddy-progress/progress/store"
)

func TestEstimate(t *testing.T) {
	s := time.Second
	times := []time.Duration{8 * s, 10 * s, 10 * s, 12 * s, 30 * s}
	for _, tc := range []struct {
		elapsed time.Duration
		percent float64
		eta     float64
	}{
		{0, 0, 10},
		{2500 * time.Millisecond, 25, 7.5},
		{9 * s, 90, 1},
		{10 * s, 33, 20}, // outlived the median: the 90th percentile (30 s) takes over
		{29 * s, 96, 1},
		{31 * s, 95, -1}, // overdue: under 99%, ETA unknown
		{300 * s, 98, -1},
	} {
		p, eta, ok := estimate(times, tc.elapsed)
		if !ok || p != tc.percent || (eta-tc.eta) > 1e-9 || (tc.eta-eta) > 1e-9 {
			t.Errorf("after %v: %v%% eta %v ok %v, want %v%% eta %v", tc.elapsed, p, eta, ok, tc.percent, tc.eta)
		}
	}
	if _, _, ok := estimate(nil, time.Second); ok {
		t.Error("an estimate without history")
	}
	for _, e := range []time.Duration{0, s, 10 * s, 100 * s, 1000 * s} {
		if p, _, _ := estimate(times, e); p >= 99 || p < 0 {
			t.Errorf("after %v: %v%%: an estimate must stay within 0..99", e, p)
		}
	}
}

func TestRouteKey(t *testing.T) {
	for _, tc := range [][3]string{
		{"POST", "/reports/*", "POST /reports/*"},
		{"GET", "", "GET *"},
		{"BREW", "/pot", "OTHER /pot"}, // clients choose methods: unknown ones share a key
	} {
		if got := routeKey(tc[0], tc[1]); got != tc[2] {
			t.Errorf("routeKey(%q, %q) = %q, want %q", tc[0], tc[1], got, tc[2])
		}
	}
}

// TestEstimatedProgress runs a job on a route whose earlier jobs took 10 s, in a bubble with
// a fake clock: the job shows estimated percents and an ETA while it runs, a real report
// ends the estimates, and the job's own run time is kept for the next ones.
func TestEstimatedProgress(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		path := filepath.Join(t.TempDir(), "progress.db")
		st, err := store.Open(path, store.Options{})
		if err != nil {
			t.Fatal(err)
		}
		key := routeKey("POST", "/reports/*")
		if err := st.SaveRouteDurations(ctx, key, []time.Duration{10 * time.Second, 10 * time.Second, 10 * time.Second}); err != nil {
			t.Fatal(err)
		}
		e := New(st, nil, nil, nil)
		route := Route{Engine: e, Name: "/reports/*"}
		route.Init()
		api := &API{Engine: e}
		api.Init()
		f := &fixture{st: st, engine: e, route: &route, api: api}
		id, release := f.startHeld(t)

		time.Sleep(3500 * time.Millisecond)
		synctest.Wait()
		job, _ := st.Get(ctx, id)
		if p := job.Progress; p == nil || !p.Estimated || p.Percent == nil || *p.Percent != 30 || job.ETASeconds == nil || *job.ETASeconds != 7 {
			t.Fatalf("after 3.5 s of an expected 10: progress %+v eta %v", p, job.ETASeconds)
		}
		seq := job.Seq
		if seq > 5 {
			t.Errorf("seq %d after 3 s: estimates are published more than once a second", seq)
		}

		if w := f.report(t, id, e.Token(id), `{"stage": "real"}`); w.Code != http.StatusNoContent {
			t.Fatalf("report: %d %s", w.Code, w.Body)
		}
		time.Sleep(3 * time.Second)
		synctest.Wait()
		job, _ = st.Get(ctx, id)
		if p := job.Progress; p.Estimated || p.Stage != "real" || p.Percent != nil || job.Seq != seq+1 {
			t.Fatalf("after a real report: progress %+v seq %d (was %d): estimates went on", p, job.Seq, seq)
		}

		close(release)
		waitDone(t, st, id)
		e.Close()
		if ds, err := st.RouteDurations(ctx, key); err != nil || len(ds) != 4 || ds[3] != 6500*time.Millisecond {
			t.Fatalf("run times kept: %v %v, want the 6.5 s run added", ds, err)
		}
		st.Close()
	})
}

func TestUsuallyWithin(t *testing.T) {
	ms := time.Millisecond
	fast := []time.Duration{5 * ms, 7 * ms, 9 * ms, 12 * ms, 3 * ms, 4 * ms, 6 * ms, 8 * ms, 10 * ms, 2 * time.Second}
	if !usuallyWithin(fast, time.Second) {
		t.Error("one slow run in ten makes a fast route look slow")
	}
	if usuallyWithin(append(fast, 3*time.Second), time.Second) {
		t.Error("two slow runs in eleven: estimates needed")
	}
	if usuallyWithin([]time.Duration{10 * time.Second}, time.Second) {
		t.Error("a slow route looks fast")
	}
}
