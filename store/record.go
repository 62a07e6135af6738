package store

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"net/http"
	"time"
)

// This file holds the encodings of stored keys and records, so that every decoder of what is
// on disk sits in one place (and is fuzzed in record_fuzz_test.go).

// A job id is a 48-bit big-endian creation time in milliseconds followed by 144 random bits.
// The random bits make it unguessable (DESIGN.md asks for at least 128); the time prefix makes
// the keys of every tree keyed by id (jobs, events, active, results) grow at the right edge, so
// that the jobs of one commit share a few leaf pages instead of dirtying a random page each in
// every tree (BENCHMARKS.md, issue 3). 24 bytes make 32 base64url characters with no padding
// bits, so an id has exactly one spelling.
const (
	idTimeLen  = 6  // milliseconds since 1970 fit 48 bits until the year 10889
	idRandLen  = 18 // 144 random bits
	idLen      = idTimeLen + idRandLen
	idTextLen  = 32 // base64url, unpadded
	hashLen    = 32 // HMAC-SHA256
	seqLen     = 8
	timeLen    = 8
	recVersion = 1
)

var idEncoding = base64.RawURLEncoding

type rawID [idLen]byte

// newID makes the id of a job created at now.
func newID(now time.Time) (rawID, string) {
	var id rawID
	ms := uint64(now.UnixMilli())
	for i := idTimeLen - 1; i >= 0; i-- {
		id[i] = byte(ms)
		ms >>= 8
	}
	if _, err := rand.Read(id[idTimeLen:]); err != nil {
		panic(err) // crypto/rand never fails on Linux; a job id without entropy must not exist
	}
	return id, idEncoding.EncodeToString(id[:])
}

// parseID decodes a job id; anything that is not exactly 32 base64url characters is unknown.
func parseID(s string) (rawID, bool) {
	var id rawID
	if len(s) != idTextLen {
		return id, false
	}
	n, err := idEncoding.Decode(id[:], []byte(s))
	if err != nil || n != idLen || idEncoding.EncodeToString(id[:]) != s {
		return id, false
	}
	return id, true
}

func eventKey(id rawID, seq uint64) []byte {
	k := make([]byte, idLen+seqLen)
	copy(k, id[:])
	binary.BigEndian.PutUint64(k[idLen:], seq)
	return k
}

// decodeEventKey splits an events key into job id and seq.
func decodeEventKey(k []byte) (rawID, uint64, error) {
	var id rawID
	if len(k) != idLen+seqLen {
		return id, 0, fmt.Errorf("store: event key of %d bytes", len(k))
	}
	copy(id[:], k)
	return id, binary.BigEndian.Uint64(k[idLen:]), nil
}

func expiryKey(t time.Time, id rawID) []byte {
	k := make([]byte, timeLen+idLen)
	binary.BigEndian.PutUint64(k, uint64(t.UnixNano()))
	copy(k[timeLen:], id[:])
	return k
}

func decodeExpiryKey(k []byte) (time.Time, rawID, error) {
	var id rawID
	if len(k) != timeLen+idLen {
		return time.Time{}, id, fmt.Errorf("store: expiry key of %d bytes", len(k))
	}
	copy(id[:], k[timeLen:])
	return time.Unix(0, int64(binary.BigEndian.Uint64(k))), id, nil
}

// ownerKey orders an owner's jobs by creation time.
func ownerKey(ownerHash []byte, created time.Time, id rawID) []byte {
	k := make([]byte, 0, hashLen+timeLen+idLen)
	k = append(k, ownerHash...)
	k = binary.BigEndian.AppendUint64(k, uint64(created.UnixNano()))
	return append(k, id[:]...)
}

func decodeOwnerKey(k []byte) (rawID, error) {
	var id rawID
	if len(k) != hashLen+timeLen+idLen {
		return id, fmt.Errorf("store: owner key of %d bytes", len(k))
	}
	copy(id[:], k[hashLen+timeLen:])
	return id, nil
}

func idemKey(ownerHash, keyHash []byte) []byte {
	return append(append(make([]byte, 0, 2*hashLen), ownerHash...), keyHash...)
}

// Event values are one kind byte followed by the job document.
const (
	eventByteProgress = 'p'
	eventByteDone     = 'd'
)

func encodeEvent(kind EventKind, doc []byte) []byte {
	v := make([]byte, 1+len(doc))
	v[0] = eventByteProgress
	if kind == KindDone {
		v[0] = eventByteDone
	}
	copy(v[1:], doc)
	return v
}

// decodeEvent reads an event value; data aliases v.
func decodeEvent(v []byte) (EventKind, []byte, error) {
	if len(v) < 2 {
		return "", nil, errors.New("store: short event record")
	}
	switch v[0] {
	case eventByteProgress:
		return KindProgress, v[1:], nil
	case eventByteDone:
		return KindDone, v[1:], nil
	}
	return "", nil, fmt.Errorf("store: event record of unknown kind %q", v[0])
}

// jobRecord is the stored form of a job: the public document, encoded once and shared with the
// job's newest event, plus the private fields.
type jobRecord struct {
	V           int               `json:"v"`
	Doc         json.RawMessage   `json:"doc"`
	Owner       []byte            `json:"owner,omitempty"`
	Idem        []byte            `json:"idem,omitempty"`
	Fingerprint []byte            `json:"fp,omitempty"`
	Route       string            `json:"route,omitempty"`
	Attrs       map[string]string `json:"attrs,omitempty"`
}

// jobPrivate is jobRecord without the document.
type jobPrivate struct {
	V           int               `json:"v"`
	Owner       []byte            `json:"owner,omitempty"`
	Idem        []byte            `json:"idem,omitempty"`
	Fingerprint []byte            `json:"fp,omitempty"`
	Route       string            `json:"route,omitempty"`
	Attrs       map[string]string `json:"attrs,omitempty"`
}

// encodeJob makes a job record around doc, which json.Marshal made. The document is spliced in
// rather than marshalled as a json.RawMessage, which would scan and compact it again.
func encodeJob(j *Job, doc []byte) ([]byte, error) {
	priv, err := json.Marshal(jobPrivate{
		V: recVersion, Owner: j.OwnerHash, Idem: j.idemHash,
		Fingerprint: j.fingerprint, Route: j.Route, Attrs: j.Attrs,
	})
	if err != nil {
		return nil, err
	}
	rec := make([]byte, 0, len(priv)+len(`,"doc":`)+len(doc))
	rec = append(rec, priv[:len(priv)-1]...) // without its closing brace
	rec = append(rec, `,"doc":`...)
	rec = append(rec, doc...)
	return append(rec, '}'), nil
}

// decodeJob reads a job record and checks what the rest of the store relies on.
func decodeJob(v []byte) (*Job, error) {
	var rec jobRecord
	if err := json.Unmarshal(v, &rec); err != nil {
		return nil, fmt.Errorf("store: job record: %w", err)
	}
	if rec.V != recVersion {
		return nil, fmt.Errorf("store: job record version %d, want %d", rec.V, recVersion)
	}
	var j Job
	if err := json.Unmarshal(rec.Doc, &j); err != nil {
		return nil, fmt.Errorf("store: job document: %w", err)
	}
	if _, ok := parseID(j.ID); !ok {
		return nil, fmt.Errorf("store: job record with malformed id %q", j.ID)
	}
	if !j.State.Valid() || j.Seq == 0 {
		return nil, fmt.Errorf("store: job record %s with state %q seq %d", j.ID, j.State, j.Seq)
	}
	if (rec.Owner != nil && len(rec.Owner) != hashLen) || (rec.Idem != nil && len(rec.Idem) != hashLen) {
		return nil, fmt.Errorf("store: job record %s with malformed hashes", j.ID)
	}
	j.OwnerHash, j.idemHash, j.fingerprint = rec.Owner, rec.Idem, rec.Fingerprint
	j.Route, j.Attrs = rec.Route, rec.Attrs
	return &j, nil
}

// resultHead is the stored head of an upstream response. The record is a uvarint length, the
// head as JSON, then the body when it is kept inline.
type resultHead struct {
	Status int         `json:"status"`
	Header http.Header `json:"header,omitempty"`
	Size   int64       `json:"size"`
	// File names the body's file in the results folder; "" when the body is inline.
	File string `json:"file,omitempty"`
}

// validResultName reports whether name can be a result file's name: a job id, a dash and a
// suffix, all within the results folder (a record is never a path from outside, but a decoder
// must not trust what it reads).
func validResultName(name string) bool {
	if len(name) <= idTextLen+1 || len(name) > idTextLen+64 || name[idTextLen] != '-' {
		return false
	}
	if _, ok := parseID(name[:idTextLen]); !ok {
		return false
	}
	for _, c := range []byte(name[idTextLen+1:]) {
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

func encodeResult(h resultHead, inline []byte) ([]byte, error) {
	head, err := json.Marshal(h)
	if err != nil {
		return nil, err
	}
	v := binary.AppendUvarint(make([]byte, 0, binary.MaxVarintLen64+len(head)+len(inline)), uint64(len(head)))
	v = append(v, head...)
	return append(v, inline...), nil
}

// decodeResult reads a result record; the inline body aliases v.
func decodeResult(v []byte) (resultHead, []byte, error) {
	var h resultHead
	n, w := binary.Uvarint(v)
	if w <= 0 || n > uint64(len(v)-w) {
		return h, nil, errors.New("store: malformed result record")
	}
	if err := json.Unmarshal(v[w:w+int(n)], &h); err != nil {
		return h, nil, fmt.Errorf("store: result head: %w", err)
	}
	body := v[w+int(n):]
	file := h.File != ""
	if h.Status < 100 || h.Status > 999 || h.Size < 0 || (!file && int64(len(body)) != h.Size) || (file && (len(body) != 0 || !validResultName(h.File))) {
		return h, nil, fmt.Errorf("store: result record with status %d size %d and %d inline bytes", h.Status, h.Size, len(body))
	}
	return h, body, nil
}

// A journal record (journal.go) is one progress change of a running job:
//
//	length  uint32   of the payload
//	crc     uint32   CRC-32C of epoch ‖ payload
//	epoch   uint64   of the journal file's current use
//	payload          id (24 bytes) ‖ seq (8) ‖ uvarint length of the job record ‖ job record ‖ event
//
// A scan of a file stops at the first record that does not check: zeros past the end, a torn
// write, or a record of an earlier use of the file (another epoch).
const journalHeaderLen = 4 + 4 + 8

var journalCRC = crc32.MakeTable(crc32.Castagnoli)

// journalEntry is a decoded journal record; rec and ev alias the buffer it was read from.
type journalEntry struct {
	id  rawID
	seq uint64
	rec []byte // the job record
	ev  []byte // the stored event
}

// appendJournalRecord appends the record of one change to buf.
func appendJournalRecord(buf []byte, epoch uint64, id rawID, seq uint64, rec, ev []byte) []byte {
	start := len(buf)
	buf = append(buf, make([]byte, journalHeaderLen)...)
	binary.BigEndian.PutUint64(buf[start+8:], epoch)
	buf = append(buf, id[:]...)
	buf = binary.BigEndian.AppendUint64(buf, seq)
	buf = binary.AppendUvarint(buf, uint64(len(rec)))
	buf = append(buf, rec...)
	buf = append(buf, ev...)
	binary.BigEndian.PutUint32(buf[start:], uint32(len(buf)-start-journalHeaderLen))
	binary.BigEndian.PutUint32(buf[start+4:], crc32.Checksum(buf[start+8:], journalCRC))
	return buf
}

// decodeJournal reads the records at the start of a journal file that belong to the epoch of
// the first one. Whatever follows the first record that does not check is ignored; a record
// that checks but does not decode is an error, as it cannot come from a torn write.
func decodeJournal(data []byte) (epoch uint64, entries []journalEntry, err error) {
	for off := 0; len(data)-off >= journalHeaderLen; {
		n := int(binary.BigEndian.Uint32(data[off:]))
		sum := binary.BigEndian.Uint32(data[off+4:])
		e := binary.BigEndian.Uint64(data[off+8:])
		if n == 0 || n > len(data)-off-journalHeaderLen {
			break
		}
		body := data[off+8 : off+journalHeaderLen+n]
		if crc32.Checksum(body, journalCRC) != sum || (len(entries) > 0 && e != epoch) {
			break
		}
		entry, err := decodeJournalPayload(body[8:])
		if err != nil {
			return 0, nil, fmt.Errorf("store: journal record at offset %d: %w", off, err)
		}
		epoch = e
		entries = append(entries, entry)
		off += journalHeaderLen + n
	}
	return epoch, entries, nil
}

func decodeJournalPayload(p []byte) (journalEntry, error) {
	var e journalEntry
	if len(p) < idLen+seqLen {
		return e, errors.New("short record")
	}
	copy(e.id[:], p)
	e.seq = binary.BigEndian.Uint64(p[idLen:])
	p = p[idLen+seqLen:]
	n, w := binary.Uvarint(p)
	if w <= 0 || n > uint64(len(p)-w) {
		return e, errors.New("malformed job record length")
	}
	e.rec, e.ev = p[w:w+int(n)], p[w+int(n):]
	j, err := decodeJob(e.rec)
	if err != nil {
		return e, err
	}
	if j.ID != idEncoding.EncodeToString(e.id[:]) || j.Seq != e.seq {
		return e, fmt.Errorf("job record of %s seq %d filed under %s seq %d", j.ID, j.Seq, idEncoding.EncodeToString(e.id[:]), e.seq)
	}
	if _, _, err := decodeEvent(e.ev); err != nil {
		return e, err
	}
	return e, nil
}

// journalRecordLen is the length of the journal record of a change.
func journalRecordLen(rec, ev []byte) int {
	return journalHeaderLen + idLen + seqLen + uvarintLen(uint64(len(rec))) + len(rec) + len(ev)
}

func uvarintLen(x uint64) int {
	n := 1
	for ; x >= 0x80; x >>= 7 {
		n++
	}
	return n
}

// recordSeq reads the seq of a job record the store wrote without decoding it: encodeJob
// splices the document, which begins {"id":…,"state":…,"seq":…, after the private fields,
// whose strings cannot hold `"doc":{` unescaped. ok is false for anything else; the caller
// then decodes the record.
func recordSeq(rec []byte) (seq uint64, ok bool) {
	const docStart = `"doc":{"id":"`
	i := bytes.Index(rec, []byte(docStart))
	if i < 0 {
		return 0, false
	}
	rest := rec[i+len(docStart):]
	const stateKey = `","state":"`
	if len(rest) < idTextLen+len(stateKey) || !bytes.HasPrefix(rest[idTextLen:], []byte(stateKey)) {
		return 0, false
	}
	rest = rest[idTextLen+len(stateKey):]
	end := bytes.IndexByte(rest, '"')
	const seqKey = `","seq":`
	if end < 0 || !bytes.HasPrefix(rest[end:], []byte(seqKey)) {
		return 0, false
	}
	rest = rest[end+len(seqKey):]
	n := 0
	for ; n < len(rest) && n < 20 && '0' <= rest[n] && rest[n] <= '9'; n++ {
		seq = seq*10 + uint64(rest[n]-'0')
	}
	if n == 0 || n == 20 || n == len(rest) || rest[n] != ',' {
		return 0, false
	}
	return seq, true
}
