package store

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
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
