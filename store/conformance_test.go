package store_test

import (
	"path/filepath"
	"testing"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/store/storetest"
)

// TestConformance runs the shared Store suite against the bbolt store.
func TestConformance(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) func(opts store.Options) (store.Store, error) {
			path := filepath.Join(t.TempDir(), "progress.db")
			return func(opts store.Options) (store.Store, error) { return store.Open(path, opts) }
		},
	})
}
