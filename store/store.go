package store

import (
	"context"
	"io"
	"net/http"
	"time"
)

// Store is what the rest of caddy-progress knows of job storage. Every method that changes a
// job returns only after the change is durable; its events reach subscribers after that.
//
// Methods taking a job id return ErrNotFound for an id that does not exist, has expired, or
// is not well formed.
type Store interface {
	// Create makes a job in state Queued (seq 1) or, when spec.IdempotencyKey is set and the
	// same owner used it within retention, returns that job with created false. The same key
	// with another fingerprint fails with ErrIdempotencyMismatch.
	Create(ctx context.Context, spec NewJob) (job *Job, created bool, err error)

	// Get returns the job's current document.
	Get(ctx context.Context, id string) (*Job, error)

	// Update changes a job that has not finished: mutate receives a copy of the current document
	// and changes it in place. The store then bumps seq, sets updated_at (and started_at,
	// finished_at, expires_at as the state implies) and appends the event. Returning ErrNoChange
	// from mutate leaves the job as it is, with no event. On a finished job Update returns
	// ErrFinished without calling mutate. mutate may run more than once, so it must only
	// change the job it is given.
	Update(ctx context.Context, id string, mutate func(*Job) error) (*Job, error)

	// NewResult starts receiving the body of a job's upstream response. Hand the writer to
	// Finish, or Discard it. It reads nothing: whether the job still exists is Finish's to
	// find out (ErrNotFound), so starting a job costs no extra read.
	NewResult(ctx context.Context, id string) (ResultWriter, error)

	// Finish ends a job in a terminal state, with the upstream response when there was one.
	// On a job that has already finished it returns ErrFinished and discards the result.
	Finish(ctx context.Context, id string, outcome Outcome) (*Job, error)

	// Cancel ends a job that has not finished as Canceled; on a finished job it changes
	// nothing. It reports whether this call changed the job.
	Cancel(ctx context.Context, id string) (job *Job, changed bool, err error)

	// Delete forgets a job, its events and its result. Subscribers see ErrNotFound.
	Delete(ctx context.Context, id string) error

	// List pages through jobs, newest first for an owner.
	List(ctx context.Context, q ListQuery) (ListPage, error)

	// Events returns up to limit stored events with seq greater than after, oldest first.
	// When events after `after` were compacted away, it returns the newest event alone.
	Events(ctx context.Context, id string, after uint64, limit int) ([]Event, error)

	// Subscribe follows a job from seq after: the stored events, then live ones. See
	// Subscription.
	Subscribe(ctx context.Context, id string, after uint64) (Subscription, error)

	// Wait returns the job's newest event as soon as its seq is greater than after: at once if
	// it already is. It returns ctx.Err() when ctx ends first, also on a finished job.
	Wait(ctx context.Context, id string, after uint64) (Event, error)

	// Result opens the stored upstream response of a finished job; ErrNoResult if there is
	// none. The caller closes Body.
	Result(ctx context.Context, id string) (*Result, error)

	// OwnerHash returns the keyed hash that binds jobs to owner (see Job.OwnedBy).
	OwnerHash(owner string) []byte

	// RouteDurations returns the recent run times of a route's jobs, oldest first, as last
	// saved by SaveRouteDurations, for estimating the progress of jobs that never report.
	RouteDurations(ctx context.Context, route string) ([]time.Duration, error)

	// SaveRouteDurations replaces a route's kept run times with the newest
	// MaxRouteDurations of ds.
	SaveRouteDurations(ctx context.Context, route string, ds []time.Duration) error

	// Secret returns 32 random bytes made once per store and kept in it, from which the server
	// derives keys such as the upstream callback tokens.
	Secret() []byte

	// Close stops the store: waiting calls and subscriptions end with ErrClosed.
	Close() error
}

// Inspector is what a store may offer operators besides the Store interface: the admin API
// and the metrics use it when the store has it.
type Inspector interface {
	// CountByState counts the jobs the store holds, by state.
	CountByState(ctx context.Context) (map[State]int, error)
	// SizeBytes is the space the store takes on disk.
	SizeBytes() (int64, error)
}

// NewJob describes a job to create.
type NewJob struct {
	// Owner binds the job to a caller (the evaluated `owner` placeholder); "" for nobody. The
	// store keeps only a keyed hash of it.
	Owner string
	// IdempotencyKey, when not empty, makes Create return the owner's existing job made with the
	// same key. Only a hash of it is kept.
	IdempotencyKey string
	// Fingerprint identifies the request (say, a hash of method, URI and body): the same key
	// with another fingerprint is ErrIdempotencyMismatch.
	Fingerprint []byte
	Request     RequestInfo
	// Route names the configured route, for estimates and metrics.
	Route string
	// BasePath is the jobs path the links are made under; default "/_jobs".
	BasePath string
	// Attrs are private values kept with the job (see Job.Attrs).
	Attrs map[string]string
	// QueuePosition, when above 0, is the job's place in its route's queue.
	QueuePosition int
	// Running creates the job already running (its upstream request starts at once), which
	// saves a write when nothing queues.
	Running bool
}

// Outcome is how a job ended.
type Outcome struct {
	// State must be terminal.
	State State
	// Response, when the upstream answered: its status and headers. Body holds its body
	// (nil for an empty one).
	Response *ResponseHead
	Body     ResultWriter
	// Error says why the job failed, if it did.
	Error *JobError
}

// ResponseHead is the status line and header of an upstream response.
type ResponseHead struct {
	Status int
	Header http.Header
}

// ResultWriter receives an upstream response body, spooled to disk past a small size so that a
// large body never sits in memory. Write fails with a *LimitError past the result size limit.
type ResultWriter interface {
	io.Writer
	// Discard drops what was written; it is safe to call after Finish.
	Discard() error
}

// Result is a stored upstream response.
type Result struct {
	Status int
	Header http.Header
	Size   int64
	Body   io.ReadCloser
}

// ListQuery selects a page of jobs.
type ListQuery struct {
	// Owner, when not nil, lists only the jobs bound to that owner, newest first. Nil lists all
	// jobs in id order (an operator's view).
	Owner *string
	// State, when not empty, lists only jobs in that state.
	State State
	// Limit is the page size; default 50, at most 1000.
	Limit int
	// Cursor is ListPage.Next of the previous page; "" for the first.
	Cursor string
}

// ListPage is one page of List; Next is "" on the last page.
type ListPage struct {
	Jobs []*Job
	Next string
}

// Subscription follows one job. Next returns events with strictly increasing seq: first the
// stored ones after the seq subscribed from, then live ones, with no gap and no duplicate at the
// seam. A subscriber that falls behind the live tail skips to the newest event. After the done
// event Next returns io.EOF. Next returns ErrNotFound if the job is deleted and ErrClosed when
// the store closes.
type Subscription interface {
	Next(ctx context.Context) (Event, error)
	// Poll returns the next event if one is there now, without waiting: ok false means none
	// yet, and Ready will be signalled once there may be. With Ready it lets a caller that
	// holds a subscription for long (an SSE stream) wait together with its own timer and
	// channels, with no context or goroutine per wait.
	Poll(ctx context.Context) (ev Event, ok bool, err error)
	// Ready is signalled (one buffered signal, never closed) on every change of the job.
	Ready() <-chan struct{}
	Close()
}

// Options tune Open. Zero values take the defaults named on each field.
type Options struct {
	// Retain is how long finished jobs, their events and results are kept. Default 24h.
	Retain time.Duration
	// OpenTimeout is how long Open waits for a file another process holds. Default 5s.
	OpenTimeout time.Duration
	// SweepInterval is how often retention runs. Default Retain/24, within [1s, 1m].
	SweepInterval time.Duration
	// MaxEventSize bounds an encoded job document. Default 64 KiB.
	MaxEventSize int
	// MaxDataSize bounds progress.data. Default 16 KiB.
	MaxDataSize int
	// MaxResultSize bounds a stored upstream body. Default 1 GiB.
	MaxResultSize int64
	// InlineResultSize is the largest body kept inside the database file; larger ones go to
	// files beside it. Default 64 KiB.
	InlineResultSize int
	// MaxEventsPerJob is how many events of one job are kept for replay; older ones are
	// compacted away (a resuming client then gets the current document). Default 1000.
	MaxEventsPerJob int
	// LiveEvents is how many recent events per watched job the live tail keeps; a subscriber
	// further behind skips to the newest. Default 64.
	LiveEvents int
	// MaxBatch bounds how many writes share one commit. Default 1024.
	MaxBatch int
	// JournalSize is the size of each of the two journal files beside the store file, which
	// take the progress reports of running jobs (see journal.go). Default 16 MiB; at least
	// 1 MiB and 4 × MaxEventSize. Below 0, there is no journal: every report is a bbolt
	// commit.
	JournalSize int64
	// CheckpointInterval is how often the journal's changes are copied into the store file.
	// Default 1s.
	CheckpointInterval time.Duration
	// ObserveCommit, when set, is told how long each commit took (the transaction with its
	// fsyncs) and how many writes it carried, for metrics. It runs on the commit goroutine,
	// so it must be quick.
	ObserveCommit func(took time.Duration, writes int)
}

// Default limits.
const (
	DefaultRetain           = 24 * time.Hour
	DefaultOpenTimeout      = 5 * time.Second
	DefaultMaxEventSize     = 64 << 10
	DefaultMaxDataSize      = 16 << 10
	DefaultMaxResultSize    = 1 << 30
	DefaultInlineResultSize = 64 << 10
	DefaultMaxEventsPerJob  = 1000
	DefaultLiveEvents       = 64
	DefaultMaxBatch         = 1024
	DefaultBasePath         = "/_jobs"
)

func (o Options) withDefaults() Options {
	if o.Retain <= 0 {
		o.Retain = DefaultRetain
	}
	if o.OpenTimeout <= 0 {
		o.OpenTimeout = DefaultOpenTimeout
	}
	if o.SweepInterval <= 0 {
		o.SweepInterval = min(max(o.Retain/24, time.Second), time.Minute)
	}
	if o.MaxEventSize <= 0 {
		o.MaxEventSize = DefaultMaxEventSize
	}
	if o.MaxDataSize <= 0 {
		o.MaxDataSize = DefaultMaxDataSize
	}
	if o.MaxResultSize <= 0 {
		o.MaxResultSize = DefaultMaxResultSize
	}
	if o.InlineResultSize <= 0 {
		o.InlineResultSize = DefaultInlineResultSize
	}
	if o.MaxEventsPerJob <= 0 {
		o.MaxEventsPerJob = DefaultMaxEventsPerJob
	}
	if o.LiveEvents <= 0 {
		o.LiveEvents = DefaultLiveEvents
	}
	if o.MaxBatch <= 0 {
		o.MaxBatch = DefaultMaxBatch
	}
	if o.JournalSize == 0 {
		o.JournalSize = DefaultJournalSize
	}
	if o.JournalSize > 0 {
		o.JournalSize = max(o.JournalSize, MinJournalSize, 4*int64(o.MaxEventSize))
	}
	if o.CheckpointInterval <= 0 {
		o.CheckpointInterval = DefaultCheckpointInterval
	}
	return o
}
