package engine

import (
	"bytes"
	"testing"

	"github.com/caddy-progress/progress/store"
)

// TestSharedFramesEncodeOncePerEvent: the streams of one job share each event's encoding (the
// same bytes, not a copy per stream), a newer event is encoded afresh, and a job's entry goes
// once its last stream leaves.
func TestSharedFramesEncodeOncePerEvent(t *testing.T) {
	var s sharedFrames
	a, b := s.join("job1"), s.join("job1")
	if a != b {
		t.Fatal("two streams of one job got different frame caches")
	}
	ev1 := store.Event{JobID: "job1", Seq: 1, Kind: "progress", Data: []byte(`{"percent":1}`)}
	f1 := a.frame(ev1)
	if want := []byte("id: 1\nevent: progress\ndata: {\"percent\":1}\n\n"); !bytes.Equal(f1, want) {
		t.Fatalf("frame %q, want %q", f1, want)
	}
	if g := b.frame(ev1); &g[0] != &f1[0] {
		t.Error("the second stream re-encoded an event the first had encoded")
	}
	ev2 := store.Event{JobID: "job1", Seq: 2, Kind: "done", Data: []byte(`{"state":"succeeded"}`)}
	if f2 := b.frame(ev2); !bytes.HasPrefix(f2, []byte("id: 2\nevent: done\n")) {
		t.Errorf("a newer event gave %q", f2)
	}
	s.leave("job1", a)
	if len(s.jobs) != 1 {
		t.Fatalf("the job's entry went while a stream remained (%d entries)", len(s.jobs))
	}
	s.leave("job1", b)
	if len(s.jobs) != 0 {
		t.Errorf("%d entries left after the last stream left", len(s.jobs))
	}
	if c := s.join("job1"); c == a || c.last.Load() != nil {
		t.Error("a new stream after the last left got the old cache")
	}
}
