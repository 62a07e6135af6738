package store

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	bolt "go.etcd.io/bbolt"
	boltErrors "go.etcd.io/bbolt/errors"
)

var (
	bucketJobs    = []byte("jobs")
	bucketEvents  = []byte("events")
	bucketActive  = []byte("active")
	bucketExpiry  = []byte("expiry")
	bucketOwners  = []byte("owners")
	bucketIdem    = []byte("idem")
	bucketResults = []byte("results")
	bucketMeta    = []byte("meta")

	allBuckets = [][]byte{bucketJobs, bucketEvents, bucketActive, bucketExpiry, bucketOwners, bucketIdem, bucketResults, bucketMeta}

	metaSecret = []byte("secret")
)

// boltStore is the embedded Store: one bbolt file, plus a folder beside it for large results.
type boltStore struct {
	db         *bolt.DB
	path       string
	resultsDir string
	opts       Options
	secret     []byte
	ownerKey   []byte
	idemKey    []byte
	feed       *feed
	live       *live
	commits    *committer

	// journal takes progress reports of running jobs (nil when JournalSize < 0); see
	// journal.go.
	journal         *journal
	journalCommits  *committer
	stopCheckpoints chan struct{}
	checkpointing   sync.WaitGroup
	// checkpointMu makes checkpoints one at a time: two at once would both take the sealed
	// file, and the later release would free the file that was sealed after it.
	checkpointMu sync.Mutex

	stopSweep chan struct{}
	sweeping  sync.WaitGroup
	closeOnce sync.Once
}

// Open opens (or creates) the store file at path. Jobs a previous process left queued or
// running end as failed with error code "interrupted". If another process holds the file,
// Open fails after opts.OpenTimeout with an error matching ErrLocked.
func Open(path string, opts Options) (Store, error) {
	return openBolt(path, opts)
}

func openBolt(path string, opts Options) (*boltStore, error) {
	opts = opts.withDefaults()
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
		return nil, fmt.Errorf("store: %w", err)
	}
	db, err := bolt.Open(abs, 0o600, &bolt.Options{
		Timeout: opts.OpenTimeout,
		// The hashmap freelist keeps commits fast once retention has freed many pages.
		FreelistType: bolt.FreelistMapType,
	})
	if errors.Is(err, boltErrors.ErrTimeout) {
		return nil, fmt.Errorf("%w: %s (waited %s; is another Caddy using this store file?)", ErrLocked, abs, opts.OpenTimeout)
	}
	if err != nil {
		return nil, fmt.Errorf("store: open %s: %w", abs, err)
	}
	s := &boltStore{
		db: db, path: abs, resultsDir: abs + ".results", opts: opts,
		feed: newFeed(opts.LiveEvents), live: newLive(), stopSweep: make(chan struct{}),
		stopCheckpoints: make(chan struct{}),
	}
	if err := s.init(); err != nil {
		if s.journal != nil {
			s.journal.closeFiles()
		}
		db.Close()
		return nil, err
	}
	s.commits = newCommitter(opts.MaxBatch, boltCommits{db, opts.ObserveCommit}.commit)
	s.sweeping.Add(1)
	go s.sweepLoop()
	if s.journal != nil {
		s.checkpointing.Add(1)
		go s.checkpointLoop()
	}
	return s, nil
}

// init makes the buckets and the secret, clears half-written result files, and recovers jobs
// a previous process left unfinished.
func (s *boltStore) init() error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		for _, name := range allBuckets {
			if _, err := tx.CreateBucketIfNotExists(name); err != nil {
				return err
			}
		}
		meta := tx.Bucket(bucketMeta)
		if secret := meta.Get(metaSecret); len(secret) == 32 {
			s.secret = append([]byte(nil), secret...)
			return nil
		}
		s.secret = make([]byte, 32)
		if _, err := rand.Read(s.secret); err != nil {
			return err
		}
		return meta.Put(metaSecret, s.secret)
	})
	if err != nil {
		return fmt.Errorf("store: initialise %s: %w", s.path, err)
	}
	s.ownerKey = deriveKey(s.secret, "caddy-progress owner v1")
	s.idemKey = deriveKey(s.secret, "caddy-progress idempotency-key v1")
	if err := os.MkdirAll(s.resultsDir, 0o700); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if err := s.settleResultFiles(); err != nil {
		return err
	}
	if err := s.openJournal(); err != nil {
		return err
	}
	return s.recoverInterrupted()
}

func deriveKey(secret []byte, purpose string) []byte {
	m := hmac.New(sha256.New, secret)
	m.Write([]byte(purpose))
	return m.Sum(nil)
}

func keyedHash(key []byte, value string) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(value))
	return m.Sum(nil)
}

func (s *boltStore) OwnerHash(owner string) []byte { return keyedHash(s.ownerKey, owner) }

func (s *boltStore) Secret() []byte { return append([]byte(nil), s.secret...) }

// recoverBatch bounds each recovery transaction.
const recoverBatch = 1000

// recoverInterrupted ends the jobs of the active index, and only those: the cost of opening
// does not depend on how many finished jobs are kept.
func (s *boltStore) recoverInterrupted() error {
	for {
		var ids []rawID
		err := s.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(bucketActive).Cursor()
			for k, _ := c.First(); k != nil && len(ids) < recoverBatch; k, _ = c.Next() {
				var id rawID
				copy(id[:], k)
				ids = append(ids, id)
			}
			return nil
		})
		if err != nil || len(ids) == 0 {
			return err
		}
		err = s.db.Update(func(tx *bolt.Tx) error {
			now := time.Now().UTC()
			for _, id := range ids {
				prev, err := s.loadJob(tx, id)
				if errors.Is(err, ErrNotFound) {
					// An index entry without its job: drop it.
					if err := tx.Bucket(bucketActive).Delete(id[:]); err != nil {
						return err
					}
					continue
				}
				if err != nil {
					return err
				}
				j := prev.clone()
				j.State = Failed
				j.Error = &JobError{Code: CodeInterrupted, Message: "the server stopped before the upstream answered; start the job again"}
				if _, err := s.write(tx, prev, j, now); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("store: recover interrupted jobs: %w", err)
		}
	}
}

func removeIfExists(path string) error {
	if path == "" {
		return nil
	}
	if err := os.Remove(path); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

// view runs a read transaction; reads that race Close end with ErrClosed like everything else.
func (s *boltStore) view(fn func(tx *bolt.Tx) error) error {
	err := s.db.View(fn)
	if errors.Is(err, boltErrors.ErrDatabaseNotOpen) {
		return ErrClosed
	}
	return err
}

// Close stops retention, answers queued writes, ends subscriptions and closes the file.
func (s *boltStore) Close() error {
	var err error
	s.closeOnce.Do(func() {
		close(s.stopSweep)
		s.sweeping.Wait()
		err = s.closeJournal()
		s.commits.close()
		s.live.close()
		s.feed.close()
		err = errors.Join(err, s.db.Close())
	})
	return err
}

// SizeBytes is the database file's size plus the journal and the result bodies kept in files
// beside it.
func (s *boltStore) SizeBytes() (int64, error) {
	info, err := os.Stat(s.path)
	if err != nil {
		return 0, err
	}
	total := info.Size()
	if s.journal != nil {
		total += 2 * s.journal.size
	}
	entries, err := os.ReadDir(s.resultsDir)
	if err != nil {
		return total, err
	}
	for _, e := range entries {
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() {
			total += fi.Size()
		}
	}
	return total, nil
}

var _ Inspector = (*boltStore)(nil)
