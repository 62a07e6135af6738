package store

import (
	"crypto/subtle"
	"encoding/json"
	"time"
)

// State is where a job is in its life.
type State string

// The states of a job. Succeeded, Failed and Canceled are terminal: nothing changes after them.
const (
	Queued    State = "queued"
	Running   State = "running"
	Succeeded State = "succeeded"
	Failed    State = "failed"
	Canceled  State = "canceled"
)

// Terminal reports whether no change can follow s.
func (s State) Terminal() bool {
	return s == Succeeded || s == Failed || s == Canceled
}

// Valid reports whether s is one of the five states.
func (s State) Valid() bool {
	return s == Queued || s == Running || s.Terminal()
}

// Error codes of a failed job that the store itself sets.
const (
	// CodeInterrupted: the process that ran the job's upstream request ended before it did.
	CodeInterrupted = "interrupted"
	// CodeResultTooLarge: the upstream's body passed the result size limit.
	CodeResultTooLarge = "result_too_large"
)

// Job is the job document of the client API (DESIGN.md section 3). Its JSON form is public
// interface; the fields tagged "-" are private to the server and never leave it.
type Job struct {
	ID            string        `json:"id"`
	State         State         `json:"state"`
	Seq           uint64        `json:"seq"`
	Progress      *Progress     `json:"progress,omitempty"`
	QueuePosition *int          `json:"queue_position,omitempty"`
	ETASeconds    *float64      `json:"eta_seconds,omitempty"`
	Request       RequestInfo   `json:"request"`
	Response      *ResponseInfo `json:"response,omitempty"`
	Error         *JobError     `json:"error,omitempty"`
	CreatedAt     time.Time     `json:"created_at"`
	StartedAt     *time.Time    `json:"started_at,omitempty"`
	UpdatedAt     time.Time     `json:"updated_at"`
	FinishedAt    *time.Time    `json:"finished_at,omitempty"`
	ExpiresAt     *time.Time    `json:"expires_at,omitempty"`
	Links         Links         `json:"links"`

	// OwnerHash is the keyed hash of the owner the job is bound to (see Store.OwnerHash);
	// never the owner value itself, which is often an Authorization header.
	OwnerHash []byte `json:"-"`
	// Route names the configured route that made the job, for per-route estimates and metrics.
	Route string `json:"-"`
	// Attrs carries small private values other parts of the server keep with the job (a trace
	// context, say). The store keeps them and never interprets them.
	Attrs map[string]string `json:"-"`

	idemHash    []byte // keyed hash of the Idempotency-Key, for removing its index entry
	fingerprint []byte // what the Idempotency-Key was first used for
}

// OwnedBy reports, in constant time, whether the job is bound to the owner with hash h.
func (j *Job) OwnedBy(h []byte) bool {
	return subtle.ConstantTimeCompare(j.OwnerHash, h) == 1
}

// Progress is what the upstream, or the estimator, says about how far a job has got.
type Progress struct {
	Percent   *float64        `json:"percent,omitempty"`
	Current   *float64        `json:"current,omitempty"`
	Total     *float64        `json:"total,omitempty"`
	Stage     string          `json:"stage,omitempty"`
	Message   string          `json:"message,omitempty"`
	Data      json.RawMessage `json:"data,omitempty"`
	Estimated bool            `json:"estimated,omitempty"`
}

// RequestInfo names the request that made the job. Headers are deliberately absent: the
// client's secrets (Authorization, Cookie) must never reach the disk.
type RequestInfo struct {
	Method string `json:"method"`
	URI    string `json:"uri"`
}

// ResponseInfo sums up the upstream's response; the whole response is kept as the job's result.
type ResponseInfo struct {
	Status        int    `json:"status"`
	ContentType   string `json:"content_type,omitempty"`
	ContentLength int64  `json:"content_length"`
}

// JobError says why a job failed without, or besides, an upstream response.
type JobError struct {
	Code    string `json:"code"`
	Message string `json:"message,omitempty"`
}

// Links are the job's URLs, made from the jobs path the job was created under.
type Links struct {
	Self   string `json:"self"`
	Events string `json:"events"`
	Result string `json:"result"`
	Cancel string `json:"cancel"`
}

func linksFor(basePath, id string) Links {
	self := basePath + "/" + id
	return Links{Self: self, Events: self + "/events", Result: self + "/result", Cancel: self + "/cancel"}
}

// clone returns a deep copy, so that a caller's mutation never reaches a copy the store holds.
func (j *Job) clone() *Job {
	c := *j
	if j.Progress != nil {
		p := *j.Progress
		p.Percent, p.Current, p.Total = cloneFloat(p.Percent), cloneFloat(p.Current), cloneFloat(p.Total)
		p.Data = cloneBytes(p.Data)
		c.Progress = &p
	}
	if j.QueuePosition != nil {
		q := *j.QueuePosition
		c.QueuePosition = &q
	}
	c.ETASeconds = cloneFloat(j.ETASeconds)
	if j.Response != nil {
		r := *j.Response
		c.Response = &r
	}
	if j.Error != nil {
		e := *j.Error
		c.Error = &e
	}
	c.StartedAt, c.FinishedAt, c.ExpiresAt = cloneTime(j.StartedAt), cloneTime(j.FinishedAt), cloneTime(j.ExpiresAt)
	c.OwnerHash = cloneBytes(j.OwnerHash)
	c.idemHash, c.fingerprint = cloneBytes(j.idemHash), cloneBytes(j.fingerprint)
	if j.Attrs != nil {
		c.Attrs = make(map[string]string, len(j.Attrs))
		for k, v := range j.Attrs {
			c.Attrs[k] = v
		}
	}
	return &c
}

func cloneFloat(f *float64) *float64 {
	if f == nil {
		return nil
	}
	v := *f
	return &v
}

func cloneBytes(b []byte) []byte {
	if b == nil {
		return nil
	}
	return append([]byte(nil), b...)
}

func cloneTime(t *time.Time) *time.Time {
	if t == nil {
		return nil
	}
	v := *t
	return &v
}

// EventKind is the SSE event name of an event.
type EventKind string

// The two kinds of event (DESIGN.md section 3, Server-Sent Events).
const (
	KindProgress EventKind = "progress"
	KindDone     EventKind = "done"
)

// Event is one change of a job: the job's seq after the change and the whole document, encoded
// once. Data is shared between all readers and must not be modified.
type Event struct {
	JobID string
	Seq   uint64
	Kind  EventKind
	Data  []byte
	// At is when the store took the change, for measuring how long events take to reach
	// subscribers; zero for events read back from storage.
	At time.Time
}

// Done reports whether e is the job's last event.
func (e Event) Done() bool { return e.Kind == KindDone }
