package store

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"
)

// This file exports, for Store implementations outside this package (store/redisstore), the
// parts of a store that do not depend on where jobs are kept: how a job's versions are made
// (seq, timestamps, limits, the encoded document and record), and the live feed that
// subscriptions and long-poll waiters read. Keeping one copy of them is what lets every
// implementation pass the same conformance suite (store/storetest).

// ErrUnavailable: the store's backend cannot be reached (a networked store whose server is
// down). The engine answers 503 store-unavailable; the caller may try again.
var ErrUnavailable = errors.New("store: backend unavailable")

// EndNotifier is implemented by stores that several processes share: a job this process runs
// may be ended (canceled, deleted) by another, and the process should then stop its upstream
// request. OnEndedElsewhere registers f, called with the id of every such job; call it once,
// before jobs start.
type EndNotifier interface {
	OnEndedElsewhere(f func(id string))
}

// Versions makes the versions of jobs under a store's options and secret.
type Versions struct {
	opts     Options
	ownerKey []byte
	idemKey  []byte
}

// NewVersions makes the versions of a store whose secret is secret. Zero options take their
// defaults.
func NewVersions(secret []byte, opts Options) *Versions {
	return &Versions{
		opts:     opts.withDefaults(),
		ownerKey: deriveKey(secret, "caddy-progress owner v1"),
		idemKey:  deriveKey(secret, "caddy-progress idempotency-key v1"),
	}
}

// Options returns the options with their defaults filled in.
func (v *Versions) Options() Options { return v.opts }

// OwnerHash is Store.OwnerHash.
func (v *Versions) OwnerHash(owner string) []byte { return keyedHash(v.ownerKey, owner) }

// Version is one new version of a job: the document, its stored record (document plus private
// fields, read back by DecodeRecord) and its event.
type Version struct {
	Job    *Job
	Record []byte
	Event  Event
}

// First makes the first version (seq 1) of the job spec asks for, created at now.
func (v *Versions) First(spec NewJob, now time.Time) (*Version, error) {
	fresh, err := freshJob(spec, now, v.ownerKey, v.idemKey)
	if err != nil {
		return nil, err
	}
	return v.version(nil, fresh, now)
}

// Next makes the version after prev: mutate gets prev and a copy of it to change. An error
// from mutate (ErrNoChange among them) is returned as it is.
func (v *Versions) Next(prev *Job, mutate func(prev, j *Job) error, now time.Time) (*Version, error) {
	j := prev.clone()
	if err := mutate(prev, j); err != nil {
		return nil, err
	}
	keepIdentity(prev, j)
	return v.version(prev, j, now)
}

func (v *Versions) version(prev, j *Job, now time.Time) (*Version, error) {
	c, err := prepareChange(&v.opts, prev, j, now)
	if err != nil {
		return nil, err
	}
	return &Version{Job: c.job, Record: c.rec, Event: c.ev}, nil
}

// Clone returns a deep copy of j, private fields included.
func Clone(j *Job) *Job { return j.clone() }

// DecodeRecord reads a record made by Versions.
func DecodeRecord(rec []byte) (*Job, error) { return decodeJob(rec) }

// IdempotencyIndex is the key under which a job is found again by its Idempotency-Key (owner
// hash and key hash), or nil for a job made without one.
func IdempotencyIndex(j *Job) []byte {
	if j.idemHash == nil {
		return nil
	}
	return idemKey(j.OwnerHash, j.idemHash)
}

// SameRequest reports whether spec asks for the job j was made for, as Idempotency-Key compares
// them.
func SameRequest(j *Job, spec NewJob) bool { return bytes.Equal(j.fingerprint, spec.Fingerprint) }

// ValidID reports whether id is well formed; a malformed id is no job (ErrNotFound).
func ValidID(id string) bool {
	_, ok := parseID(id)
	return ok
}

// StorableHeader drops the client's credentials from a response header before it is stored.
func StorableHeader(h http.Header) http.Header { return storableHeader(h) }

// CheckRouteName refuses a route name that cannot be stored (ErrInvalid).
func CheckRouteName(route string) error {
	_, err := routeKey(route)
	return err
}

// CheckOutcome refuses an Outcome that Finish must not store (ErrInvalid): a state that is not
// terminal, a body without a response, a status outside 100..999.
func CheckOutcome(out Outcome) error {
	switch {
	case !out.State.Terminal():
		return fmt.Errorf("%w: finish in non-terminal state %q", ErrInvalid, out.State)
	case out.Response == nil && out.Body != nil:
		return fmt.Errorf("%w: result body without a response", ErrInvalid)
	case out.Response != nil && (out.Response.Status < 100 || out.Response.Status > 999):
		return fmt.Errorf("%w: response status %d", ErrInvalid, out.Response.Status)
	}
	return nil
}

// Feed is the in-memory live tail of a store (see feed): publish committed events, and read
// them through subscriptions and waits.
type Feed struct{ f *feed }

// Topic is one watched job of a Feed.
type Topic struct{ t *topic }

// NewFeed makes a feed whose topics keep the newest liveEvents events.
func NewFeed(liveEvents int) *Feed { return &Feed{newFeed(liveEvents)} }

// Watch returns the topic of job id; every Watch needs an Unwatch. It fails with ErrClosed
// once the feed is closed.
func (f *Feed) Watch(id string) (*Topic, error) {
	t, err := f.f.watch(id)
	if err != nil {
		return nil, err
	}
	return &Topic{t}, nil
}

// Unwatch lets go of a topic.
func (f *Feed) Unwatch(id string, t *Topic) { f.f.unwatch(id, t.t) }

// Watched reports whether anyone watches job id.
func (f *Feed) Watched(id string) bool {
	f.f.mu.RLock()
	defer f.f.mu.RUnlock()
	return f.f.topics[id] != nil
}

// Publish hands a committed event to the watchers of its job. Events of one job must be
// published in seq order.
func (f *Feed) Publish(ev Event) { f.f.publish(ev) }

// Fail ends every watch of job id with err.
func (f *Feed) Fail(id string, err error) { f.f.fail(id, err) }

// FailAll ends every current watch with err (the backend went away); later watches start
// afresh.
func (f *Feed) FailAll(err error) {
	f.f.mu.Lock()
	defer f.f.mu.Unlock()
	for id, t := range f.f.topics {
		t.fail(err)
		delete(f.f.topics, id)
	}
}

// Close ends every watch with ErrClosed and refuses new ones.
func (f *Feed) Close() { f.f.close() }

// Subscribe follows job id on topic t from seq after: load reads stored events (see
// Store.Events), then the topic's live events follow with no gap at the seam, provided every
// event committed after t was watched is published to it. seen says the caller has already
// seen the job's done event, so the subscription ends at once. Closing the subscription
// unwatches t.
func (f *Feed) Subscribe(t *Topic, id string, after uint64, seen bool, load func(ctx context.Context, after uint64, limit int) ([]Event, error)) Subscription {
	sub := newSubscription(f.f, t.t, id, after, load)
	sub.ended = seen
	return sub
}

// Wait waits on topic t for an event past after, as Store.Wait does once it has found that the
// stored job is not past after yet.
func (f *Feed) Wait(ctx context.Context, t *Topic, after uint64) (Event, error) {
	wake := newWaker()
	t.t.addWaker(wake)
	defer t.t.removeWaker(wake)
	for {
		ev, ok, err := t.t.newest(after)
		if err != nil {
			return Event{}, err
		}
		if ok {
			return ev, nil
		}
		select {
		case <-wake:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}
