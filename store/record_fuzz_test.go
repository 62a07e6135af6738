package store

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"maps"
	"net/http"
	"path/filepath"
	"reflect"
	"testing"
	"time"
)

// Fuzz targets for every decoder of what is on disk (record.go). Each one checks that the
// decoder never panics, that what it accepts keeps the promises the rest of the store relies
// on, and that what it accepts survives a round trip through the matching encoder.
//
//	go test -run XXX -fuzz '^FuzzDecodeJob$' -fuzztime 20s ./store

// fuzzID is a fixed job id, so that seeds are the same on every run.
func fuzzID() (rawID, string) {
	var id rawID
	for i := range id {
		id[i] = byte(0xa0 + i*7)
	}
	return id, idEncoding.EncodeToString(id[:])
}

// fuzzResultName is the name of a result file of fuzzID's job, as CreateTemp makes them.
func fuzzResultName() string {
	_, id := fuzzID()
	return id + "-1234567890"
}

func fuzzHash(b byte) []byte { return bytes.Repeat([]byte{b}, hashLen) }

// fuzzJob is a job as the store writes it, with every field set.
func fuzzJob() *Job {
	_, id := fuzzID()
	created := time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)
	started := created.Add(time.Second)
	updated := created.Add(2 * time.Second)
	pct, cur, total, eta := 42.5, 17.0, 40.0, 12.25
	qp := 3
	return &Job{
		ID: id, State: Running, Seq: 7,
		Progress: &Progress{
			Percent: &pct, Current: &cur, Total: &total, Stage: "render", Message: "page 17 of 40",
			Data: json.RawMessage(`{"pages":[1,2,3],"ok":true}`),
		},
		QueuePosition: &qp, ETASeconds: &eta,
		Request:   RequestInfo{Method: "POST", URI: "/reports?year=2025&q=<b>"},
		Response:  &ResponseInfo{Status: 200, ContentType: "application/pdf", ContentLength: 123456},
		Error:     &JobError{Code: "upstream_timeout", Message: "no answer within 30s"},
		CreatedAt: created, StartedAt: &started, UpdatedAt: updated,
		Links:     linksFor(DefaultBasePath, id),
		OwnerHash: fuzzHash(0x11), Route: "reports", Attrs: map[string]string{"traceparent": "00-abc-def-01"},
		idemHash: fuzzHash(0x22), fingerprint: []byte("POST /reports sha256:..."),
	}
}

// fuzzEncodeJob encodes j as write does: the document, then the record around it.
func fuzzEncodeJob(t *testing.T, j *Job) []byte {
	t.Helper()
	doc, err := json.Marshal(j)
	if err != nil {
		t.Fatalf("marshal of a decoded job: %v", err)
	}
	rec, err := encodeJob(j, doc)
	if err != nil {
		t.Fatalf("encodeJob of a decoded job: %v", err)
	}
	return rec
}

// fuzzCheckJob checks what decodeJob promises of a job it accepted.
func fuzzCheckJob(t *testing.T, j *Job) {
	t.Helper()
	if id, ok := parseID(j.ID); !ok || idEncoding.EncodeToString(id[:]) != j.ID {
		t.Fatalf("accepted malformed id %q", j.ID)
	}
	if !j.State.Valid() || j.Seq == 0 {
		t.Fatalf("accepted state %q seq %d", j.State, j.Seq)
	}
	if (j.OwnerHash != nil && len(j.OwnerHash) != hashLen) || (j.idemHash != nil && len(j.idemHash) != hashLen) {
		t.Fatalf("accepted hashes of %d and %d bytes", len(j.OwnerHash), len(j.idemHash))
	}
}

// fuzzSameJob compares two jobs field by field (times by instant and offset, empty and nil
// alike).
func fuzzSameJob(t *testing.T, a, b *Job) {
	t.Helper()
	sameTime := func(x, y *time.Time) bool {
		if x == nil || y == nil {
			return x == y
		}
		_, ox := x.Zone()
		_, oy := y.Zone()
		return x.Equal(*y) && ox == oy
	}
	switch {
	case a.ID != b.ID || a.State != b.State || a.Seq != b.Seq:
		t.Fatalf("identity changed: %s %s %d, then %s %s %d", a.ID, a.State, a.Seq, b.ID, b.State, b.Seq)
	case !sameTime(&a.CreatedAt, &b.CreatedAt) || !sameTime(&a.UpdatedAt, &b.UpdatedAt) ||
		!sameTime(a.StartedAt, b.StartedAt) || !sameTime(a.FinishedAt, b.FinishedAt) || !sameTime(a.ExpiresAt, b.ExpiresAt):
		t.Fatalf("times changed: %+v, then %+v", a, b)
	case a.Request != b.Request || a.Links != b.Links:
		t.Fatalf("request or links changed: %+v %+v, then %+v %+v", a.Request, a.Links, b.Request, b.Links)
	case !reflect.DeepEqual(a.Response, b.Response) || !reflect.DeepEqual(a.Error, b.Error) ||
		!reflect.DeepEqual(a.QueuePosition, b.QueuePosition) || !reflect.DeepEqual(a.ETASeconds, b.ETASeconds):
		t.Fatalf("response, error, queue position or ETA changed: %+v, then %+v", a, b)
	case (a.Progress == nil) != (b.Progress == nil):
		t.Fatalf("progress changed: %+v, then %+v", a.Progress, b.Progress)
	case !bytes.Equal(a.OwnerHash, b.OwnerHash) || !bytes.Equal(a.idemHash, b.idemHash) ||
		!bytes.Equal(a.fingerprint, b.fingerprint) || a.Route != b.Route || !maps.Equal(a.Attrs, b.Attrs):
		t.Fatalf("private fields changed: %x %x %x %q %v, then %x %x %x %q %v",
			a.OwnerHash, a.idemHash, a.fingerprint, a.Route, a.Attrs, b.OwnerHash, b.idemHash, b.fingerprint, b.Route, b.Attrs)
	}
	if a.Progress != nil {
		pa, pb := *a.Progress, *b.Progress
		if !reflect.DeepEqual(pa.Percent, pb.Percent) || !reflect.DeepEqual(pa.Current, pb.Current) ||
			!reflect.DeepEqual(pa.Total, pb.Total) || pa.Stage != pb.Stage || pa.Message != pb.Message ||
			pa.Estimated != pb.Estimated {
			t.Fatalf("progress changed: %+v, then %+v", pa, pb)
		}
		// The same JSON, spelled as the encoder spells it (compact, HTML characters escaped).
		if len(pa.Data) != 0 || len(pb.Data) != 0 {
			ca, erra := json.Marshal(pa.Data)
			cb, errb := json.Marshal(pb.Data)
			if erra != nil || errb != nil || !bytes.Equal(ca, cb) {
				t.Fatalf("progress data changed: %q, then %q (%v, %v)", pa.Data, pb.Data, erra, errb)
			}
		}
	}
}

func FuzzDecodeJob(f *testing.F) {
	full := fuzzJob()
	fullDoc, _ := json.Marshal(full)
	fullRec, err := encodeJob(full, fullDoc)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(fullRec)
	_, id := newID(time.Now())
	now := time.Now().UTC()
	queued := &Job{ID: id, State: Queued, Seq: 1, Request: RequestInfo{Method: "GET", URI: "/"},
		CreatedAt: now, UpdatedAt: now, Links: linksFor("/jobs", id)}
	doc, _ := json.Marshal(queued)
	rec, _ := encodeJob(queued, doc)
	f.Add(rec)
	done := full.clone()
	done.State, done.Seq, done.FinishedAt, done.ExpiresAt = Failed, 8, &now, &now
	doc, _ = json.Marshal(done)
	rec, _ = encodeJob(done, doc)
	f.Add(rec)
	// Broken records: truncated, other version, bad id, bad state, seq 0, short owner hash.
	f.Add(fullRec[:len(fullRec)/2])
	f.Add(bytes.Replace(fullRec, []byte(`"v":1`), []byte(`"v":2`), 1))
	f.Add(bytes.Replace(fullRec, []byte(full.ID), []byte("not-an-id"), 1))
	f.Add(bytes.Replace(fullRec, []byte(`"state":"running"`), []byte(`"state":"paused"`), 1))
	f.Add(bytes.Replace(fullRec, []byte(`"seq":7`), []byte(`"seq":0`), 1))
	f.Add([]byte(`{"v":1,"doc":{"id":"` + id + `","state":"queued","seq":1},"owner":"AAAA"}`))
	f.Add([]byte(`{"v":1,"doc":null}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, v []byte) {
		j, err := decodeJob(v)
		if err != nil {
			if j != nil {
				t.Fatalf("a job and an error: %v", err)
			}
			return
		}
		fuzzCheckJob(t, j)
		rec := fuzzEncodeJob(t, j)
		if seq, ok := recordSeq(rec); !ok || seq != j.Seq {
			t.Fatalf("recordSeq of a record encodeJob wrote: %d %v, want %d", seq, ok, j.Seq)
		}
		if seq, ok := recordSeq(v); ok && seq != j.Seq {
			t.Logf("recordSeq %d of a record decodeJob reads as seq %d (not one the store writes)", seq, j.Seq)
		}
		j2, err := decodeJob(rec)
		if err != nil {
			t.Fatalf("re-encoded record %s does not decode: %v", rec, err)
		}
		fuzzCheckJob(t, j2)
		fuzzSameJob(t, j, j2)
		if rec2 := fuzzEncodeJob(t, j2); !bytes.Equal(rec, rec2) {
			t.Fatalf("encoding is not stable:\n%s\n%s", rec, rec2)
		}
	})
}

func FuzzDecodeEvent(f *testing.F) {
	doc, _ := json.Marshal(fuzzJob())
	f.Add(encodeEvent(KindProgress, doc))
	f.Add(encodeEvent(KindDone, doc))
	f.Add(encodeEvent(KindProgress, []byte("{}")))
	f.Add([]byte("p"))
	f.Add([]byte("x{}"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, v []byte) {
		kind, data, err := decodeEvent(v)
		if err != nil {
			return
		}
		if kind != KindProgress && kind != KindDone {
			t.Fatalf("kind %q", kind)
		}
		if len(data) == 0 || len(data) != len(v)-1 {
			t.Fatalf("%d bytes of document from a record of %d", len(data), len(v))
		}
		enc := encodeEvent(kind, data)
		if !bytes.Equal(enc, v) {
			t.Fatalf("re-encoded %q as %q", v, enc)
		}
		kind2, data2, err := decodeEvent(enc)
		if err != nil || kind2 != kind || !bytes.Equal(data2, data) {
			t.Fatalf("round trip: %q %q %v, then %q %q", kind, data, err, kind2, data2)
		}
	})
}

func FuzzDecodeResult(f *testing.F) {
	add := func(h resultHead, inline []byte) {
		v, err := encodeResult(h, inline)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(v)
	}
	add(resultHead{Status: 200, Header: http.Header{"Content-Type": {"text/plain"}, "X-Many": {"a", "b"}}, Size: 5}, []byte("hello"))
	add(resultHead{Status: 204}, nil)
	add(resultHead{Status: 502, Header: http.Header{"Content-Type": {"application/json"}}, Size: 1 << 20, File: fuzzResultName()}, nil)
	add(resultHead{Status: 200, Size: 1, File: "../../etc/passwd"}, nil) // refused: not a result file's name
	good, _ := encodeResult(resultHead{Status: 200, Size: 3}, []byte("abc"))
	f.Add(good[:len(good)-1])                                                       // body shorter than size
	f.Add(append(bytes.Clone(good), 'd'))                                           // body longer than size
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}) // varint overflow
	f.Add([]byte{0x80})                                                             // truncated varint
	f.Add(append([]byte{20}, `{"status":42,"size":0}`...))                          // status out of range
	f.Add(append([]byte{byte(len(`{"status":200,"size":2,"file":true}`))}, `{"status":200,"size":2,"file":true}xx`...))
	f.Fuzz(func(t *testing.T, v []byte) {
		h, body, err := decodeResult(v)
		if err != nil {
			return
		}
		if h.Status < 100 || h.Status > 999 || h.Size < 0 {
			t.Fatalf("accepted status %d size %d", h.Status, h.Size)
		}
		if h.File != "" && (len(body) != 0 || !validResultName(h.File) || filepath.Base(h.File) != h.File) {
			t.Fatalf("file result with %d inline bytes", len(body))
		}
		if h.File == "" && int64(len(body)) != h.Size {
			t.Fatalf("inline result of %d bytes, size %d", len(body), h.Size)
		}
		enc, err := encodeResult(h, body)
		if err != nil {
			t.Fatalf("encodeResult of a decoded head: %v", err)
		}
		h2, body2, err := decodeResult(enc)
		if err != nil {
			t.Fatalf("re-encoded record %q does not decode: %v", enc, err)
		}
		if h2.Status != h.Status || h2.Size != h.Size || h2.File != h.File || !bytes.Equal(body2, body) {
			t.Fatalf("round trip: %+v %q, then %+v %q", h, body, h2, body2)
		}
		if (len(h.Header) != 0 || len(h2.Header) != 0) && !reflect.DeepEqual(h.Header, h2.Header) {
			t.Fatalf("header changed: %#v, then %#v", h.Header, h2.Header)
		}
		if enc2, _ := encodeResult(h2, body2); !bytes.Equal(enc, enc2) {
			t.Fatalf("encoding is not stable: %q, then %q", enc, enc2)
		}
	})
}

func FuzzDecodeEventKey(f *testing.F) {
	id, _ := fuzzID()
	f.Add(eventKey(id, 1))
	f.Add(eventKey(id, 1<<40+3))
	f.Add(eventKey(id, ^uint64(0)))
	f.Add(eventKey(id, 1)[:idLen+seqLen-1])
	f.Add(append(eventKey(id, 1), 0))
	f.Fuzz(func(t *testing.T, k []byte) {
		id, seq, err := decodeEventKey(k)
		if err != nil {
			if len(k) == idLen+seqLen {
				t.Fatalf("refused a key of the right length: %v", err)
			}
			return
		}
		if enc := eventKey(id, seq); !bytes.Equal(enc, k) {
			t.Fatalf("re-encoded %x as %x", k, enc)
		}
	})
}

func FuzzDecodeExpiryKey(f *testing.F) {
	id, _ := fuzzID()
	f.Add(expiryKey(time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC), id))
	f.Add(expiryKey(time.Unix(0, 0), id))
	f.Add(expiryKey(time.Unix(-1, 0), id)) // before 1970: the top bit is set
	f.Add(expiryKey(time.Unix(0, 1<<63-1), id))
	f.Add(expiryKey(time.Now(), id)[:timeLen+idLen-1])
	f.Fuzz(func(t *testing.T, k []byte) {
		at, id, err := decodeExpiryKey(k)
		if err != nil {
			if len(k) == timeLen+idLen {
				t.Fatalf("refused a key of the right length: %v", err)
			}
			return
		}
		if enc := expiryKey(at, id); !bytes.Equal(enc, k) {
			t.Fatalf("re-encoded %x as %x (time %s)", k, enc, at)
		}
		// Keys sort by deadline: the key order is the time order (for deadlines after 1970,
		// which are all the store writes).
		if int64(binary.BigEndian.Uint64(k)) >= 0 {
			later := expiryKey(at.Add(time.Nanosecond), id)
			if at.UnixNano() < 1<<63-1 && bytes.Compare(later, k) <= 0 {
				t.Fatalf("a later deadline sorts first: %x, then %x", k, later)
			}
		}
	})
}

func FuzzDecodeOwnerKey(f *testing.F) {
	id, _ := fuzzID()
	created := time.Date(2025, 3, 14, 15, 9, 26, 535897932, time.UTC)
	f.Add(ownerKey(fuzzHash(0x11), created, id))
	f.Add(ownerKey(fuzzHash(0xff), time.Unix(0, 0), id))
	f.Add(ownerKey(nil, created, id)) // no owner hash: too short
	f.Add(ownerKey(fuzzHash(0x11), created, id)[:hashLen+timeLen+idLen-1])
	f.Fuzz(func(t *testing.T, k []byte) {
		id, err := decodeOwnerKey(k)
		if err != nil {
			if len(k) == hashLen+timeLen+idLen {
				t.Fatalf("refused a key of the right length: %v", err)
			}
			return
		}
		created := time.Unix(0, int64(binary.BigEndian.Uint64(k[hashLen:])))
		if enc := ownerKey(k[:hashLen], created, id); !bytes.Equal(enc, k) {
			t.Fatalf("re-encoded %x as %x", k, enc)
		}
		// A page cursor is the key without the owner hash; it must lead back to the job.
		cursor := idEncoding.EncodeToString(k[hashLen:])
		raw, err := idEncoding.DecodeString(cursor)
		if err != nil || !bytes.Equal(raw, k[hashLen:]) {
			t.Fatalf("cursor %q: %x, %v", cursor, raw, err)
		}
	})
}

func FuzzParseID(f *testing.F) {
	_, fixed := fuzzID()
	_, fresh := newID(time.Now())
	f.Add(fixed)
	f.Add(fresh)
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAA==") // padded
	f.Add("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\n")
	f.Add("++++++++++++++++++++++++++++++++") // standard, not URL, alphabet
	f.Add("AAAAAAAAAAAAAAAAAAAAAB")           // the 22-character ids of before issue 3
	f.Add(fixed[:idTextLen-1])
	f.Add(fixed + "A")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		id, ok := parseID(s)
		if !ok {
			return
		}
		if len(s) != idTextLen {
			t.Fatalf("accepted %q of %d characters", s, len(s))
		}
		if enc := idEncoding.EncodeToString(id[:]); enc != s {
			t.Fatalf("accepted %q, another spelling of %q", s, enc)
		}
		// Every id made from idLen bytes parses back to them.
		var other rawID
		copy(other[:], s)
		text := idEncoding.EncodeToString(other[:])
		if back, ok := parseID(text); !ok || back != other {
			t.Fatalf("id %x: %q parses to %x, %v", other, text, back, ok)
		}
	})
}

func FuzzDecodeJournal(f *testing.F) {
	id, _ := fuzzID()
	j := fuzzJob()
	doc, _ := json.Marshal(j)
	rec, err := encodeJob(j, doc)
	if err != nil {
		f.Fatal(err)
	}
	ev := encodeEvent(KindProgress, doc)
	one := appendJournalRecord(nil, 3, id, j.Seq, rec, ev)
	two := appendJournalRecord(append([]byte(nil), one...), 3, id, j.Seq, rec, ev)
	f.Add(one)
	f.Add(two)
	f.Add(append(append([]byte(nil), one...), make([]byte, 64)...))                // zeros after the end
	f.Add(appendJournalRecord(append([]byte(nil), one...), 2, id, j.Seq, rec, ev)) // an older use
	f.Add(two[:len(two)-5])                                                        // a torn write
	f.Add(appendJournalRecord(nil, 3, id, j.Seq+1, rec, ev))                       // filed under another seq
	f.Fuzz(func(t *testing.T, data []byte) {
		epoch, entries, err := decodeJournal(data)
		if err != nil {
			if entries != nil {
				t.Fatalf("entries and an error: %v", err)
			}
			return
		}
		var again []byte
		for _, e := range entries {
			got, err := decodeJob(e.rec)
			if err != nil || got.Seq != e.seq || got.ID != idEncoding.EncodeToString(e.id[:]) {
				t.Fatalf("accepted entry %s seq %d with record %v %v", idEncoding.EncodeToString(e.id[:]), e.seq, got, err)
			}
			again = appendJournalRecord(again, epoch, e.id, e.seq, e.rec, e.ev)
		}
		if !bytes.HasPrefix(data, again) {
			t.Fatal("re-encoded records differ from what was decoded")
		}
	})
}
