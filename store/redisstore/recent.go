package redisstore

import (
	"sync"
	"time"

	"github.com/caddy-progress/progress/store"
)

// recentFor is how long a version stays in the recent set after this instance last wrote it:
// one set is retired, and the one before it forgotten, every recentFor, so a version lasts
// between one and two of them.
const recentFor = 30 * time.Second

// recentMax bounds the versions one set holds (a version is about a kilobyte: two sets hold
// some 40 MB at most); past it new versions are not kept, and their jobs are read from Redis
// before their next change, as without the set.
const recentMax = 20_000

// recent holds the newest version of the running jobs this instance wrote, so that the next
// change of such a job (a progress report, usually several a second) makes one round trip to
// Redis, the update script, instead of two. It is only a guess: the script stores a change
// only if the job is still at the seq and write mark the guess has, and every other outcome
// (another instance wrote the job meanwhile, the job is gone, the change was refused) reads
// the job from Redis and starts again, as if the guess had not been there.
type recent struct {
	mu      sync.Mutex
	now     map[string]version
	before  map[string]version
	retired time.Time // when before was made from now
}

// version is a job as this instance stored it, and the write mark it stored it with.
type version struct {
	job  *store.Job
	mark string
}

func newRecent() *recent {
	return &recent{now: make(map[string]version), before: make(map[string]version), retired: time.Now()}
}

// get returns the version of job id this instance wrote last and its write mark, or nil. The
// caller must not change the job.
func (r *recent) get(id string) (*store.Job, string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	v, ok := r.now[id]
	if !ok {
		v = r.before[id]
	}
	return v.job, v.mark
}

// put keeps j, which this instance just stored with write mark `mark`, as its job's newest
// version: until the job ends, or until nobody here has written it for a while. j must not
// change afterwards.
func (r *recent) put(j *store.Job, mark string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if t := time.Now(); t.Sub(r.retired) >= recentFor {
		r.before, r.now, r.retired = r.now, make(map[string]version), t
	}
	delete(r.before, j.ID)
	_, held := r.now[j.ID]
	if j.State.Terminal() || (!held && len(r.now) >= recentMax) {
		delete(r.now, j.ID)
		return
	}
	r.now[j.ID] = version{job: j, mark: mark}
}

// drop forgets job id's version.
func (r *recent) drop(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.now, id)
	delete(r.before, id)
}
