package store

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	bolt "go.etcd.io/bbolt"
)

// loadJob reads a job record inside tx.
func (s *boltStore) loadJob(tx *bolt.Tx, id rawID) (*Job, error) {
	v := tx.Bucket(bucketJobs).Get(id[:])
	if v == nil {
		return nil, ErrNotFound
	}
	return decodeJob(v)
}

// change is one new version of a job, encoded and ready to store: prepare makes it outside
// the commit, put stores it inside.
type change struct {
	id   rawID
	prev *Job // nil for a new job
	job  *Job
	rec  []byte // the job record
	ev   Event
	evV  []byte // the stored event
}

// prepare makes j the next version of prev (nil for a new job): it sets seq and timestamps,
// checks the limits, and encodes the document, the record and the event. It reads nothing, so
// it runs before the write is queued.
func (s *boltStore) prepare(prev, j *Job, now time.Time) (*change, error) {
	return prepareChange(&s.opts, prev, j, now)
}

// prepareChange is prepare under any store's options (see Versions for stores outside this
// package).
func prepareChange(opts *Options, prev, j *Job, now time.Time) (*change, error) {
	if !j.State.Valid() {
		return nil, fmt.Errorf("%w: unknown state %q", ErrInvalid, j.State)
	}
	if prev != nil && prev.State == Running && j.State == Queued {
		return nil, fmt.Errorf("%w: a running job cannot go back to queued", ErrInvalid)
	}
	if j.Progress != nil && len(j.Progress.Data) > opts.MaxDataSize && !sameData(prev, j) {
		return nil, &LimitError{Limit: "max_data_size", Max: int64(opts.MaxDataSize), Size: int64(len(j.Progress.Data))}
	}
	j.Seq = 1
	if prev != nil {
		j.Seq = prev.Seq + 1
	}
	j.UpdatedAt = now
	if j.State != Queued {
		j.QueuePosition = nil
		if j.StartedAt == nil && j.State == Running {
			j.StartedAt = &now
		}
	}
	kind := KindProgress
	if j.State.Terminal() {
		kind = KindDone
		expires := now.Add(opts.Retain)
		j.FinishedAt, j.ExpiresAt, j.ETASeconds = &now, &expires, nil
	}
	doc, err := encodeDoc(opts, j)
	if err != nil {
		return nil, err
	}
	rec, err := encodeJob(j, doc)
	if err != nil {
		return nil, err
	}
	id, ok := parseID(j.ID)
	if !ok {
		return nil, fmt.Errorf("%w: malformed job id %q", ErrInvalid, j.ID)
	}
	return &change{
		id: id, prev: prev, job: j, rec: rec,
		ev: Event{JobID: j.ID, Seq: j.Seq, Kind: kind, Data: doc, At: now}, evV: encodeEvent(kind, doc),
	}, nil
}

// appendBuckets are the trees keyed in creation or deadline order. (Not owners: each owner
// has a right edge of its own in the middle of the tree.)
var appendBuckets = [][]byte{bucketEvents, bucketActive, bucketResults, bucketExpiry}

// appendFill is how full bbolt fills their pages when it splits a node.
const appendFill = 0.9

// fillAppendBuckets sets appendFill on the append buckets of tx: these trees only grow at
// their right edge (keys lead with an id or a time), so bbolt's default half-full split only
// leaves half-empty pages behind to be written again. Not the jobs tree: Finish grows records
// that are still on recent pages. (bbolt keeps FillPercent per transaction's bucket handle.)
func fillAppendBuckets(tx *bolt.Tx) {
	for _, name := range appendBuckets {
		tx.Bucket(name).FillPercent = appendFill
	}
}

// put stores a prepared change inside tx: the record, its event, the compaction of the event
// log, and the indexes. It may run more than once for one change (see op).
func (s *boltStore) put(tx *bolt.Tx, c *change) error {
	fillAppendBuckets(tx)
	if err := tx.Bucket(bucketJobs).Put(c.id[:], c.rec); err != nil {
		return err
	}
	if err := s.appendEvent(tx.Bucket(bucketEvents), c.id, c.job.Seq, c.evV); err != nil {
		return err
	}
	return s.index(tx, c.prev, c.job, c.id)
}

// appendEvent stores a job's event of seq and compacts its log: the log keeps the newest
// MaxEventsPerJob events (withPending reads the journal's changes by the same rule).
func (s *boltStore) appendEvent(events *bolt.Bucket, id rawID, seq uint64, v []byte) error {
	if err := events.Put(eventKey(id, seq), v); err != nil {
		return err
	}
	if keep := uint64(s.opts.MaxEventsPerJob); seq > keep {
		return events.Delete(eventKey(id, seq-keep))
	}
	return nil
}

// write prepares and stores j as the next version of prev inside tx, for the writes that read
// the job inside the transaction (recovery, and jobs that are not live).
func (s *boltStore) write(tx *bolt.Tx, prev, j *Job, now time.Time) (Event, error) {
	c, err := s.prepare(prev, j, now)
	if err != nil {
		return Event{}, err
	}
	return c.ev, s.put(tx, c)
}

// sameData reports whether a change leaves progress.data as it was: a limit applies to what a
// change brings, not to what an earlier, larger limit let in.
func sameData(prev, j *Job) bool {
	return prev != nil && prev.Progress != nil && j.Progress != nil && bytes.Equal(prev.Progress.Data, j.Progress.Data)
}

// keptOnTrim bounds the message and URI of a job that had to be trimmed to end.
const keptOnTrim = 1024

// encodeDoc encodes the job document within max_event_size. A job must always be able to end,
// even one whose last progress filled the limit, or whose limit was lowered since: a terminal
// document that is too large loses its progress, then long strings are cut, rather than the
// job staying unfinished for ever.
func encodeDoc(opts *Options, j *Job) ([]byte, error) {
	trims := []func(){
		func() { j.Progress = nil },
		func() {
			if j.Error != nil {
				j.Error.Message = truncate(j.Error.Message, keptOnTrim)
			}
			j.Request.URI = truncate(j.Request.URI, keptOnTrim)
		},
	}
	for i := 0; ; i++ {
		doc, err := json.Marshal(j)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		if len(doc) <= opts.MaxEventSize {
			return doc, nil
		}
		if !j.State.Terminal() || i == len(trims) {
			return nil, &LimitError{Limit: "max_event_size", Max: int64(opts.MaxEventSize), Size: int64(len(doc))}
		}
		trims[i]()
	}
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return strings.ToValidUTF8(s[:n], "") + "…"
}

// index keeps the active, expiry, owner and idempotency indexes in step with a job's change.
func (s *boltStore) index(tx *bolt.Tx, prev, j *Job, id rawID) error {
	if prev != nil && prev.State == j.State {
		return nil
	}
	state := []byte{stateByte(j.State)}
	if err := tx.Bucket(bucketOwners).Put(ownerKey(j.OwnerHash, j.CreatedAt, id), state); err != nil {
		return err
	}
	if prev == nil {
		if j.idemHash != nil {
			if err := tx.Bucket(bucketIdem).Put(idemKey(j.OwnerHash, j.idemHash), id[:]); err != nil {
				return err
			}
		}
	}
	if !j.State.Terminal() {
		return tx.Bucket(bucketActive).Put(id[:], nil)
	}
	if err := tx.Bucket(bucketActive).Delete(id[:]); err != nil {
		return err
	}
	return tx.Bucket(bucketExpiry).Put(expiryKey(*j.ExpiresAt, id), nil)
}

// stateByte is a job's state as the owner index stores it, so listings filter without
// decoding job records.
func stateByte(s State) byte {
	switch s {
	case Queued:
		return 'q'
	case Running:
		return 'r'
	case Succeeded:
		return 's'
	case Failed:
		return 'f'
	}
	return 'c'
}

// freshJob makes the document of a job spec asks for, created at now, before its first
// version is prepared. ownerKey and idemKey are the keys of the owner and Idempotency-Key hashes.
func freshJob(spec NewJob, now time.Time, ownerKey, idemKey []byte) (*Job, error) {
	if spec.Request.Method == "" {
		return nil, fmt.Errorf("%w: request method missing", ErrInvalid)
	}
	base := spec.BasePath
	if base == "" {
		base = DefaultBasePath
	}
	_, idText := newID(now)
	fresh := &Job{
		ID: idText, State: Queued, CreatedAt: now, Request: spec.Request, Links: linksFor(base, idText),
		OwnerHash: keyedHash(ownerKey, spec.Owner), Route: spec.Route, Attrs: spec.Attrs,
		fingerprint: cloneBytes(spec.Fingerprint),
	}
	if spec.Running {
		if spec.QueuePosition > 0 {
			return nil, fmt.Errorf("%w: a running job has no queue position", ErrInvalid)
		}
		fresh.State = Running
	}
	if spec.QueuePosition > 0 {
		position := spec.QueuePosition
		fresh.QueuePosition = &position
	}
	if spec.IdempotencyKey != "" {
		fresh.idemHash = keyedHash(idemKey, spec.IdempotencyKey)
	}
	return fresh, nil
}

func (s *boltStore) Create(ctx context.Context, spec NewJob) (*Job, bool, error) {
	// The creation time is taken here, not at the commit, because the id carries it.
	now := time.Now().UTC()
	fresh, err := freshJob(spec, now, s.ownerKey, s.idemKey)
	if err != nil {
		return nil, false, err
	}
	j := fresh.clone()
	c, err := s.prepare(nil, j, now)
	if err != nil {
		return nil, false, err
	}
	// The job is live before its commit, locked until the commit ends: nobody can know its id
	// before Create returns, except by listing, and a change found that way waits here.
	lj := &liveJob{}
	lj.mu.Lock()
	defer lj.mu.Unlock()
	s.live.add(c.id, lj)
	var (
		existing *Job
		created  bool
	)
	apply := func(tx *bolt.Tx) error {
		existing, created = nil, false
		if fresh.idemHash != nil {
			if eid := tx.Bucket(bucketIdem).Get(idemKey(fresh.OwnerHash, fresh.idemHash)); eid != nil {
				var rid rawID
				copy(rid[:], eid)
				prev, err := s.loadJob(tx, rid)
				if err != nil {
					return err
				}
				if !bytes.Equal(prev.fingerprint, fresh.fingerprint) {
					return ErrIdempotencyMismatch
				}
				existing = prev
				return nil
			}
		}
		if err := s.put(tx, c); err != nil {
			return err
		}
		created = true
		return nil
	}
	published := func() {
		if created {
			if !j.State.Terminal() {
				lj.committed.Store(j)
			}
			s.feed.publish(c.ev)
		}
	}
	if err := s.commits.do(apply, published); err != nil || !created {
		s.live.remove(c.id, lj)
		if err != nil {
			return nil, false, err
		}
		return s.newest(existing), false, nil
	}
	if j.State.Terminal() {
		s.live.remove(c.id, lj)
	} else {
		lj.job = j
	}
	return j.clone(), true, nil
}

func (s *boltStore) Get(ctx context.Context, id string) (*Job, error) {
	rid, ok := parseID(id)
	if !ok {
		return nil, ErrNotFound
	}
	if j := s.live.committed(rid); j != nil {
		return j.clone(), nil
	}
	pend := s.journal.pendingOf(rid) // before the read: see journal.go
	var j *Job
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		j, err = s.loadJob(tx, rid)
		return err
	})
	if err != nil {
		return nil, err
	}
	return newestOf(j, pend), nil
}

// change runs a read-modify-write of one job as a group-committed write: mutate sees the
// current document (prev) and changes a copy of it (j). It is the one path by which an existing
// job changes. extra, if not nil, runs inside the transaction that stores the change (Finish
// stores the result record there). committed, if not nil, runs after the commit and before the
// event is published.
//
// A live job (not finished, made by this process) is read from memory and encoded before the
// write is queued; any other job is read inside the transaction, as there is nothing to
// serialise its changes against but the transaction itself.
func (s *boltStore) change(id string, mutate func(prev, j *Job) error, extra func(tx *bolt.Tx) error, committed func()) (*Job, bool, error) {
	rid, ok := parseID(id)
	if !ok {
		return nil, false, ErrNotFound
	}
	if lj := s.live.get(rid); lj != nil {
		lj.mu.Lock()
		defer lj.mu.Unlock()
		if lj.job != nil {
			return s.changeLive(rid, lj, mutate, extra, committed)
		}
		// It finished or went while this call waited: the store has the rest.
	}
	var (
		job     *Job
		changed bool
		ev      Event
	)
	apply := func(tx *bolt.Tx) error {
		job, changed = nil, false
		prev, err := s.loadJob(tx, rid)
		if err != nil {
			return err
		}
		j := prev.clone()
		switch err := mutate(prev, j); {
		case errors.Is(err, ErrNoChange):
			job = prev
			return nil
		case err != nil:
			return err
		}
		keepIdentity(prev, j)
		if ev, err = s.write(tx, prev, j, time.Now().UTC()); err != nil {
			return err
		}
		if extra != nil {
			if err := extra(tx); err != nil {
				return err
			}
		}
		job, changed = j, true
		return nil
	}
	published := func() {
		if changed {
			if committed != nil {
				committed()
			}
			s.feed.publish(ev)
		}
	}
	if err := s.commits.do(apply, published); err != nil {
		return nil, false, err
	}
	return job.clone(), changed, nil
}

// changeLive is change for a live job; the caller holds lj.mu.
func (s *boltStore) changeLive(rid rawID, lj *liveJob, mutate func(prev, j *Job) error, extra func(tx *bolt.Tx) error, committed func()) (*Job, bool, error) {
	prev := lj.job
	j := prev.clone()
	switch err := mutate(prev, j); {
	case errors.Is(err, ErrNoChange):
		return prev.clone(), false, nil
	case err != nil:
		return nil, false, err
	}
	keepIdentity(prev, j)
	c, err := s.prepare(prev, j, time.Now().UTC())
	if err != nil {
		return nil, false, err
	}
	published := func() {
		if !j.State.Terminal() {
			lj.committed.Store(j)
		}
		if committed != nil {
			committed()
		}
		s.feed.publish(c.ev)
	}
	// Readers go to the file while the change is in flight: once it is committed, a reader of
	// the event log can see it before it is published, and must not then read the version
	// before it from memory.
	lj.committed.Store(nil)
	if s.journal.takes(prev, j, extra) {
		err = s.journalCommits.wait(&op{change: c, published: published, result: make(chan error, 1)})
	} else {
		// The job's journaled changes that bbolt may not have yet go first, so that its
		// event log has no gap.
		earlier := entriesOf(s.journal.pendingOf(rid))
		err = s.commits.do(func(tx *bolt.Tx) error {
			if err := s.applyJournaled(tx, earlier); err != nil {
				return err
			}
			if err := s.put(tx, c); err != nil {
				return err
			}
			if extra != nil {
				return extra(tx)
			}
			return nil
		}, published)
	}
	if err != nil {
		lj.committed.Store(prev)
		return nil, false, err
	}
	if j.State.Terminal() {
		s.live.remove(rid, lj)
	} else {
		lj.job = j
	}
	return j.clone(), true, nil
}

// keepIdentity undoes a mutator's change of what identifies a job.
func keepIdentity(prev, j *Job) {
	j.ID, j.Request, j.Links, j.CreatedAt = prev.ID, prev.Request, prev.Links, prev.CreatedAt
	j.OwnerHash, j.idemHash, j.fingerprint = prev.OwnerHash, prev.idemHash, prev.fingerprint
}

func (s *boltStore) Update(ctx context.Context, id string, mutate func(*Job) error) (*Job, error) {
	job, _, err := s.change(id, func(prev, j *Job) error {
		if prev.State.Terminal() {
			return ErrFinished
		}
		return mutate(j)
	}, nil, nil)
	return job, err
}

func (s *boltStore) Cancel(ctx context.Context, id string) (*Job, bool, error) {
	return s.change(id, func(prev, j *Job) error {
		if prev.State.Terminal() {
			return ErrNoChange
		}
		j.State = Canceled
		return nil
	}, nil, nil)
}

func (s *boltStore) Finish(ctx context.Context, id string, out Outcome) (*Job, error) {
	var rw *resultWriter
	if out.Body != nil {
		var ok bool
		if rw, ok = out.Body.(*resultWriter); !ok || rw.store != s || rw.id != id {
			return nil, fmt.Errorf("%w: result writer from another store or job", ErrInvalid)
		}
	}
	if !out.State.Terminal() {
		rw.Discard()
		return nil, fmt.Errorf("%w: finish in non-terminal state %q", ErrInvalid, out.State)
	}
	if out.Response == nil && rw != nil {
		rw.Discard()
		return nil, fmt.Errorf("%w: result body without a response", ErrInvalid)
	}
	var (
		head   resultHead
		inline []byte
	)
	if out.Response != nil {
		if out.Response.Status < 100 || out.Response.Status > 999 {
			rw.Discard()
			return nil, fmt.Errorf("%w: response status %d", ErrInvalid, out.Response.Status)
		}
		head = resultHead{Status: out.Response.Status, Header: storableHeader(out.Response.Header)}
		if rw != nil {
			var err error
			if inline, head.File, err = rw.seal(); err != nil {
				rw.Discard()
				return nil, err
			}
			head.Size = rw.size
		}
	}
	var (
		result []byte
		extra  func(tx *bolt.Tx) error
	)
	if out.Response != nil {
		var err error
		if result, err = encodeResult(head, inline); err != nil {
			rw.Discard()
			return nil, err
		}
		rid, _ := parseID(id)
		extra = func(tx *bolt.Tx) error { return tx.Bucket(bucketResults).Put(rid[:], result) }
	}
	job, _, err := s.change(id, func(prev, j *Job) error {
		if prev.State.Terminal() {
			return ErrFinished
		}
		j.State, j.Error = out.State, out.Error
		if out.Response != nil {
			j.Response = &ResponseInfo{Status: head.Status, ContentType: head.Header.Get("Content-Type"), ContentLength: head.Size}
		}
		return nil
	}, extra, nil)
	if err != nil {
		rw.Discard()
		return nil, err
	}
	if rw != nil {
		rw.settled = true
	}
	return job, nil
}

func (s *boltStore) Delete(ctx context.Context, id string) error {
	rid, ok := parseID(id)
	if !ok {
		return ErrNotFound
	}
	// A live job's changes are serialised by its entry: a change in flight commits first, and
	// none can follow the deletion.
	lj := s.live.get(rid)
	if lj != nil {
		lj.mu.Lock()
		defer lj.mu.Unlock()
	}
	var trash string
	if lj != nil {
		lj.committed.Store(nil) // readers go to the file while the deletion is in flight
	}
	err := s.commits.do(func(tx *bolt.Tx) error {
		var err error
		trash, err = s.deleteJob(tx, rid)
		return err
	}, func() { s.feed.fail(id, ErrNotFound) })
	if err != nil {
		if lj != nil && lj.job != nil {
			lj.committed.Store(lj.job)
		}
		restoreTrash(trash)
		return err
	}
	if lj != nil {
		s.live.remove(rid, lj)
	}
	return removeIfExists(trash)
}

// deleteJob removes a job, its events, its result and its index entries. A result file is
// moved to a trash name (returned) for the caller to remove after the commit, or to put back if
// the commit fails; a crash before the commit is undone by Open.
func (s *boltStore) deleteJob(tx *bolt.Tx, id rawID) (trash string, err error) {
	j, err := s.loadJob(tx, id)
	if err != nil {
		return "", err
	}
	if err := tx.Bucket(bucketJobs).Delete(id[:]); err != nil {
		return "", err
	}
	// Collect, then delete: deleting under a moving bbolt cursor can skip keys.
	var keys [][]byte
	c := tx.Bucket(bucketEvents).Cursor()
	for k, _ := c.Seek(eventKey(id, 0)); k != nil && bytes.HasPrefix(k, id[:]); k, _ = c.Next() {
		keys = append(keys, k)
	}
	for _, k := range keys {
		if err := tx.Bucket(bucketEvents).Delete(k); err != nil {
			return "", err
		}
	}
	results := tx.Bucket(bucketResults)
	file := ""
	if v := results.Get(id[:]); v != nil {
		if head, _, err := decodeResult(v); err == nil {
			file = head.File
		}
	}
	if err := results.Delete(id[:]); err != nil {
		return "", err
	}
	if err := tx.Bucket(bucketOwners).Delete(ownerKey(j.OwnerHash, j.CreatedAt, id)); err != nil {
		return "", err
	}
	if j.idemHash != nil {
		idem := tx.Bucket(bucketIdem)
		k := idemKey(j.OwnerHash, j.idemHash)
		if bytes.Equal(idem.Get(k), id[:]) {
			if err := idem.Delete(k); err != nil {
				return "", err
			}
		}
	}
	if err := tx.Bucket(bucketActive).Delete(id[:]); err != nil {
		return "", err
	}
	if j.ExpiresAt != nil {
		if err := tx.Bucket(bucketExpiry).Delete(expiryKey(*j.ExpiresAt, id)); err != nil {
			return "", err
		}
	}
	if file == "" {
		return "", nil
	}
	return s.trashResult(file)
}

const (
	defaultListLimit = 50
	maxListLimit     = 1000
)

func (s *boltStore) List(ctx context.Context, q ListQuery) (ListPage, error) {
	limit := q.Limit
	if limit <= 0 {
		limit = defaultListLimit
	}
	limit = min(limit, maxListLimit)
	if q.State != "" && !q.State.Valid() {
		return ListPage{}, fmt.Errorf("%w: unknown state %q", ErrInvalid, q.State)
	}
	cursor, err := idEncoding.DecodeString(q.Cursor)
	if err != nil {
		return ListPage{}, fmt.Errorf("%w: malformed cursor", ErrInvalid)
	}
	var page ListPage
	err = s.view(func(tx *bolt.Tx) error {
		if q.Owner != nil {
			return s.listOwner(tx, s.OwnerHash(*q.Owner), q.State, cursor, limit, &page)
		}
		return s.listAll(tx, q.State, cursor, limit, &page)
	})
	for i, j := range page.Jobs {
		page.Jobs[i] = s.newest(j)
	}
	return page, err
}

// newest returns the newest version of a job read from bbolt, which may be older than the
// one in memory (a running job whose progress is in the journal).
func (s *boltStore) newest(j *Job) *Job {
	if j.State != Running {
		return j // the journal only holds progress of running jobs
	}
	rid, _ := parseID(j.ID)
	if live := s.live.committed(rid); live != nil && live.Seq > j.Seq {
		return live.clone()
	}
	return newestOf(j, s.journal.pendingOf(rid))
}

// listOwner walks the owner index newest first; cursor is the created‖id suffix of the last
// key of the previous page.
func (s *boltStore) listOwner(tx *bolt.Tx, owner []byte, state State, cursor []byte, limit int, page *ListPage) error {
	// Position on the first key past the page's start, then step back onto the start: the
	// cursor key itself is the last of the previous page; with no cursor, start past the
	// owner's newest key.
	start := cursor
	if len(start) == 0 {
		start = bytes.Repeat([]byte{0xff}, timeLen+idLen)
	} else if len(start) != timeLen+idLen {
		return fmt.Errorf("%w: malformed cursor", ErrInvalid)
	}
	c := tx.Bucket(bucketOwners).Cursor()
	var k, v []byte
	if k, _ = c.Seek(append(append([]byte(nil), owner...), start...)); k == nil {
		k, v = c.Last()
	} else {
		k, v = c.Prev()
	}
	var lastKey []byte
	for ; k != nil && bytes.HasPrefix(k, owner); k, v = c.Prev() {
		if state != "" && (len(v) != 1 || v[0] != stateByte(state)) {
			continue
		}
		if len(page.Jobs) == limit {
			page.Next = idEncoding.EncodeToString(lastKey[hashLen:])
			return nil
		}
		id, err := decodeOwnerKey(k)
		if err != nil {
			return err
		}
		j, err := s.loadJob(tx, id)
		if err != nil {
			return err
		}
		page.Jobs = append(page.Jobs, j)
		lastKey = append(lastKey[:0], k...)
	}
	return nil
}

// listAll walks every job in id order; cursor is the last id of the previous page.
func (s *boltStore) listAll(tx *bolt.Tx, state State, cursor []byte, limit int, page *ListPage) error {
	c := tx.Bucket(bucketJobs).Cursor()
	k, v := c.First()
	if len(cursor) > 0 {
		k, v = c.Seek(cursor)
		if bytes.Equal(k, cursor) {
			k, v = c.Next()
		}
	}
	for ; k != nil; k, v = c.Next() {
		j, err := decodeJob(v)
		if err != nil {
			return err
		}
		if state != "" && j.State != state {
			continue
		}
		if len(page.Jobs) == limit {
			last, _ := parseID(page.Jobs[limit-1].ID)
			page.Next = idEncoding.EncodeToString(last[:])
			return nil
		}
		page.Jobs = append(page.Jobs, j)
	}
	return nil
}

func (s *boltStore) Events(ctx context.Context, id string, after uint64, limit int) ([]Event, error) {
	rid, ok := parseID(id)
	if !ok {
		return nil, ErrNotFound
	}
	pend := s.journal.pendingOf(rid) // before the read: see journal.go
	var evs []Event
	err := s.view(func(tx *bolt.Tx) error {
		var err error
		evs, err = s.readEvents(tx, rid, id, after, limit)
		return err
	})
	if err != nil {
		return nil, err
	}
	return withPending(evs, pend, after, limit, s.opts.MaxEventsPerJob), nil
}

// readEvents reads up to limit events after seq `after` with one cursor seek. The documents are
// copied out of the memory map into one shared buffer, so a page costs three allocations.
func (s *boltStore) readEvents(tx *bolt.Tx, rid rawID, id string, after uint64, limit int) ([]Event, error) {
	if tx.Bucket(bucketJobs).Get(rid[:]) == nil {
		return nil, ErrNotFound
	}
	if limit <= 0 || after == math.MaxUint64 {
		return nil, nil
	}
	c := tx.Bucket(bucketEvents).Cursor()
	k, v := c.Seek(eventKey(rid, after+1))
	if k == nil || !bytes.HasPrefix(k, rid[:]) {
		return nil, nil // nothing after `after`
	}
	if _, seq, _ := decodeEventKey(k); seq != after+1 {
		// Events after `after` were compacted away: hand over the current document alone.
		for {
			nk, nv := c.Next()
			if nk == nil || !bytes.HasPrefix(nk, rid[:]) {
				break
			}
			k, v = nk, nv
		}
		limit = 1
	}
	// The documents alias the memory map until the transaction ends: note them, then copy
	// them out into one buffer of the exact size.
	type stored struct {
		seq  uint64
		kind EventKind
		doc  []byte
	}
	var found []stored
	total := 0
	for ; k != nil && len(found) < limit && bytes.HasPrefix(k, rid[:]); k, v = c.Next() {
		_, seq, err := decodeEventKey(k)
		if err != nil {
			return nil, err
		}
		kind, doc, err := decodeEvent(v)
		if err != nil {
			return nil, fmt.Errorf("%w (job %s seq %d)", err, id, seq)
		}
		found = append(found, stored{seq, kind, doc})
		total += len(doc)
	}
	buf := make([]byte, 0, total)
	evs := make([]Event, len(found))
	for i, f := range found {
		from := len(buf)
		buf = append(buf, f.doc...)
		evs[i] = Event{JobID: id, Seq: f.seq, Kind: f.kind, Data: buf[from:len(buf):len(buf)]}
	}
	return evs, nil
}

func (s *boltStore) Subscribe(ctx context.Context, id string, after uint64) (Subscription, error) {
	if _, ok := parseID(id); !ok {
		return nil, ErrNotFound
	}
	t, err := s.feed.watch(id)
	if err != nil {
		return nil, err
	}
	// Watch first, read second: whatever commits after this read is published to the topic.
	job, err := s.Get(ctx, id)
	if err != nil {
		s.feed.unwatch(id, t)
		return nil, err
	}
	after = min(after, job.Seq) // a cursor from the future: follow from now
	sub := newSubscription(s.feed, t, id, after, func(ctx context.Context, after uint64, limit int) ([]Event, error) {
		return s.Events(ctx, id, after, limit)
	})
	if job.State.Terminal() && after == job.Seq {
		sub.ended = true // the client has seen the done event
	}
	return sub, nil
}

func (s *boltStore) Wait(ctx context.Context, id string, after uint64) (Event, error) {
	rid, ok := parseID(id)
	if !ok {
		return Event{}, ErrNotFound
	}
	t, err := s.feed.watch(id)
	if err != nil {
		return Event{}, err
	}
	defer s.feed.unwatch(id, t)
	// A running job's newest version is in memory. It is stored before its change is
	// published, and the topic is watched now: if it is not past after, nothing past after
	// was published before the watch, and whatever comes later reaches the topic.
	if j := s.live.committed(rid); j != nil && j.Seq <= after {
		return (&Feed{s.feed}).Wait(ctx, &Topic{t}, after)
	}
	var current Event
	pend := s.journal.pendingOf(rid) // before the read: see journal.go
	err = s.view(func(tx *bolt.Tx) error {
		j, err := s.loadJob(tx, rid)
		if err != nil {
			return err
		}
		if j = newestOf(j, pend); j.Seq <= after {
			return nil
		}
		evs, err := s.readEvents(tx, rid, id, j.Seq-1, 1)
		if evs = withPending(evs, pend, j.Seq-1, 1, s.opts.MaxEventsPerJob); err == nil && len(evs) == 1 {
			current = evs[0]
		}
		return err
	})
	if err != nil {
		return Event{}, err
	}
	if current.Seq > after {
		return current, nil
	}
	return (&Feed{s.feed}).Wait(ctx, &Topic{t}, after)
}

// CountByState counts jobs from the owner index, whose values are the jobs' states, so no
// record is decoded.
func (s *boltStore) CountByState(ctx context.Context) (map[State]int, error) {
	counts := make(map[State]int, len(allStates))
	for _, st := range allStates {
		counts[st] = 0
	}
	err := s.view(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketOwners).ForEach(func(_, v []byte) error {
			if len(v) == 1 {
				counts[stateFromByte(v[0])]++
			}
			return nil
		})
	})
	return counts, err
}

// allStates lists every job state, for counts that name the states with no jobs too.
var allStates = [...]State{Queued, Running, Succeeded, Failed, Canceled}

// stateFromByte reverses stateByte.
func stateFromByte(b byte) State {
	for _, st := range allStates {
		if stateByte(st) == b {
			return st
		}
	}
	return Canceled
}
