package store_test

import (
	"path/filepath"
	"testing"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/store/storetest"
)

// TestConformance runs the shared Store suite against the bbolt store, with its journal (the
// default) and without.
func TestConformance(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) func(opts store.Options) (store.Store, error) {
			path := filepath.Join(t.TempDir(), "progress.db")
			return func(opts store.Options) (store.Store, error) { return store.Open(path, opts) }
		},
	})
}

func TestConformanceWithoutJournal(t *testing.T) {
	storetest.Run(t, storetest.Backend{
		New: func(t *testing.T) func(opts store.Options) (store.Store, error) {
			path := filepath.Join(t.TempDir(), "progress.db")
			return func(opts store.Options) (store.Store, error) {
				opts.JournalSize = -1
				return store.Open(path, opts)
			}
		},
	})
}
