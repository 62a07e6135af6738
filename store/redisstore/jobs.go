package redisstore

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-progress/progress/store"
)

// maxAttempts bounds the compare-and-set retries of one change: each retry means another
// instance changed the job meanwhile, so running out takes a storm of writers on one job.
const maxAttempts = 1000

// member is a job's entry in the listings: creation time (so lexical order is creation order)
// and id.
func member(j *store.Job) string {
	return fmt.Sprintf("%016x.%s", uint64(j.CreatedAt.UnixNano()), j.ID)
}

const memberLen = 16 + 1 + 32

func validMember(m string) bool {
	if len(m) != memberLen || m[16] != '.' || !store.ValidID(m[17:]) {
		return false
	}
	_, err := hex.DecodeString(m[:16])
	return err == nil
}

func idemHex(j *store.Job) string { return hex.EncodeToString(store.IdempotencyIndex(j)) }

// writeCtx is the context of a write: it does not end with the caller's, because a caller must
// learn whether its write happened (the client's timeouts bound it).
func writeCtx(ctx context.Context) context.Context { return context.WithoutCancel(ctx) }

func (s *redisStore) Create(ctx context.Context, spec store.NewJob) (*store.Job, bool, error) {
	if err := s.check(); err != nil {
		return nil, false, err
	}
	for range 3 {
		v, err := s.versions.First(spec, time.Now().UTC())
		if err != nil {
			return nil, false, err
		}
		j := v.Job
		mark := s.writeMark()
		existing, err := createScript.Run(writeCtx(ctx), s.rdb, nil,
			s.prefix, j.ID, v.Record, string(v.Event.Kind), v.Event.Data, member(j), s.inst,
			idemHex(j), string(j.State), hex.EncodeToString(j.OwnerHash), mark).Text()
		if err != nil {
			return nil, false, s.fail(err)
		}
		if existing == "" {
			s.recent.put(j, mark)
			return store.Clone(j), true, nil
		}
		prev, err := s.Get(ctx, existing)
		if errors.Is(err, store.ErrNotFound) {
			continue // its retention ended just now: the key is free again
		}
		if err != nil {
			return nil, false, err
		}
		if !store.SameRequest(prev, spec) {
			return nil, false, store.ErrIdempotencyMismatch
		}
		return prev, false, nil
	}
	return nil, false, fmt.Errorf("store: Idempotency-Key keeps naming jobs that are gone")
}

func (s *redisStore) Get(ctx context.Context, id string) (*store.Job, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	if !store.ValidID(id) {
		return nil, store.ErrNotFound
	}
	rec, err := s.rdb.HGet(ctx, s.key("job", id), "rec").Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, store.ErrNotFound
	}
	if err != nil {
		return nil, s.fail(err)
	}
	return store.DecodeRecord(rec)
}

// finishing is what Finish stores with the terminal version: the result head and the spool
// holding the body.
type finishing struct {
	head  string
	spool string
}

// change is the one path by which an existing job changes: read, mutate a copy, store it if
// nobody changed the job meanwhile, else start again. The read is skipped while this instance
// holds the version it wrote last (see recent); any outcome but a stored change then drops
// that version and starts again from a read.
func (s *redisStore) change(ctx context.Context, id string, mutate func(prev, j *store.Job) error, fin *finishing) (*store.Job, bool, error) {
	for range maxAttempts {
		prev, expectMark := s.recent.get(id)
		guessed := prev != nil
		if !guessed {
			var err error
			if prev, err = s.Get(ctx, id); err != nil {
				return nil, false, err
			}
		}
		v, err := s.versions.Next(prev, mutate, time.Now().UTC())
		if err != nil && guessed {
			s.recent.drop(id)
			continue
		}
		if errors.Is(err, store.ErrNoChange) {
			return prev, false, nil
		}
		if err != nil {
			return nil, false, err
		}
		j := v.Job
		terminal, head, spool := "", "", ""
		if j.State.Terminal() {
			terminal = "1"
		}
		if fin != nil {
			head, spool = fin.head, fin.spool
		}
		expires := int64(0)
		if j.ExpiresAt != nil {
			expires = j.ExpiresAt.UnixMilli()
		}
		mark := s.writeMark()
		r, err := updateScript.Run(writeCtx(ctx), s.rdb, nil,
			s.prefix, id, strconv.FormatUint(prev.Seq, 10), v.Record, string(v.Event.Kind), v.Event.Data,
			member(j), hex.EncodeToString(j.OwnerHash), string(prev.State), string(j.State), terminal,
			s.opts.Retain.Milliseconds(), expires, s.opts.MaxEventsPerJob, idemHex(j), head, spool, s.inst,
			expectMark, mark).Int()
		if err != nil {
			s.recent.drop(id)
			return nil, false, s.fail(err)
		}
		if r != 1 {
			s.recent.drop(id)
			if guessed {
				continue // as if the guess had not been there
			}
		}
		switch r {
		case 1:
			s.recent.put(j, mark)
			s.tail.offer(v.Event)
			return store.Clone(j), true, nil
		case -1:
			return nil, false, store.ErrNotFound
		case -2:
			return nil, false, errors.New("store: the result's spool expired before the job finished")
		}
		// Another write came first: read again.
	}
	return nil, false, fmt.Errorf("store: job %s changed by others %d times in a row", id, maxAttempts)
}

func (s *redisStore) Update(ctx context.Context, id string, mutate func(*store.Job) error) (*store.Job, error) {
	job, _, err := s.change(ctx, id, func(prev, j *store.Job) error {
		if prev.State.Terminal() {
			return store.ErrFinished
		}
		return mutate(j)
	}, nil)
	return job, err
}

func (s *redisStore) Cancel(ctx context.Context, id string) (*store.Job, bool, error) {
	return s.change(ctx, id, func(prev, j *store.Job) error {
		if prev.State.Terminal() {
			return store.ErrNoChange
		}
		j.State = store.Canceled
		return nil
	}, nil)
}

// interrupt ends a job whose instance stopped renewing its lease.
func (s *redisStore) interrupt(ctx context.Context, id string) error {
	_, _, err := s.change(ctx, id, func(prev, j *store.Job) error {
		if prev.State.Terminal() {
			return store.ErrNoChange
		}
		j.State = store.Failed
		j.Error = &store.JobError{Code: store.CodeInterrupted, Message: "the instance running the job stopped before the upstream answered; start the job again"}
		return nil
	}, nil)
	return err
}

func (s *redisStore) Delete(ctx context.Context, id string) error {
	j, err := s.Get(ctx, id)
	if err != nil {
		return err
	}
	n, err := deleteScript.Run(writeCtx(ctx), s.rdb, nil, s.prefix, id, member(j), hex.EncodeToString(j.OwnerHash), idemHex(j), tombstoneTTL.Milliseconds(), s.inst).Int()
	if err != nil {
		return s.fail(err)
	}
	s.recent.drop(id)
	if n == 0 {
		return store.ErrNotFound
	}
	s.tail.forget(id)
	s.feed.Fail(id, store.ErrNotFound)
	return nil
}

const (
	defaultListLimit = 50
	maxListLimit     = 1000
	// listRounds bounds how many reads one List makes while skipping expired entries.
	listRounds = 16
)

var cursorEncoding = base64.RawURLEncoding

func (s *redisStore) List(ctx context.Context, q store.ListQuery) (store.ListPage, error) {
	if err := s.check(); err != nil {
		return store.ListPage{}, err
	}
	limit := q.Limit
	if limit <= 0 {
		limit = defaultListLimit
	}
	limit = min(limit, maxListLimit)
	if q.State != "" && !q.State.Valid() {
		return store.ListPage{}, fmt.Errorf("%w: unknown state %q", store.ErrInvalid, q.State)
	}
	cursor := ""
	if q.Cursor != "" {
		b, err := cursorEncoding.DecodeString(q.Cursor)
		if err != nil || !validMember(string(b)) {
			return store.ListPage{}, fmt.Errorf("%w: malformed cursor", store.ErrInvalid)
		}
		cursor = string(b)
	}
	key, newestFirst := s.key("all"), false
	if q.Owner != nil {
		key, newestFirst = s.key("own", hex.EncodeToString(s.OwnerHash(*q.Owner))), true
	}
	if q.State != "" {
		key += ":" + string(q.State)
	}
	var (
		page    store.ListPage
		members []string
	)
	for range listRounds {
		want := limit + 1 - len(page.Jobs)
		args := redis.ZRangeArgs{Key: key, ByLex: true, Start: "-", Stop: "+", Count: int64(want)}
		if newestFirst {
			// Rev takes the range from high to low.
			args.Start, args.Stop, args.Rev = "+", "-", true
			if cursor != "" {
				args.Start = "(" + cursor
			}
		} else if cursor != "" {
			args.Start = "(" + cursor
		}
		batch, err := s.rdb.ZRangeArgs(ctx, args).Result()
		if err != nil {
			return store.ListPage{}, s.fail(err)
		}
		if len(batch) == 0 {
			break
		}
		cmds, err := s.rdb.Pipelined(ctx, func(p redis.Pipeliner) error {
			for _, m := range batch {
				p.HGet(ctx, s.key("job", m[17:]), "rec")
			}
			return nil
		})
		if err != nil && !errors.Is(err, redis.Nil) {
			return store.ListPage{}, s.fail(err)
		}
		for i, c := range cmds {
			rec, err := c.(*redis.StringCmd).Bytes()
			if errors.Is(err, redis.Nil) {
				continue // expired; the sweep takes it out of the listing
			}
			j, err := store.DecodeRecord(rec)
			if err != nil {
				return store.ListPage{}, err
			}
			page.Jobs = append(page.Jobs, j)
			members = append(members, batch[i])
		}
		cursor = batch[len(batch)-1]
		if len(batch) < want || len(page.Jobs) > limit {
			break
		}
	}
	if len(page.Jobs) > limit {
		page.Jobs = page.Jobs[:limit]
		page.Next = cursorEncoding.EncodeToString([]byte(members[limit-1]))
	}
	return page, nil
}

// eventOf reads a stream entry; ok is false for the tombstone of a deleted job.
func eventOf(id string, m redis.XMessage) (ev store.Event, ok bool, err error) {
	seqText, _, _ := strings.Cut(m.ID, "-")
	seq, err := strconv.ParseUint(seqText, 10, 64)
	if err != nil {
		return ev, false, fmt.Errorf("store: event of job %s with entry id %q", id, m.ID)
	}
	return eventFields(id, seq, m)
}

// eventFields is the event of job id at seq held in an entry's fields k (kind) and d
// (document), as a job's stream and an announcement carrying the event hold them; ok false for
// a tombstone.
func eventFields(id string, seq uint64, m redis.XMessage) (ev store.Event, ok bool, err error) {
	kind, _ := m.Values["k"].(string)
	data, _ := m.Values["d"].(string)
	switch store.EventKind(kind) {
	case store.KindProgress, store.KindDone:
		return store.Event{JobID: id, Seq: seq, Kind: store.EventKind(kind), Data: []byte(data)}, true, nil
	case "x":
		return ev, false, nil
	}
	return ev, false, fmt.Errorf("store: event of job %s with kind %q", id, kind)
}

func (s *redisStore) Events(ctx context.Context, id string, after uint64, limit int) ([]store.Event, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	if !store.ValidID(id) {
		return nil, store.ErrNotFound
	}
	if limit <= 0 || after == math.MaxUint64 {
		if _, err := s.Get(ctx, id); err != nil {
			return nil, err
		}
		return nil, nil
	}
	stream := s.key("ev", id)
	var exists *redis.IntCmd
	var entries *redis.XMessageSliceCmd
	_, err := s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		exists = p.Exists(ctx, s.key("job", id))
		entries = p.XRangeN(ctx, stream, strconv.FormatUint(after+1, 10)+"-0", "+", int64(limit))
		return nil
	})
	if err != nil {
		return nil, s.fail(err)
	}
	if exists.Val() == 0 {
		return nil, store.ErrNotFound
	}
	msgs := entries.Val()
	evs := make([]store.Event, 0, len(msgs))
	for _, m := range msgs {
		ev, ok, err := eventOf(id, m)
		if err != nil {
			return nil, err
		}
		if ok {
			evs = append(evs, ev)
		}
	}
	if len(evs) > 0 && evs[0].Seq != after+1 {
		// Events after `after` were compacted away: hand over the newest alone.
		newest, err := s.rdb.XRevRangeN(ctx, stream, "+", "-", 1).Result()
		if err != nil {
			return nil, s.fail(err)
		}
		evs = evs[:0]
		for _, m := range newest {
			if ev, ok, err := eventOf(id, m); err != nil {
				return nil, err
			} else if ok {
				evs = append(evs, ev)
			}
		}
	}
	return evs, nil
}

func (s *redisStore) RouteDurations(ctx context.Context, route string) ([]time.Duration, error) {
	if err := store.CheckRouteName(route); err != nil {
		return nil, err
	}
	if err := s.check(); err != nil {
		return nil, err
	}
	v, err := s.rdb.Get(ctx, s.key("route", route)).Bytes()
	if errors.Is(err, redis.Nil) {
		return nil, nil
	}
	if err != nil {
		return nil, s.fail(err)
	}
	var out []time.Duration
	for len(v) >= 8 {
		out = append(out, time.Duration(binary.BigEndian.Uint64(v)))
		v = v[8:]
	}
	return out, nil
}

func (s *redisStore) SaveRouteDurations(ctx context.Context, route string, ds []time.Duration) error {
	if err := store.CheckRouteName(route); err != nil {
		return err
	}
	if err := s.check(); err != nil {
		return err
	}
	ds = ds[max(0, len(ds)-store.MaxRouteDurations):]
	v := make([]byte, 0, 8*len(ds))
	for _, d := range ds {
		v = binary.BigEndian.AppendUint64(v, uint64(max(d, 0)))
	}
	return s.fail(s.rdb.Set(writeCtx(ctx), s.key("route", route), v, 0).Err())
}
