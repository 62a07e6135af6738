// Package store keeps caddy-progress jobs: their documents, their event logs, the upstream
// responses they end with, and the live feed that long-poll and Server-Sent Events read.
//
// # Model
//
// A job is a document (type Job) that changes over time. Every change appends an Event whose
// Seq is the job's seq after the change: contiguous from 1, one per change, and the Event's Data
// is the whole document encoded once as one line of JSON, ready to be written to any number of
// subscribers. The last event of a job is its done event; no event follows it.
//
// The Store interface is all the rest of the code sees. Open returns the embedded
// implementation, a single bbolt file; a networked implementation for several Caddy instances
// will satisfy the same interface, so no bbolt type appears in it.
//
// # Durability
//
// A method that changes a job returns only once the change is on disk (bbolt fsyncs on every
// commit). Concurrent writers share commits: one goroutine commits whatever has queued while the
// previous commit was running, so a lone writer pays one commit and many writers pay one commit
// between them (group commit). Events are published to subscribers after their commit, so no
// subscriber ever sees a change that a crash could take back.
//
// Progress of a running job, the most frequent change, is made durable in a journal beside the
// file instead (journal.go): one write and one fdatasync per group of reports, copied into
// bbolt about once a second and replayed by Open.
//
// # Live feed
//
// Subscriptions replay the stored log after a given seq and then follow the live tail with no
// gap and no duplicate at the seam. Progress is state, not a log: the live tail keeps only a
// short ring of recent events per watched job, and a subscriber that falls behind the ring is
// handed the newest document instead of a queue of stale ones. Publishing never waits for a
// subscriber.
//
// # Layout of the bbolt file
//
// A job id begins with its creation time in milliseconds, so each tree keyed by id grows at its
// right edge and the jobs of one commit share a few pages.
//
//	jobs     id → job record (the document plus private fields)
//	events   id ‖ seq → event (kind byte ‖ document)
//	active   id → ∅                        jobs queued or running; recovery reads only these
//	expiry   expires_at ‖ id → ∅           finished jobs by deadline; retention reads only these
//	owners   owner hash ‖ created ‖ id → state
//	idem     owner hash ‖ key hash → id     Idempotency-Key look-up
//	results  id → result head (status, headers, size, small bodies inline)
//	meta     "secret" → 32 random bytes
//
// The journal is two files beside the database, "<file>.journal.0" and ".1", of JournalSize
// each (see journal.go and record.go for their records).
//
// Result bodies above the inline limit live in files beside the database, in the folder
// "<file>.results", each under a name of its own ("<id>-<random>"), fsynced before the commit
// whose result record names it; Open removes the files no record names.
package store
