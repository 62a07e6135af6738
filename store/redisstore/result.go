package redisstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-progress/progress/store"
)

// A result body goes to Redis as it arrives, in chunks of chunkSize pushed onto a spool list
// of the writer's own; the Finish that stores the job's end renames the spool to the job's
// body in the same script. A body never sits whole in memory, on either side.
const chunkSize = 512 << 10

// spoolTTL is how long a spool outlives its last chunk: the spool of a job whose instance
// died goes by itself.
const spoolTTL = time.Hour

// resultHead is the stored head of an upstream response.
type resultHead struct {
	Status int         `json:"status"`
	Header http.Header `json:"header,omitempty"`
	Size   int64       `json:"size"`
	Chunks int         `json:"chunks"`
}

type resultWriter struct {
	s       *redisStore
	id      string
	spool   string
	buf     []byte
	size    int64
	chunks  int
	err     error
	settled bool
}

func (s *redisStore) NewResult(ctx context.Context, id string) (store.ResultWriter, error) {
	if !store.ValidID(id) {
		return nil, store.ErrNotFound
	}
	if err := s.check(); err != nil {
		return nil, err
	}
	return &resultWriter{s: s, id: id, spool: s.key("spool", id, randomHex(8))}, nil
}

func (w *resultWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	max := w.s.opts.MaxResultSize
	if w.size+int64(len(p)) > max {
		w.err = &store.LimitError{Limit: "max_result_size", Max: max, Size: -1}
		return 0, w.err
	}
	written := 0
	for len(p) > 0 {
		n := min(len(p), chunkSize-len(w.buf))
		w.buf = append(w.buf, p[:n]...)
		p = p[n:]
		written += n
		w.size += int64(n)
		if len(w.buf) == chunkSize {
			if err := w.push(); err != nil {
				return written, err
			}
		}
	}
	return written, nil
}

// push sends the buffered chunk.
func (w *resultWriter) push() error {
	if len(w.buf) == 0 {
		return nil
	}
	ctx := context.Background()
	_, err := w.s.rdb.TxPipelined(ctx, func(p redis.Pipeliner) error {
		p.RPush(ctx, w.spool, w.buf)
		p.PExpire(ctx, w.spool, spoolTTL)
		return nil
	})
	if err != nil {
		w.err = w.s.fail(err)
		return w.err
	}
	w.chunks++
	w.buf = w.buf[:0]
	return nil
}

// seal sends what is left and returns the head to store and the spool to rename ("" for an
// empty body).
func (w *resultWriter) seal(resp *store.ResponseHead) (finishing, resultHead, error) {
	head := resultHead{Status: resp.Status, Header: store.StorableHeader(resp.Header)}
	if w == nil {
		b, err := json.Marshal(head)
		return finishing{head: string(b)}, head, err
	}
	if w.err != nil {
		return finishing{}, head, w.err
	}
	if err := w.push(); err != nil {
		return finishing{}, head, err
	}
	head.Size, head.Chunks = w.size, w.chunks
	b, err := json.Marshal(head)
	fin := finishing{head: string(b)}
	if w.chunks > 0 {
		fin.spool = w.spool
	}
	return fin, head, err
}

// Discard drops the body. After a successful Finish it does nothing.
func (w *resultWriter) Discard() error {
	if w == nil || w.settled {
		return nil
	}
	w.settled = true
	w.buf = nil
	if w.err == nil {
		w.err = store.ErrClosed
	}
	if w.chunks == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return w.s.fail(w.s.rdb.Del(ctx, w.spool).Err())
}

func (s *redisStore) Finish(ctx context.Context, id string, out store.Outcome) (*store.Job, error) {
	var rw *resultWriter
	if out.Body != nil {
		var ok bool
		if rw, ok = out.Body.(*resultWriter); !ok || rw.s != s || rw.id != id {
			return nil, fmt.Errorf("%w: result writer from another store or job", store.ErrInvalid)
		}
	}
	if err := store.CheckOutcome(out); err != nil {
		rw.Discard()
		return nil, err
	}
	var (
		fin  *finishing
		info *store.ResponseInfo
	)
	if out.Response != nil {
		f, head, err := rw.seal(out.Response)
		if err != nil {
			rw.Discard()
			return nil, err
		}
		fin = &f
		info = &store.ResponseInfo{Status: head.Status, ContentType: head.Header.Get("Content-Type"), ContentLength: head.Size}
	}
	job, _, err := s.change(ctx, id, func(prev, j *store.Job) error {
		if prev.State.Terminal() {
			return store.ErrFinished
		}
		j.State, j.Error, j.Response = out.State, out.Error, info
		return nil
	}, fin)
	if err != nil {
		rw.Discard()
		return nil, err
	}
	if rw != nil {
		rw.settled = true
	}
	return job, nil
}

func (s *redisStore) Result(ctx context.Context, id string) (*store.Result, error) {
	if err := s.check(); err != nil {
		return nil, err
	}
	if !store.ValidID(id) {
		return nil, store.ErrNotFound
	}
	vals, err := s.rdb.HMGet(ctx, s.key("job", id), "seq", "res").Result()
	if err != nil {
		return nil, s.fail(err)
	}
	if vals[0] == nil {
		return nil, store.ErrNotFound
	}
	raw, _ := vals[1].(string)
	if raw == "" {
		return nil, store.ErrNoResult
	}
	var head resultHead
	if err := json.Unmarshal([]byte(raw), &head); err != nil {
		return nil, fmt.Errorf("store: result head of job %s: %w", id, err)
	}
	if head.Header == nil {
		head.Header = http.Header{}
	}
	return &store.Result{
		Status: head.Status, Header: head.Header, Size: head.Size,
		Body: &bodyReader{s: s, key: s.key("body", id), chunks: head.Chunks, left: head.Size},
	}, nil
}

// bodyReader reads a stored body a chunk at a time.
type bodyReader struct {
	s      *redisStore
	key    string
	chunks int
	next   int
	left   int64
	cur    []byte
}

func (r *bodyReader) Read(p []byte) (int, error) {
	for len(r.cur) == 0 {
		if r.next == r.chunks {
			if r.left != 0 {
				return 0, io.ErrUnexpectedEOF
			}
			return 0, io.EOF
		}
		chunk, err := r.s.rdb.LIndex(context.Background(), r.key, int64(r.next)).Bytes()
		if errors.Is(err, redis.Nil) {
			return 0, fmt.Errorf("store: result body gone while being read (expired or deleted): %w", io.ErrUnexpectedEOF)
		}
		if err != nil {
			return 0, r.s.fail(err)
		}
		r.next++
		r.cur = chunk
	}
	n := copy(p, r.cur)
	r.cur = r.cur[n:]
	r.left -= int64(n)
	return n, nil
}

func (r *bodyReader) Close() error {
	r.cur = nil
	return nil
}
