package store

import (
	"context"
	"encoding/binary"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// MaxRouteDurations is how many recent run times a store keeps per route.
const MaxRouteDurations = 64

// routeKeyPrefix marks per-route run times in the meta bucket.
const routeKeyPrefix = "route-durations\x00"

// maxRouteNameLen bounds a route name, which becomes a key.
const maxRouteNameLen = 512

func routeKey(route string) ([]byte, error) {
	if route == "" || len(route) > maxRouteNameLen {
		return nil, fmt.Errorf("%w: route name of %d bytes", ErrInvalid, len(route))
	}
	return []byte(routeKeyPrefix + route), nil
}

// RouteDurations returns the recent run times kept for route, oldest first; none for a route
// never saved.
func (s *boltStore) RouteDurations(ctx context.Context, route string) ([]time.Duration, error) {
	key, err := routeKey(route)
	if err != nil {
		return nil, err
	}
	var out []time.Duration
	err = s.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketMeta).Get(key)
		for len(v) >= 8 {
			out = append(out, time.Duration(binary.BigEndian.Uint64(v)))
			v = v[8:]
		}
		return nil
	})
	return out, err
}

// SaveRouteDurations replaces the run times kept for route with the newest
// MaxRouteDurations of ds.
func (s *boltStore) SaveRouteDurations(ctx context.Context, route string, ds []time.Duration) error {
	key, err := routeKey(route)
	if err != nil {
		return err
	}
	ds = ds[max(0, len(ds)-MaxRouteDurations):]
	v := make([]byte, 0, 8*len(ds))
	for _, d := range ds {
		v = binary.BigEndian.AppendUint64(v, uint64(max(d, 0)))
	}
	return s.commits.do(func(tx *bolt.Tx) error {
		return tx.Bucket(bucketMeta).Put(key, v)
	}, nil)
}
