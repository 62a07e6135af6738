package redisstore

import (
	"fmt"
	"testing"
	"testing/synctest"
	"time"

	"github.com/caddy-progress/progress/store"
)

// got is the job of the version r holds for id, or nil.
func got(r *recent, id string) *store.Job {
	j, _ := r.get(id)
	return j
}

// TestRecentForgets: a version stays between one and two recentFor after its last write, a
// finished job's version goes at once, and a full set keeps no more.
func TestRecentForgets(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newRecent()
		running := func(id string) *store.Job { return &store.Job{ID: id, State: store.Running} }
		r.put(running("a"), "m")
		time.Sleep(recentFor)
		r.put(running("b"), "m") // retires the set holding a
		if got(r, "a") == nil || got(r, "b") == nil {
			t.Fatal("a version written less than two recentFor ago is gone")
		}
		r.put(running("a"), "m") // written again: back in the newest set
		time.Sleep(recentFor)
		r.put(running("c"), "m")
		if got(r, "a") == nil {
			t.Fatal("a version written again recentFor ago is gone")
		}
		time.Sleep(recentFor)
		r.put(running("d"), "m")
		if got(r, "b") != nil {
			t.Fatal("a version last written two recentFor ago is still kept")
		}
		r.put(&store.Job{ID: "d", State: store.Succeeded}, "m")
		if got(r, "d") != nil {
			t.Fatal("a finished job's version is kept")
		}
		r.drop("a")
		if got(r, "a") != nil {
			t.Fatal("a dropped version is kept")
		}
		for i := range recentMax + 10 {
			r.put(running(fmt.Sprint("job", i)), "m")
		}
		if n := len(r.now); n != recentMax {
			t.Fatalf("a full set holds %d versions, want %d", n, recentMax)
		}
		newer := running("job0")
		r.put(newer, "newer")
		if j, mark := r.get("job0"); j != newer || mark != "newer" {
			t.Fatal("a full set does not take the newer version of a job it holds")
		}
	})
}
