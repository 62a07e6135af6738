package store

import (
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// The journal makes a running job's progress durable with one small write and one fdatasync,
// instead of a bbolt commit per report (two fsyncs, and the branch and leaf nodes on the paths
// of the job's record and event rebuilt and rewritten). At 1,000 reports/s nearly every report
// got a commit of its own, and those commits made half of Caddy's garbage and most of its
// delivery latency tail (BENCHMARKS.md, "A journal in front of bbolt").
//
// Only one kind of change goes through it: a running job that stays running (a progress
// report). Creation, the start, the end, cancellation and deletion still commit to bbolt, so
// everything the indexes hold is in bbolt, and the journal only ever holds newer versions of
// records bbolt already has.
//
// It is two preallocated files beside the store file, <file>.journal.0 and .1. Records are
// written into one, the active file, in place (the file's size never changes, so fdatasync
// flushes data blocks alone). About once a second (CheckpointInterval), or when the active
// file is half full, a checkpoint seals it, makes the other file active, copies the sealed
// file's changes into bbolt in one transaction of the group commit, and frees the file for
// reuse. Each use of a file has a new epoch, written in each of its records, so that a scan
// tells this use's records from an earlier one's left further on.
//
// Readers see journaled changes through pending, the changes not yet checkpointed, kept in
// memory until the checkpoint's transaction has committed. A reader takes the job's pending
// changes before it opens its read transaction, so whatever a checkpoint removes from pending
// is already in the transaction it reads.
//
// Copying a change into bbolt (applyJournaled) is idempotent: it skips a change whose job is
// gone or whose record in bbolt is as new or newer. Open replays both files through it, older
// epoch first, before it ends interrupted jobs; a change of a job that ended (or was deleted)
// in bbolt after the change was journaled is skipped, and one that committed to bbolt before
// is kept. A bbolt write of a job with pending changes (its end, say) copies them first, in
// the same transaction, so its event log has no gap.

// Journal defaults.
const (
	DefaultJournalSize        = 16 << 20
	MinJournalSize            = 1 << 20
	DefaultCheckpointInterval = time.Second
)

type journal struct {
	files [2]*os.File
	size  int64 // of each file
	kick  chan struct{}
	// failed is set after a write or fdatasync fails: the file's state is then unknown, and
	// changes go to bbolt from then on.
	failed atomic.Bool

	mu     sync.Mutex
	freed  sync.Cond // signalled when a checkpoint frees the sealed file
	active int
	epoch  uint64 // of the active file's use
	off    int64  // where the next record goes in the active file
	sealed bool   // files[1-active] holds changes bbolt may not have yet
	// checkpointErr is why the last checkpoint failed (nil after one succeeds): a writer
	// that needs the sealed file then fails with it instead of waiting.
	checkpointErr error
	changes       [2][]*change
	buf           []byte

	pending pending
	observe func(took time.Duration, writes int)
}

// journalPath names journal file i of the store file at path.
func journalPath(path string, i int) string { return fmt.Sprintf("%s.journal.%d", path, i) }

// openJournal opens (or makes) the journal files of the store file at path and returns the
// changes they hold, older file first, for the caller to replay before the journal is used.
func openJournal(path string, size int64, observe func(time.Duration, int)) (*journal, []journalEntry, error) {
	j := &journal{size: size, kick: make(chan struct{}, 1), observe: observe}
	j.freed.L = &j.mu
	j.pending.jobs = make(map[rawID][]*change)
	for i := range j.files {
		f, err := os.OpenFile(journalPath(path, i), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			j.closeFiles()
			return nil, nil, fmt.Errorf("store: journal: %w", err)
		}
		j.files[i] = f
	}
	entries, epoch, err := scanJournal(path)
	if err != nil {
		j.closeFiles()
		return nil, nil, err
	}
	// Above every epoch either file holds, and (by the clock) above those of earlier
	// processes, whose records may lie further on in a file whose first record was cleared:
	// a scan must never read on into them.
	j.epoch = max(epoch+1, uint64(time.Now().UnixNano()))
	return j, entries, nil
}

// scanJournal reads the journal files of the store file at path that exist, and returns the
// changes they hold, the older file's first, and the highest epoch.
func scanJournal(path string) (entries []journalEntry, epoch uint64, err error) {
	type scanned struct {
		epoch   uint64
		entries []journalEntry
	}
	var found []scanned
	for i := range 2 {
		name := journalPath(path, i)
		data, err := os.ReadFile(name)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, 0, fmt.Errorf("store: journal: %w", err)
		}
		e, es, err := decodeJournal(data)
		if err != nil {
			return nil, 0, fmt.Errorf("%w (%s)", err, name)
		}
		if len(es) > 0 {
			found = append(found, scanned{e, es})
			epoch = max(epoch, e)
		}
	}
	if len(found) == 2 && found[1].epoch < found[0].epoch {
		found[0], found[1] = found[1], found[0]
	}
	for _, f := range found {
		entries = append(entries, f.entries...)
	}
	return entries, epoch, nil
}

// reset makes both files empty journals of the configured size, once their changes are in
// bbolt: it zeroes the first record of each (or preallocates a file of another size) and
// fdatasyncs.
func (j *journal) reset(path string) error {
	for i, f := range j.files {
		info, err := f.Stat()
		if err != nil {
			return fmt.Errorf("store: journal: %w", err)
		}
		if info.Size() == j.size {
			if _, err := f.WriteAt(make([]byte, journalHeaderLen), 0); err != nil {
				return fmt.Errorf("store: journal: %w", err)
			}
			if err := unix.Fdatasync(int(f.Fd())); err != nil {
				return fmt.Errorf("store: journal: %w", err)
			}
			continue
		}
		if err := preallocate(f, j.size); err != nil {
			return fmt.Errorf("store: journal %s: %w", journalPath(path, i), err)
		}
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("store: journal: %w", err)
	}
	return nil
}

// preallocate makes f size bytes of zeros, written out, so that writes in place never change
// its size or its block map (fdatasync then writes no metadata).
func preallocate(f *os.File, size int64) error {
	if err := f.Truncate(0); err != nil {
		return err
	}
	zeros := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(zeros)) {
		if _, err := f.WriteAt(zeros[:min(int64(len(zeros)), size-off)], off); err != nil {
			return err
		}
	}
	return f.Sync()
}

func (j *journal) closeFiles() {
	for _, f := range j.files {
		if f != nil {
			f.Close()
		}
	}
}

// takes reports whether a change from prev to next goes to the journal: progress of a
// running job, with nothing else to store in the same transaction.
func (j *journal) takes(prev, next *Job, extra func(*bolt.Tx) error) bool {
	return j != nil && extra == nil && prev.State == Running && next.State == Running && !j.failed.Load()
}

// write is the journal committer's flush: it writes the batch's records, fdatasyncs, hands
// the changes to pending, then publishes and answers each op in order.
func (j *journal) write(batch []*op) {
	began := time.Now()
	j.mu.Lock()
	durable, err := j.writeLocked(batch)
	j.mu.Unlock()
	if j.observe != nil {
		j.observe(time.Since(began), len(batch))
	}
	for i, o := range batch {
		if i < durable {
			o.finish(nil)
		} else {
			o.finish(err)
		}
	}
}

// writeLocked writes the records of batch, going on in the other file when the active one is
// full, and returns how many of its ops are durable.
func (j *journal) writeLocked(batch []*op) (durable int, err error) {
	if j.failed.Load() {
		return 0, errJournalFailed
	}
	j.buf = j.buf[:0]
	for i, o := range batch {
		c := o.change
		need := int64(journalRecordLen(c.rec, c.evV))
		if need > j.size {
			// Not reachable with the limits Open checks (a record is about twice
			// max_event_size); kept so that a change never goes unwritten silently.
			err = fmt.Errorf("store: a journal record of %d bytes does not fit a journal file of %d", need, j.size)
			break
		}
		if j.off+int64(len(j.buf))+need > j.size {
			if err = j.flushLocked(batch[durable:i]); err != nil {
				break
			}
			durable = i
			if err = j.switchLocked(); err != nil {
				break
			}
		}
		j.buf = appendJournalRecord(j.buf, j.epoch, c.id, c.job.Seq, c.rec, c.evV)
	}
	if err == nil {
		if err = j.flushLocked(batch[durable:]); err == nil {
			durable = len(batch)
		}
	}
	return durable, err
}

var errJournalFailed = errors.New("store: the journal failed earlier; progress goes to the database file")

// flushLocked writes j.buf, which holds the records of ops, at the end of the active file and
// fdatasyncs it.
func (j *journal) flushLocked(ops []*op) error {
	if len(j.buf) == 0 {
		return nil
	}
	f := j.files[j.active]
	_, err := f.WriteAt(j.buf, j.off)
	if err == nil {
		err = unix.Fdatasync(int(f.Fd()))
	}
	if err != nil {
		// After a failed fdatasync the kernel may have dropped the dirty pages: what the
		// file holds is unknown, so nothing more is written to it.
		j.failed.Store(true)
		return fmt.Errorf("store: journal: %w", err)
	}
	j.off += int64(len(j.buf))
	j.buf = j.buf[:0]
	for _, o := range ops {
		j.changes[j.active] = append(j.changes[j.active], o.change)
	}
	j.pending.add(ops)
	if j.off > j.size/2 {
		j.askCheckpoint()
	}
	return nil
}

// switchLocked makes the other file active, waiting for a checkpoint to free it if need be.
func (j *journal) switchLocked() error {
	for j.sealed {
		if j.checkpointErr != nil {
			// A full disk, say: the report is refused now rather than held until space
			// returns. The next checkpoint that succeeds frees the file.
			return fmt.Errorf("store: the journal is full and its reports cannot be copied into the store file: %w", j.checkpointErr)
		}
		j.askCheckpoint()
		j.freed.Wait()
	}
	j.sealed, j.active, j.off = true, 1-j.active, 0
	j.epoch++
	j.askCheckpoint()
	return nil
}

func (j *journal) askCheckpoint() {
	select {
	case j.kick <- struct{}{}:
	default:
	}
}

// seal returns the changes of the file to checkpoint: the sealed file, or else the active one
// if it holds any, which it seals. ok is false when there is nothing to checkpoint.
func (j *journal) seal() (file int, changes []*change, ok bool) {
	j.mu.Lock()
	defer j.mu.Unlock()
	if !j.sealed {
		if j.off == 0 {
			return 0, nil, false
		}
		j.sealed, j.active, j.off = true, 1-j.active, 0
		j.epoch++
	}
	file = 1 - j.active
	return file, j.changes[file], true
}

// release frees a sealed file once its changes are in bbolt.
func (j *journal) release(file int, changes []*change) {
	j.mu.Lock()
	j.changes[file] = nil
	j.sealed, j.checkpointErr = false, nil
	j.freed.Broadcast()
	j.mu.Unlock()
	j.pending.remove(changes)
}

// checkpointFailed wakes the writers waiting for the sealed file, to fail with err.
func (j *journal) checkpointFailed(err error) {
	j.mu.Lock()
	j.checkpointErr = err
	j.freed.Broadcast()
	j.mu.Unlock()
}

// pendingOf returns the job's changes that are durable in the journal and maybe not yet in
// bbolt, oldest first. The caller must not change them.
func (j *journal) pendingOf(id rawID) []*change {
	if j == nil {
		return nil
	}
	return j.pending.of(id)
}

// pending holds the journaled changes bbolt may not have yet, by job, oldest first.
type pending struct {
	mu   sync.Mutex
	jobs map[rawID][]*change
}

func (p *pending) add(ops []*op) {
	p.mu.Lock()
	for _, o := range ops {
		// Appending never changes what an earlier of() returned: readers hold a slice cut
		// to its length.
		p.jobs[o.change.id] = append(p.jobs[o.change.id], o.change)
	}
	p.mu.Unlock()
}

func (p *pending) of(id rawID) []*change {
	p.mu.Lock()
	cs := p.jobs[id]
	p.mu.Unlock()
	return cs[:len(cs):len(cs)]
}

// remove drops changes a checkpoint has stored, and any older change of the same jobs.
func (p *pending) remove(changes []*change) {
	newest := make(map[rawID]uint64)
	for _, c := range changes {
		newest[c.id] = max(newest[c.id], c.job.Seq)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, seq := range newest {
		cs := p.jobs[id]
		keep := 0
		for keep < len(cs) && cs[keep].job.Seq <= seq {
			keep++
		}
		if keep == len(cs) {
			delete(p.jobs, id)
			continue
		}
		// A copy, not a reslice in place: readers may hold the old slice.
		p.jobs[id] = append([]*change(nil), cs[keep:]...)
	}
}

// newestOf returns the newest of j and the job's pending changes.
func newestOf(j *Job, pend []*change) *Job {
	if n := len(pend); n > 0 && pend[n-1].job.Seq > j.Seq {
		return pend[n-1].job.clone()
	}
	return j
}

// withPending completes events read from bbolt (after `after`, at most limit) with the job's
// pending changes, as readEvents would have read them had the changes been checkpointed: the
// log keeps the newest keep events, and a reader from before them gets the newest alone.
func withPending(evs []Event, pend []*change, after uint64, limit, keep int) []Event {
	if len(pend) == 0 || limit <= 0 {
		return evs
	}
	newest := pend[len(pend)-1].ev
	if n := len(evs); newest.Seq <= after || (n > 0 && evs[n-1].Seq >= newest.Seq) {
		return evs // bbolt has all there is (a job that ended since, say)
	}
	if after+uint64(keep) < newest.Seq || (len(evs) > 0 && evs[0].Seq != after+1) {
		// Compacted: the newest document alone.
		return []Event{newest}
	}
	next := after + 1 + uint64(len(evs))
	for _, c := range pend {
		if len(evs) >= limit {
			break
		}
		if c.ev.Seq == next {
			evs = append(evs, c.ev)
			next++
		}
	}
	return evs
}

// entriesOf turns changes into journal entries for applyJournaled.
func entriesOf(changes []*change) []journalEntry {
	entries := make([]journalEntry, len(changes))
	for i, c := range changes {
		entries[i] = journalEntry{id: c.id, seq: c.job.Seq, rec: c.rec, ev: c.evV}
	}
	return entries
}

// applyJournaled copies journaled changes into bbolt inside tx, in order, skipping those of
// jobs that are gone and those bbolt already has (or has something newer than). Each job's
// record is written once, at its newest change; every change's event is written.
func (s *boltStore) applyJournaled(tx *bolt.Tx, entries []journalEntry) error {
	if len(entries) == 0 {
		return nil
	}
	fillAppendBuckets(tx)
	jobs, events := tx.Bucket(bucketJobs), tx.Bucket(bucketEvents)
	stored := make(map[rawID]uint64, len(entries)) // the seq bbolt has; MaxUint64: job gone
	newest := make(map[rawID]int, len(entries))    // each job's last entry
	for i := range entries {
		newest[entries[i].id] = i
	}
	for i := range entries {
		e := &entries[i] // bbolt keeps keys and values until the commit: they must not move
		seq, ok := stored[e.id]
		if !ok {
			var err error
			if seq, err = storedSeq(jobs.Get(e.id[:])); err != nil {
				return err
			}
		}
		if e.seq <= seq {
			stored[e.id] = seq
			continue
		}
		if newest[e.id] == i {
			if err := jobs.Put(e.id[:], e.rec); err != nil {
				return err
			}
		}
		if err := s.appendEvent(events, e.id, e.seq, e.ev); err != nil {
			return err
		}
		stored[e.id] = e.seq
	}
	return nil
}

// storedSeq is the seq of a stored job record; MaxUint64 when there is none (the job is gone).
func storedSeq(rec []byte) (uint64, error) {
	if rec == nil {
		return math.MaxUint64, nil
	}
	if seq, ok := recordSeq(rec); ok {
		return seq, nil
	}
	j, err := decodeJob(rec)
	if err != nil {
		return 0, err
	}
	return j.Seq, nil
}

// openJournal opens the journal and replays what it holds into bbolt; Open calls it before it
// ends interrupted jobs, so that they end on their newest progress.
func (s *boltStore) openJournal() error {
	if s.opts.JournalSize < 0 {
		return s.dropJournal()
	}
	j, entries, err := openJournal(s.path, s.opts.JournalSize, s.opts.ObserveCommit)
	if err != nil {
		return err
	}
	if err = s.replayJournal(entries); err == nil {
		err = j.reset(s.path)
	}
	if err != nil {
		j.closeFiles()
		return err
	}
	s.journal = j
	s.journalCommits = newCommitter(s.opts.MaxBatch, j.write)
	return nil
}

// replayJournal copies what Open found in the journal into bbolt, in one transaction.
func (s *boltStore) replayJournal(entries []journalEntry) error {
	if len(entries) == 0 {
		return nil
	}
	if err := s.db.Update(func(tx *bolt.Tx) error { return s.applyJournaled(tx, entries) }); err != nil {
		return fmt.Errorf("store: replay the journal: %w", err)
	}
	return nil
}

// dropJournal replays and removes the journal files a process with the journal on left
// behind, for a store opened with the journal off: what they hold was acknowledged.
func (s *boltStore) dropJournal() error {
	entries, _, err := scanJournal(s.path)
	if err != nil {
		return err
	}
	if err := s.replayJournal(entries); err != nil {
		return err
	}
	for i := range 2 {
		if err := os.Remove(journalPath(s.path, i)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("store: journal: %w", err)
		}
	}
	return nil
}

// checkpointLoop checkpoints every CheckpointInterval, and when the journal asks.
func (s *boltStore) checkpointLoop() {
	defer s.checkpointing.Done()
	t := time.NewTicker(s.opts.CheckpointInterval)
	defer t.Stop()
	for {
		select {
		case <-s.stopCheckpoints:
			return
		case <-t.C:
		case <-s.journal.kick:
		}
		switch err := s.checkpoint(); {
		case errors.Is(err, ErrClosed):
			return
		case err != nil:
			// bbolt's failure, which every write now meets (a full disk, say): the sealed
			// file stays sealed, and the next tick tries again.
			s.journal.checkpointFailed(err)
		}
	}
}

// checkpoint copies the changes of one journal file into bbolt and frees the file: the sealed
// file if there is one, else the active file. Two calls in a row, with no write between,
// leave every journaled change in bbolt.
func (s *boltStore) checkpoint() error {
	s.checkpointMu.Lock()
	defer s.checkpointMu.Unlock()
	file, changes, ok := s.journal.seal()
	if !ok {
		return nil
	}
	entries := entriesOf(changes)
	err := s.commits.do(func(tx *bolt.Tx) error { return s.applyJournaled(tx, entries) }, nil)
	if err != nil {
		return err
	}
	s.journal.release(file, changes)
	return nil
}

// closeJournal refuses new journal writes, checkpoints everything, and empties the files.
func (s *boltStore) closeJournal() error {
	if s.journal == nil {
		return nil
	}
	s.journalCommits.close()
	close(s.stopCheckpoints)
	s.checkpointing.Wait()
	var err error
	for range 2 { // the sealed file, then the active one
		if err = s.checkpoint(); err != nil {
			break
		}
	}
	if err == nil {
		err = s.journal.reset(s.path)
	}
	s.journal.closeFiles()
	return err
}
