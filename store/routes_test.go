package store

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestRouteDurations(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "progress.db")
	s, err := openBolt(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ds, err := s.RouteDurations(ctx, "POST /reports/*"); err != nil || len(ds) != 0 {
		t.Fatalf("a route never saved: %v %v", ds, err)
	}
	var many []time.Duration
	for i := range MaxRouteDurations + 10 {
		many = append(many, time.Duration(i+1)*time.Second)
	}
	if err := s.SaveRouteDurations(ctx, "POST /reports/*", many); err != nil {
		t.Fatal(err)
	}
	if err := s.SaveRouteDurations(ctx, "GET /reports/*", []time.Duration{time.Millisecond}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{"", strings.Repeat("x", maxRouteNameLen+1)} {
		if err := s.SaveRouteDurations(ctx, bad, many); !errors.Is(err, ErrInvalid) {
			t.Errorf("route name of %d bytes: %v, want ErrInvalid", len(bad), err)
		}
	}
	s.Close()
	// Kept across a restart: the newest MaxRouteDurations, oldest first, routes apart.
	s, err = openBolt(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ds, err := s.RouteDurations(ctx, "POST /reports/*")
	if err != nil || len(ds) != MaxRouteDurations || ds[0] != 11*time.Second || ds[len(ds)-1] != time.Duration(MaxRouteDurations+10)*time.Second {
		t.Fatalf("after reopening: %d durations %v..., %v", len(ds), ds[:min(3, len(ds))], err)
	}
	if ds, _ := s.RouteDurations(ctx, "GET /reports/*"); len(ds) != 1 || ds[0] != time.Millisecond {
		t.Fatalf("the other route: %v", ds)
	}
}
