// Package redisstore is a store.Store kept in Redis, so that several Caddy instances share
// jobs: a client may start a job on one instance, follow it on another, while the upstream
// reports to a third.
//
// # Layout
//
// Every key starts with the prefix (default "progress:"):
//
//	job:{id}          hash: rec (document and private fields), seq, inst (instance running it), res (result head)
//	ev:{id}           stream: one entry per event, entry id "{seq}-0", fields k (kind) and d (document)
//	body:{id}         list: the result body in chunks of at most 512 KiB
//	spool:{id}:{r}    list: a body being received, renamed to body:{id} by the Finish that stores it
//	idem:{hash}       string: the job made with an owner's Idempotency-Key
//	own:{owner}[:{state}], all[:{state}]   sorted sets (lexical): the listings
//	expiry            sorted set: finished jobs by end of retention, for the listings' clean-up
//	lease:{inst}      string with a TTL: the instance is alive
//	active:{inst}     set: the unfinished jobs an instance runs
//	instances         set: the instances that have run jobs
//	ctl:{inst}        stream: the jobs an instance runs that others canceled or deleted
//	changes           stream: every event appended to an ev:{id} after the job's creation, as fields j (job id), s (seq, "x" for a tombstone), n (number); about the newest 100,000 kept
//	changes:n         string: the number of the last entry of changes
//	secret, route:{name}
//
// # Durability
//
// A change returns once Redis has applied it. With appendonly yes and appendfsync always,
// Redis writes and fsyncs its append-only file before it replies, so an acknowledged change
// survives a crash of Redis; with appendfsync everysec up to about a second of acknowledged
// changes can be lost; without persistence a restart of Redis loses every job.
//
// # Live tail
//
// Each store runs one reader on one connection that follows, with XREAD BLOCK, one stream
// shared by every instance, changes, where each script that appends an event to a job's stream
// also names the job and the event's seq. For the jobs its local subscribers and waiters
// watch, the reader reads the new events from their streams (XRANGE, pipelined) and hands
// them to the same in-memory feed the bbolt store uses. Its cost, and the time it holds
// Redis, follows the events written, not the number of jobs followed: however many jobs and
// clients an instance follows, it holds one blocking connection on two keys (changes and its
// control stream). Changes made by the instance itself reach its feed at once. A reader that
// finds announcements trimmed before it read them (changes is capped), or that connects
// again, reads every followed stream from where it was.
//
// # Liveness
//
// The instance that runs a job (the one that created it) renews a lease. Every instance
// looks, now and then, for instances whose lease has lapsed and ends their unfinished jobs as
// failed with the error code "interrupted"; the compare-and-set of every change makes that
// happen once.
package redisstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/caddy-progress/progress/store"
)

// Options tune Open. Zero values take the defaults named on each field.
type Options struct {
	store.Options
	// Prefix starts every key; stores with different prefixes on one Redis share nothing.
	// Default "progress:".
	Prefix string
	// LeaseTime is how long an instance may fail to renew its lease before the other
	// instances end its unfinished jobs as interrupted. Default 10s.
	LeaseTime time.Duration
}

// Defaults.
const (
	DefaultPrefix    = "progress:"
	DefaultLeaseTime = 10 * time.Second
	// DefaultMaxResultSize bounds a stored result in Redis, which keeps it in memory.
	DefaultMaxResultSize = 64 << 20
)

// tombstoneTTL is how long a deleted job's stream keeps its tombstone, for instances that
// follow it to learn of the deletion.
const tombstoneTTL = time.Minute

type redisStore struct {
	rdb      *redis.Client
	addr     string
	prefix   string
	opts     store.Options
	lease    time.Duration
	versions *store.Versions
	recent   *recent // the versions this instance wrote last, to skip reading them back
	writes   atomic.Uint64
	secret   []byte
	inst     string
	feed     *store.Feed
	tail     *tailer
	onEnded  atomic.Pointer[func(id string)]

	ctx       context.Context // ends at Close
	cancel    context.CancelFunc
	loops     sync.WaitGroup
	closed    atomic.Bool
	closeOnce sync.Once
}

// Open connects to the Redis at url (redis://[user:password@]host:port/db, or rediss:// for
// TLS) and returns a store kept there.
func Open(ctx context.Context, url string, opts Options) (store.Store, error) {
	ro, err := redis.ParseURL(url)
	if err != nil {
		return nil, fmt.Errorf("store: redis url: %w", err)
	}
	// A write that failed on the network is reported, not retried: a retried script could
	// apply a change twice.
	ro.MaxRetries = -1
	// Stores opened on Caddy's behalf last as long as Caddy; a connection the server drops
	// while idle is noticed when taken from the pool.
	ro.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	ro.DisableIdentity = true
	if opts.Prefix == "" {
		opts.Prefix = DefaultPrefix
	}
	if opts.LeaseTime <= 0 {
		opts.LeaseTime = DefaultLeaseTime
	}
	if opts.MaxResultSize <= 0 {
		opts.MaxResultSize = DefaultMaxResultSize
	}
	s := &redisStore{
		rdb: redis.NewClient(ro), addr: ro.Addr, prefix: opts.Prefix, lease: opts.LeaseTime,
		inst: randomHex(8), recent: newRecent(),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	if err := s.init(ctx); err != nil {
		s.cancel()
		s.rdb.Close()
		return nil, err
	}
	s.versions = store.NewVersions(s.secret, opts.Options)
	s.opts = s.versions.Options()
	s.feed = store.NewFeed(s.opts.LiveEvents)
	s.tail = newTailer(s)
	s.loops.Add(3)
	go s.tail.run()
	go s.tail.kicker()
	go s.keep()
	return s, nil
}

// init takes the lease and reads (or makes) the shared secret.
func (s *redisStore) init(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := s.renew(ctx); err != nil {
		return s.fail(err)
	}
	secret := make([]byte, 32)
	rand.Read(secret)
	if err := s.rdb.SetNX(ctx, s.key("secret"), secret, 0).Err(); err != nil {
		return s.fail(err)
	}
	got, err := s.rdb.Get(ctx, s.key("secret")).Bytes()
	if err != nil {
		return s.fail(err)
	}
	if len(got) != 32 {
		return fmt.Errorf("store: redis key %s holds %d bytes, not a 32-byte secret", s.key("secret"), len(got))
	}
	s.secret = got
	return nil
}

func (s *redisStore) key(parts ...string) string {
	k := s.prefix
	for i, p := range parts {
		if i > 0 {
			k += ":"
		}
		k += p
	}
	return k
}

// writeMark names one write of this instance (see updateScript).
func (s *redisStore) writeMark() string {
	return s.inst + "." + strconv.FormatUint(s.writes.Add(1), 36)
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// fail maps an error of the Redis client to the store's: ErrClosed once the store is closed,
// ErrUnavailable when Redis cannot be reached, the error itself (wrapped) when Redis answered
// with one.
func (s *redisStore) fail(err error) error {
	if err == nil {
		return nil
	}
	if s.closed.Load() || errors.Is(err, redis.ErrClosed) {
		return store.ErrClosed
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err // the caller gave up
	}
	var answered redis.Error
	if errors.As(err, &answered) && !transient(err) {
		return fmt.Errorf("store: redis at %s: %w", s.addr, err)
	}
	return fmt.Errorf("%w: redis at %s: %v", store.ErrUnavailable, s.addr, err)
}

// transient reports whether Redis answered that it cannot serve now: loading its data after a
// restart, running a long script, unable to persist (MISCONF: a full disk), out of memory
// (OOM, with maxmemory-policy noeviction), a replica without its primary.
func transient(err error) bool {
	for _, prefix := range []string{"LOADING", "BUSY", "MISCONF", "OOM", "MASTERDOWN", "READONLY", "TRYAGAIN", "CLUSTERDOWN"} {
		if strings.HasPrefix(err.Error(), prefix) {
			return true
		}
	}
	return false
}

// check refuses calls on a closed store.
func (s *redisStore) check() error {
	if s.closed.Load() {
		return store.ErrClosed
	}
	return nil
}

// OnEndedElsewhere registers the listener for the jobs this instance runs that other
// instances cancel or delete (store.EndNotifier).
func (s *redisStore) OnEndedElsewhere(f func(id string)) { s.onEnded.Store(&f) }

func (s *redisStore) OwnerHash(owner string) []byte { return s.versions.OwnerHash(owner) }

func (s *redisStore) Secret() []byte { return append([]byte(nil), s.secret...) }

// Close stops the reader and the lease, ends subscriptions with ErrClosed and lets go of the
// lease, so that other instances end at once the jobs this one leaves unfinished.
func (s *redisStore) Close() error {
	s.shutdown(true)
	return nil
}

// shutdown stops the store; release says to let go of the lease (a crash does not).
func (s *redisStore) shutdown(release bool) {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		s.cancel()
		s.tail.stop()
		s.loops.Wait()
		s.feed.Close()
		if !release {
			s.rdb.Close()
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s.rdb.Del(ctx, s.key("lease", s.inst))
		if n, err := s.rdb.SCard(ctx, s.key("active", s.inst)).Result(); err == nil && n == 0 {
			s.rdb.SRem(ctx, s.key("instances"), s.inst)
		}
		s.rdb.Close()
	})
}

// wait sleeps for d unless the store closes first; it reports whether to go on.
func (s *redisStore) wait(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.ctx.Done():
		return false
	}
}

var (
	_ store.Store       = (*redisStore)(nil)
	_ store.EndNotifier = (*redisStore)(nil)
)
