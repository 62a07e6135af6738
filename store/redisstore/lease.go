package redisstore

import (
	"context"
	"errors"
	"time"

	"github.com/caddy-progress/progress/store"
)

// keep renews the lease, ends the jobs of instances whose lease lapsed, and takes expired
// jobs out of the listings.
func (s *redisStore) keep() {
	defer s.loops.Done()
	var healthySince time.Time
	lastSweep := time.Now()
	for s.wait(min(s.lease/3, s.opts.SweepInterval)) {
		if err := s.renew(s.ctx); err != nil {
			healthySince = time.Time{}
			continue
		}
		now := time.Now()
		if healthySince.IsZero() {
			healthySince = now
		}
		// After an outage every lease may have lapsed: judge the others only once they have
		// had a whole lease time to renew theirs.
		if now.Sub(healthySince) >= s.lease {
			s.reap(s.ctx)
		}
		if now.Sub(lastSweep) >= s.opts.SweepInterval {
			lastSweep = now
			s.sweep(s.ctx, now)
		}
	}
}

// renew takes or extends this instance's lease.
func (s *redisStore) renew(ctx context.Context) error {
	return s.rdb.Set(ctx, s.key("lease", s.inst), "1", s.lease).Err()
}

// reap ends the unfinished jobs of the instances whose lease lapsed.
func (s *redisStore) reap(ctx context.Context) {
	insts, err := s.rdb.SMembers(ctx, s.key("instances")).Result()
	if err != nil {
		return
	}
	for _, inst := range insts {
		if inst == s.inst {
			continue
		}
		alive, err := s.rdb.Exists(ctx, s.key("lease", inst)).Result()
		if err != nil || alive == 1 {
			continue
		}
		active := s.key("active", inst)
		ids, err := s.rdb.SMembers(ctx, active).Result()
		if err != nil {
			continue
		}
		for _, id := range ids {
			// A job that ended or went leaves the set; one that could not be read stays for
			// the next round.
			if err := s.interrupt(ctx, id); err == nil || errors.Is(err, store.ErrNotFound) {
				s.rdb.SRem(ctx, active, id)
			}
		}
		if n, err := s.rdb.SCard(ctx, active).Result(); err == nil && n == 0 {
			s.rdb.SRem(ctx, s.key("instances"), inst)
		}
	}
}

// sweepBatch bounds one sweep script, so that it holds Redis for a short while only.
const sweepBatch = 256

func (s *redisStore) sweep(ctx context.Context, now time.Time) {
	for range 100 {
		n, err := sweepScript.Run(ctx, s.rdb, nil, s.prefix, now.UnixMilli(), sweepBatch).Int()
		if err != nil || n < sweepBatch {
			return
		}
	}
}
