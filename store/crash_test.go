package store

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The crash test runs the store in a child process (this test binary, re-executed with
// -test.run=^TestCrashChild$), kills it with SIGKILL at a random moment, reopens the file and
// checks that every write the child acknowledged survived, that recovery ended every unfinished
// job, and that the bbolt file and the results folder are consistent. The same file goes
// through many rounds, so later rounds run on a file with history.
//
// Reproduce a run with PROGRESS_CRASH_SEED=<seed> (the seed is logged); the writes inside a
// round still interleave as the scheduler pleases.

const (
	crashEnvStore     = "PROGRESS_CRASH_STORE"      // set only in the child: the store file
	crashEnvChildSeed = "PROGRESS_CRASH_CHILD_SEED" // set only in the child
	crashEnvSeed      = "PROGRESS_CRASH_SEED"       // optional, in the parent: the master seed

	crashInline     = 512 // InlineResultSize: bodies above it go to files
	crashWriters    = 8
	crashMaxUpdates = 20 // per job; far below DefaultMaxEventsPerJob, so no event is compacted
	crashMaxLarge   = 16 << 10
	crashMaxJobs    = 100000           // per writer: bounds the child's loop
	crashChildLife  = 60 * time.Second // the child stops on its own after this (never in practice)
	crashReadyWait  = 30 * time.Second // how long the parent waits for the child's store to open
	crashKillMin    = 20 * time.Millisecond
	crashKillSpread = 280 * time.Millisecond
)

func crashOptions() Options { return Options{InlineResultSize: crashInline} }

// TestCrashChild is the child process of TestCrashDurability. In a normal run the variable is
// unset and it does nothing.
func TestCrashChild(t *testing.T) {
	path := os.Getenv(crashEnvStore)
	if path == "" {
		return
	}
	seed, err := strconv.ParseInt(os.Getenv(crashEnvChildSeed), 10, 64)
	out := &crashOut{}
	if err != nil {
		out.fail("seed: %v", err)
	}
	crashChild(path, seed, out)
}

// crashOut writes the child's acknowledgements: one line, one write call, after the call it
// acknowledges has returned.
type crashOut struct{ mu sync.Mutex }

func (o *crashOut) line(format string, args ...any) {
	b := fmt.Appendf(nil, format+"\n", args...)
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, err := os.Stdout.Write(b); err != nil {
		os.Exit(3) // the parent is gone
	}
}

func (o *crashOut) ack(j *Job, size int64, sum string) {
	if sum == "" {
		sum = "-"
	}
	o.line("ACK %s %d %s %d %s", j.ID, j.Seq, j.State, size, sum)
}

func (o *crashOut) fail(format string, args ...any) {
	o.line("ERR "+format, args...)
	os.Exit(2)
}

func crashChild(path string, seed int64, out *crashOut) {
	s, err := Open(path, crashOptions())
	if err != nil {
		out.fail("open: %v", err)
	}
	out.line("READY")
	deadline := time.Now().Add(crashChildLife)
	recent := make(chan string, 64)
	var writers sync.WaitGroup
	for w := range crashWriters {
		writers.Add(1)
		go func() {
			defer writers.Done()
			rng := rand.New(rand.NewSource(seed + int64(w) + 1))
			for n := 0; n < crashMaxJobs && time.Now().Before(deadline); n++ {
				crashJobLife(s, out, rng, fmt.Sprintf("writer-%d", w), recent)
			}
		}()
	}
	canceler := make(chan struct{})
	go func() {
		defer close(canceler)
		crashCanceler(s, out, rand.New(rand.NewSource(seed)), recent)
	}()
	writers.Wait()
	close(recent)
	<-canceler
	if err := s.Close(); err != nil {
		out.fail("close: %v", err)
	}
	out.line("END")
}

// crashJobLife takes one job from creation through a few updates to one of several ends,
// acknowledging every write.
func crashJobLife(s Store, out *crashOut, rng *rand.Rand, owner string, recent chan<- string) {
	ctx := context.Background()
	j, created, err := s.Create(ctx, NewJob{
		Owner: owner, Request: RequestInfo{Method: "POST", URI: "/crash"}, Route: "crash",
		Attrs: map[string]string{"writer": owner},
	})
	if err != nil || !created {
		out.fail("create: %v (created %v)", err, created)
	}
	out.ack(j, -1, "")
	id := j.ID
	if rng.Intn(4) == 0 {
		select {
		case recent <- id: // a candidate for the canceler
		default:
		}
	}
	for u := range rng.Intn(crashMaxUpdates + 1) {
		p := float64(u) * 100 / crashMaxUpdates
		j, err = s.Update(ctx, id, func(j *Job) error {
			j.State = Running
			j.Progress = &Progress{Percent: &p, Stage: "crash", Message: "step " + strconv.Itoa(u)}
			return nil
		})
		if errors.Is(err, ErrFinished) {
			return // canceled meanwhile
		}
		if err != nil {
			out.fail("update %s: %v", id, err)
		}
		out.ack(j, -1, "")
	}
	switch r := rng.Intn(10); {
	case r < 3:
		crashFinish(s, out, rng, id, rng.Intn(crashInline+1)) // inline, 0 to 512 bytes
	case r < 6:
		crashFinish(s, out, rng, id, crashInline+1+rng.Intn(crashMaxLarge)) // in a file
	case r < 7:
		j, err = s.Finish(ctx, id, Outcome{State: Failed, Error: &JobError{Code: "upstream_unreachable", Message: "crash test"}})
		if errors.Is(err, ErrFinished) {
			return
		}
		if err != nil {
			out.fail("finish %s: %v", id, err)
		}
		out.ack(j, -1, "")
	case r < 8:
		j, changed, err := s.Cancel(ctx, id)
		if err != nil {
			out.fail("cancel %s: %v", id, err)
		}
		if changed {
			out.ack(j, -1, "")
		}
	default:
		// Left queued or running: the next Open must end it as interrupted.
	}
}

// crashFinish ends a job with an upstream response whose body has size bytes.
func crashFinish(s Store, out *crashOut, rng *rand.Rand, id string, size int) {
	ctx := context.Background()
	sum := sha256.New()
	var body ResultWriter
	if size > 0 || rng.Intn(2) == 0 {
		w, err := s.NewResult(ctx, id)
		if err != nil {
			out.fail("new result %s: %v", id, err)
		}
		buf := make([]byte, size)
		rng.Read(buf)
		sum.Write(buf)
		for off := 0; off < size; {
			n := min(size-off, 1+rng.Intn(4096))
			if _, err := w.Write(buf[off : off+n]); err != nil {
				out.fail("write result %s: %v", id, err)
			}
			off += n
		}
		body = w
	}
	state, status := Succeeded, 200
	if rng.Intn(4) == 0 {
		state, status = Failed, 502
	}
	head := &ResponseHead{Status: status, Header: http.Header{
		"Content-Type":  {"application/octet-stream"},
		"Authorization": {"Bearer must-not-be-stored"},
	}}
	j, err := s.Finish(ctx, id, Outcome{State: state, Response: head, Body: body})
	if errors.Is(err, ErrFinished) {
		return // canceled meanwhile
	}
	if err != nil {
		out.fail("finish %s: %v", id, err)
	}
	out.ack(j, int64(size), hex.EncodeToString(sum.Sum(nil)))
}

// crashCanceler cancels jobs the writers handed over, a little later than they were created,
// so that some cancellations race updates and finishes.
func crashCanceler(s Store, out *crashOut, rng *rand.Rand, recent <-chan string) {
	var pool []string
	for id := range recent {
		pool = append(pool, id)
		if len(pool) < 4 {
			continue
		}
		i := rng.Intn(len(pool))
		victim := pool[i]
		pool = slices.Delete(pool, i, i+1)
		j, changed, err := s.Cancel(context.Background(), victim)
		if err != nil {
			out.fail("cancel %s: %v", victim, err)
		}
		if changed {
			out.ack(j, -1, "")
		}
	}
}

// crashAck is one acknowledged write.
type crashAck struct {
	id    string
	seq   uint64
	state State
	size  int64  // result body size, -1 without a result
	sum   string // sha256 of the result body, hex
}

func parseCrashAck(line string) (crashAck, error) {
	f := strings.Fields(line)
	if len(f) != 6 || f[0] != "ACK" {
		return crashAck{}, fmt.Errorf("malformed line %q", line)
	}
	seq, err1 := strconv.ParseUint(f[2], 10, 64)
	size, err2 := strconv.ParseInt(f[4], 10, 64)
	a := crashAck{id: f[1], seq: seq, state: State(f[3]), size: size, sum: f[5]}
	if err := errors.Join(err1, err2); err != nil || !a.state.Valid() || seq == 0 {
		return crashAck{}, fmt.Errorf("malformed line %q: %v", line, err)
	}
	if a.size < 0 {
		a.sum = ""
	}
	return a, nil
}

// crashJob is what the parent knows of one job from the acknowledgements.
type crashJob struct {
	acks     []crashAck
	maxSeq   uint64
	terminal *crashAck // the acknowledged end, if any
	round    int
	// After the first check: the job as recovery left it; it must never change again.
	finalSeq   uint64
	finalState State
}

type crashModel struct {
	jobs  map[string]*crashJob
	acks  int
	order []string // job ids in order of first acknowledgement
}

// add records a round's acknowledgements and returns the jobs they touched.
func (m *crashModel) add(t *testing.T, round int, acks []crashAck) []string {
	var touched []string
	for i := range acks {
		a := &acks[i]
		cj := m.jobs[a.id]
		if cj == nil {
			cj = &crashJob{round: round}
			m.jobs[a.id] = cj
			m.order = append(m.order, a.id)
			touched = append(touched, a.id)
		} else if cj.round != round {
			t.Errorf("job %s acknowledged in round %d and again in round %d", a.id, cj.round, round)
		}
		if a.state.Terminal() {
			if cj.terminal != nil {
				t.Errorf("job %s acknowledged as finished twice: seq %d %s and seq %d %s", a.id, cj.terminal.seq, cj.terminal.state, a.seq, a.state)
			}
			cj.terminal = a
		}
		cj.acks = append(cj.acks, *a)
		cj.maxSeq = max(cj.maxSeq, a.seq)
		m.acks++
	}
	return touched
}

func TestCrashDurability(t *testing.T) {
	rounds := 50
	if testing.Short() {
		rounds = 10
	}
	seed := time.Now().UnixNano()
	if v := os.Getenv(crashEnvSeed); v != "" {
		var err error
		if seed, err = strconv.ParseInt(v, 10, 64); err != nil {
			t.Fatalf("%s: %v", crashEnvSeed, err)
		}
	}
	t.Logf("seed %d (rerun with %s=%d)", seed, crashEnvSeed, seed)
	rng := rand.New(rand.NewSource(seed))
	path := filepath.Join(t.TempDir(), "progress.db")
	m := &crashModel{jobs: make(map[string]*crashJob)}
	start := time.Now()
	for round := 1; round <= rounds; round++ {
		delay := crashKillMin + time.Duration(rng.Int63n(int64(crashKillSpread)))
		acks := crashRound(t, round, path, rng.Int63(), delay)
		if t.Failed() {
			t.Fatalf("round %d: the child failed (seed %d)", round, seed)
		}
		touched := m.add(t, round, acks)
		s, err := openBolt(path, crashOptions())
		if err != nil {
			t.Fatalf("round %d: reopen after the kill: %v (seed %d)", round, err, seed)
		}
		crashCheckTouched(t, s, m, touched)
		crashCheckFile(t, s, m)
		crashCheckRecords(t, s, m)
		if round == rounds || round%10 == 0 {
			crashCheckHistory(t, s, m)
		}
		if err := s.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		if t.Failed() {
			t.Fatalf("round %d (killed %s after the store opened, %d acknowledged writes): check failed (seed %d)", round, delay, len(acks), seed)
		}
	}
	t.Logf("%d rounds, %d acknowledged writes on %d jobs in %s", rounds, m.acks, len(m.jobs), time.Since(start).Round(time.Millisecond))
}

// crashRound runs one child until it is killed delay after its store opened, and returns what
// it acknowledged.
func crashRound(t *testing.T, round int, path string, seed int64, delay time.Duration) []crashAck {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashEnvStore+"="+path, crashEnvChildSeed+"="+strconv.FormatInt(seed, 10))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	done := make(chan struct{})
	var lines []string
	var partial string
	go func() {
		defer close(done)
		r := bufio.NewReader(stdout)
		opened := false
		for { // ends at EOF: the child is dead
			line, err := r.ReadString('\n')
			if err != nil {
				partial = line // never acknowledged: the write did not complete
				return
			}
			line = strings.TrimSuffix(line, "\n")
			if line == "READY" && !opened {
				opened = true
				close(ready)
				continue
			}
			lines = append(lines, line)
		}
	}()
	exited := false
	select {
	case <-ready:
		kill := time.NewTimer(delay)
		select {
		case <-kill.C:
		case <-done:
			exited = true
		}
		kill.Stop()
	case <-done:
		exited = true
	case <-time.After(crashReadyWait):
		t.Errorf("round %d: the child did not open the store within %s", round, crashReadyWait)
	}
	killErr := cmd.Process.Kill() // SIGKILL: no deferred call, no Close, no flush runs
	<-done
	waitErr := cmd.Wait()
	if exited {
		t.Errorf("round %d: the child ended before it was killed: %v (kill: %v)", round, waitErr, killErr)
	} else if waitErr == nil {
		t.Errorf("round %d: the killed child exited cleanly", round)
	}
	if msg := stderr.String(); strings.Contains(msg, "DATA RACE") || strings.Contains(msg, "panic") || exited {
		t.Errorf("round %d: child stderr:\n%s", round, msg)
	}
	if partial != "" {
		t.Logf("round %d: the kill cut a line short: %q", round, partial)
	}
	var acks []crashAck
	for _, line := range lines {
		a, err := parseCrashAck(line)
		if err != nil {
			t.Errorf("round %d: child: %s", round, line)
			continue
		}
		acks = append(acks, a)
	}
	return acks
}

// crashDoc is what the checks read of an event's document.
type crashDoc struct {
	ID    string    `json:"id"`
	Seq   uint64    `json:"seq"`
	State State     `json:"state"`
	Error *JobError `json:"error"`
}

func crashEvent(s *boltStore, id string, seq uint64) (Event, crashDoc, error) {
	evs, err := s.Events(context.Background(), id, seq-1, 1)
	if err != nil {
		return Event{}, crashDoc{}, err
	}
	if len(evs) != 1 {
		return Event{}, crashDoc{}, fmt.Errorf("%d events after seq %d", len(evs), seq-1)
	}
	var doc crashDoc
	if err := json.Unmarshal(evs[0].Data, &doc); err != nil {
		return evs[0], doc, err
	}
	if doc.ID != id || doc.Seq != evs[0].Seq {
		return evs[0], doc, fmt.Errorf("event seq %d holds the document of %s seq %d", evs[0].Seq, doc.ID, doc.Seq)
	}
	return evs[0], doc, nil
}

// crashCheckAck checks that one acknowledged write is in the event log as acknowledged.
func crashCheckAck(t *testing.T, s *boltStore, a crashAck) {
	t.Helper()
	ev, doc, err := crashEvent(s, a.id, a.seq)
	switch {
	case err != nil:
		t.Errorf("job %s: acknowledged seq %d (%s) lost: %v", a.id, a.seq, a.state, err)
	case ev.Seq != a.seq || doc.State != a.state || ev.Done() != a.state.Terminal():
		t.Errorf("job %s: acknowledged seq %d %s, event has seq %d %s (%s)", a.id, a.seq, a.state, ev.Seq, doc.State, ev.Kind)
	}
}

// crashCheckResult checks the stored result of a job acknowledged as finished.
func crashCheckResult(t *testing.T, s *boltStore, j *Job, a *crashAck) {
	t.Helper()
	res, err := s.Result(context.Background(), a.id)
	if a.size < 0 {
		if !errors.Is(err, ErrNoResult) {
			t.Errorf("job %s: finished without a response, Result: %v", a.id, err)
		}
		if err == nil {
			res.Body.Close()
		}
		return
	}
	if err != nil {
		t.Errorf("job %s: acknowledged result of %d bytes lost: %v", a.id, a.size, err)
		return
	}
	defer res.Body.Close()
	h := sha256.New()
	n, err := io.Copy(h, res.Body)
	if err != nil || n != a.size || res.Size != a.size || hex.EncodeToString(h.Sum(nil)) != a.sum {
		t.Errorf("job %s: result of %d bytes (size %d, err %v) does not match the acknowledged %d bytes", a.id, n, res.Size, err, a.size)
	}
	if res.Header.Get("Authorization") != "" || res.Header.Get("Content-Type") != "application/octet-stream" {
		t.Errorf("job %s: result header %v", a.id, res.Header)
	}
	if j.Response == nil || j.Response.ContentLength != a.size {
		t.Errorf("job %s: response %+v, want content length %d", a.id, j.Response, a.size)
	}
}

// crashCheckTouched checks the jobs acknowledged in the round just killed, after recovery.
func crashCheckTouched(t *testing.T, s *boltStore, m *crashModel, touched []string) {
	t.Helper()
	ctx := context.Background()
	for _, id := range touched {
		cj := m.jobs[id]
		j, err := s.Get(ctx, id)
		if err != nil {
			t.Errorf("job %s: acknowledged up to seq %d, lost: %v", id, cj.maxSeq, err)
			continue
		}
		// An update of the job's writer may have committed without an acknowledgement, then
		// a cancellation without one or recovery.
		if j.Seq < cj.maxSeq || j.Seq > cj.maxSeq+2 {
			t.Errorf("job %s: seq %d after acknowledgements up to %d", id, j.Seq, cj.maxSeq)
		}
		for _, a := range cj.acks {
			crashCheckAck(t, s, a)
		}
		if !j.State.Terminal() {
			t.Errorf("job %s: left %s after recovery", id, j.State)
		}
		ev, doc, err := crashEvent(s, id, j.Seq)
		if err != nil || !ev.Done() || doc.State != j.State {
			t.Errorf("job %s: last event of seq %d (%s): %s %s, %v", id, j.Seq, j.State, ev.Kind, doc.State, err)
		}
		switch a := cj.terminal; {
		case a != nil:
			if j.State != a.state || j.Seq != a.seq {
				t.Errorf("job %s: acknowledged as %s at seq %d, found %s at seq %d", id, a.state, a.seq, j.State, j.Seq)
			}
			crashCheckResult(t, s, j, a)
		case j.State == Failed && j.Error != nil && j.Error.Code == CodeInterrupted:
			if doc.Error == nil || doc.Error.Code != CodeInterrupted {
				t.Errorf("job %s: interrupted, but its done event says %+v", id, doc.Error)
			}
		default:
			// Ended by a write that committed but was not acknowledged before the kill: it
			// may not be interrupted, but it must be whole.
			if j.Seq > cj.maxSeq+2 {
				t.Errorf("job %s: %s at seq %d, acknowledged up to %d", id, j.State, j.Seq, cj.maxSeq)
			}
		}
		cj.finalSeq, cj.finalState = j.Seq, j.State
	}
}

// crashCheckFile checks the indexes of unfinished jobs, bbolt's own consistency check and the
// results folder.
func crashCheckFile(t *testing.T, s *boltStore, m *crashModel) {
	t.Helper()
	entries, err := os.ReadDir(s.resultsDir)
	if err != nil {
		t.Fatal(err)
	}
	err = s.db.View(func(tx *bolt.Tx) error {
		if k, _ := tx.Bucket(bucketActive).Cursor().First(); k != nil {
			t.Errorf("active index still holds %x after recovery", k)
		}
		c := tx.Bucket(bucketOwners).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			if len(v) != 1 || !bytes.Contains([]byte("sfc"), v) {
				t.Errorf("owner index entry %x in state %q after recovery", k, v)
			}
		}
		for err := range tx.Check() {
			t.Errorf("bbolt check: %v", err)
		}
		results := tx.Bucket(bucketResults)
		for _, e := range entries {
			name := e.Name()
			if strings.HasPrefix(name, trashPrefix) || !validResultName(name) {
				t.Errorf("results folder holds %s after reopen", name)
				continue
			}
			id, _ := parseID(name[:idTextLen])
			v := results.Get(id[:])
			if v == nil {
				job := "no job"
				var j *Job
				if raw := tx.Bucket(bucketJobs).Get(id[:]); raw != nil {
					if j, err = decodeJob(raw); err != nil {
						t.Errorf("job %s: %v", name, err)
						continue
					}
					job = fmt.Sprintf("job %s at seq %d", j.State, j.Seq)
				}
				t.Errorf("result file %s belongs to no result record (%s)", name, job)
				continue
			}
			head, _, err := decodeResult(v)
			info, ierr := e.Info()
			if err != nil || ierr != nil || head.File != name || info.Size() != head.Size {
				t.Errorf("result file %s (%v, %v) does not match its record %+v", name, info, errors.Join(err, ierr), head)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// crashCheckRecords checks every job and result record the file holds.
func crashCheckRecords(t *testing.T, s *boltStore, m *crashModel) {
	t.Helper()
	files := 0
	err := s.db.View(func(tx *bolt.Tx) error {
		jobs := 0
		c := tx.Bucket(bucketJobs).Cursor()
		for k, v := c.First(); k != nil; k, v = c.Next() {
			jobs++
			j, err := decodeJob(v)
			if err != nil {
				t.Errorf("job %x: %v", k, err)
				continue
			}
			var rec jobRecord
			if err := json.Unmarshal(v, &rec); err != nil {
				t.Errorf("job %s: %v", j.ID, err)
				continue
			}
			id, _ := parseID(j.ID)
			if !bytes.Equal(id[:], k) {
				t.Errorf("job %s stored under %x", j.ID, k)
			}
			if !j.State.Terminal() {
				t.Errorf("job %s: %s after recovery", j.ID, j.State)
			}
			ev := tx.Bucket(bucketEvents).Get(eventKey(id, j.Seq))
			kind, doc, err := decodeEvent(ev)
			if err != nil || kind != KindDone || !bytes.Equal(doc, rec.Doc) {
				t.Errorf("job %s: last event %q (%v) is not the done event of the record", j.ID, kind, err)
			}
			if m.jobs[j.ID] == nil && j.Seq > 2 {
				// Never acknowledged: its creation and recovery, nothing else.
				t.Errorf("job %s: seq %d but never acknowledged", j.ID, j.Seq)
			}
		}
		if jobs < len(m.jobs) {
			t.Errorf("file holds %d jobs, %d were acknowledged", jobs, len(m.jobs))
		}
		rc := tx.Bucket(bucketResults).Cursor()
		for k, v := rc.First(); k != nil; k, v = rc.Next() {
			head, _, err := decodeResult(v)
			if err != nil {
				t.Errorf("result %x: %v", k, err)
				continue
			}
			if tx.Bucket(bucketJobs).Get(k) == nil {
				t.Errorf("result %x belongs to no job", k)
			}
			if head.File != "" {
				files++
				if head.File[:idTextLen] != idEncoding.EncodeToString(k) {
					t.Errorf("result %x names the file %s of another job", k, head.File)
				}
				if _, err := os.Stat(filepath.Join(s.resultsDir, head.File)); err != nil {
					t.Errorf("result %x: %v", k, err)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if entries, err := os.ReadDir(s.resultsDir); err != nil || len(entries) != files {
		t.Errorf("results folder holds %d files, %d result records refer to one (%v)", len(entries), files, err)
	}
}

// crashCheckHistory checks everything ever acknowledged, in every round so far.
func crashCheckHistory(t *testing.T, s *boltStore, m *crashModel) {
	t.Helper()
	ctx := context.Background()
	for _, id := range m.order {
		cj := m.jobs[id]
		j, err := s.Get(ctx, id)
		if err != nil {
			t.Errorf("job %s: %v", id, err)
			continue
		}
		if j.Seq != cj.finalSeq || j.State != cj.finalState {
			t.Errorf("job %s: changed from %s seq %d to %s seq %d in a later round", id, cj.finalState, cj.finalSeq, j.State, j.Seq)
		}
		for _, a := range cj.acks {
			crashCheckAck(t, s, a)
		}
		if cj.terminal != nil {
			crashCheckResult(t, s, j, cj.terminal)
		}
	}
}
