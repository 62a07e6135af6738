package store

import (
	"bytes"
	"time"

	bolt "go.etcd.io/bbolt"
)

// sweepBatch bounds how many expired jobs one retention transaction deletes, so that the writes
// sharing its commit never wait long.
const sweepBatch = 64

func (s *boltStore) sweepLoop() {
	defer s.sweeping.Done()
	tick := time.NewTicker(s.opts.SweepInterval)
	defer tick.Stop()
	for {
		select {
		case <-s.stopSweep:
			return
		case <-tick.C:
			s.sweep(time.Now(), s.stopSweep)
		}
	}
}

// sweep deletes the jobs whose retention ended before now, a small batch per commit, through
// the group committer so that it shares commits with writers instead of stalling them. It
// returns how many jobs it deleted.
func (s *boltStore) sweep(now time.Time, stop <-chan struct{}) (int, error) {
	total := 0
	for {
		select {
		case <-stop:
			return total, nil
		default:
		}
		keys, err := s.expiredKeys(now)
		if err != nil || len(keys) == 0 {
			return total, err
		}
		ids := make([]string, len(keys))
		var trash []string
		err = s.commits.do(func(tx *bolt.Tx) error {
			trash = trash[:0]
			for i, k := range keys {
				_, id, _ := decodeExpiryKey(k)
				ids[i] = idEncoding.EncodeToString(id[:])
				t, err := s.deleteJob(tx, id)
				if err != nil && err != ErrNotFound {
					return err
				}
				if t != "" {
					trash = append(trash, t)
				}
				// The entry goes even when its job is already gone.
				if err := tx.Bucket(bucketExpiry).Delete(k); err != nil {
					return err
				}
			}
			return nil
		}, func() {
			for _, id := range ids {
				s.feed.fail(id, ErrNotFound)
			}
		})
		if err != nil {
			for _, t := range trash {
				restoreTrash(t)
			}
			return total, err
		}
		for _, t := range trash {
			removeIfExists(t)
		}
		total += len(keys)
		if len(keys) < sweepBatch {
			return total, nil
		}
	}
}

// expiredKeys reads up to sweepBatch expiry entries due before now, in a short read
// transaction.
func (s *boltStore) expiredKeys(now time.Time) ([][]byte, error) {
	var keys [][]byte
	err := s.view(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketExpiry).Cursor()
		for k, _ := c.First(); k != nil && len(keys) < sweepBatch; k, _ = c.Next() {
			at, _, err := decodeExpiryKey(k)
			if err != nil {
				return err
			}
			if !at.Before(now) {
				break
			}
			keys = append(keys, bytes.Clone(k))
		}
		return nil
	})
	return keys, err
}
