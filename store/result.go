package store

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"

	bolt "go.etcd.io/bbolt"
)

// tempPrefix marks result files that no commit refers to yet (or any more); Open removes them.
const tempPrefix = "tmp-"

// secretHeaders are the client's credentials. They have no business in a response, and the
// store promises never to write them to disk.
var secretHeaders = []string{"Authorization", "Cookie", "Proxy-Authorization"}

func storableHeader(h http.Header) http.Header {
	h = h.Clone()
	for _, name := range secretHeaders {
		delete(h, name)
	}
	return h
}

func (s *boltStore) resultPath(id string) string { return filepath.Join(s.resultsDir, id) }

// resultWriter keeps a body in memory up to the inline size, then spools it to a temporary
// file; seal makes the file durable under its final name just before the commit.
type resultWriter struct {
	store   *boltStore
	id      string
	mem     []byte
	file    *os.File
	size    int64
	err     error
	sealed  bool // the body is in a file at resultPath(id)
	settled bool // sealed and committed, or discarded
}

func (s *boltStore) NewResult(ctx context.Context, id string) (ResultWriter, error) {
	if _, err := s.Get(ctx, id); err != nil {
		return nil, err
	}
	return &resultWriter{store: s, id: id}, nil
}

func (w *resultWriter) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	max := w.store.opts.MaxResultSize
	if w.size+int64(len(p)) > max {
		w.err = &LimitError{Limit: "max_result_size", Max: max, Size: -1}
		return 0, w.err
	}
	if w.file == nil && len(w.mem)+len(p) <= w.store.opts.InlineResultSize {
		w.mem = append(w.mem, p...)
		w.size += int64(len(p))
		return len(p), nil
	}
	if w.file == nil {
		f, err := os.CreateTemp(w.store.resultsDir, tempPrefix+w.id+"-*")
		if err != nil {
			w.err = err
			return 0, err
		}
		w.file = f
		if _, err := f.Write(w.mem); err != nil {
			w.err = err
			return 0, err
		}
		w.mem = nil
	}
	n, err := w.file.Write(p)
	w.size += int64(n)
	if err != nil {
		w.err = err
	}
	return n, err
}

// seal makes the body durable: a small body is returned to be stored inline in the commit; a
// spooled one is fsynced and renamed to its final name, with the folder fsynced too.
func (w *resultWriter) seal() ([]byte, error) {
	if w.err != nil {
		return nil, w.err
	}
	if w.file == nil {
		return w.mem, nil
	}
	f := w.file
	if err := f.Sync(); err != nil {
		return nil, err
	}
	if err := f.Close(); err != nil {
		return nil, err
	}
	w.file = nil
	// Link, not rename: a link never replaces a file, so a second Finish of the same job
	// cannot overwrite the body a first one committed.
	final := w.store.resultPath(w.id)
	err := os.Link(f.Name(), final)
	os.Remove(f.Name())
	if os.IsExist(err) {
		return nil, ErrFinished
	}
	if err != nil {
		return nil, err
	}
	w.sealed = true
	return nil, syncDir(w.store.resultsDir)
}

// Discard drops the body. After a successful Finish it does nothing.
func (w *resultWriter) Discard() error {
	if w == nil || w.settled {
		return nil
	}
	w.settled = true
	w.mem = nil
	var err error
	if w.file != nil {
		w.file.Close()
		err = removeIfExists(w.file.Name())
		w.file = nil
	}
	if w.sealed {
		err = removeIfExists(w.store.resultPath(w.id))
	}
	if w.err == nil {
		w.err = ErrClosed
	}
	return err
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

func (s *boltStore) Result(ctx context.Context, id string) (*Result, error) {
	rid, ok := parseID(id)
	if !ok {
		return nil, ErrNotFound
	}
	var head resultHead
	var inline []byte
	err := s.view(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketJobs).Get(rid[:]) == nil {
			return ErrNotFound
		}
		v := tx.Bucket(bucketResults).Get(rid[:])
		if v == nil {
			return ErrNoResult
		}
		h, body, err := decodeResult(v)
		head, inline = h, bytes.Clone(body)
		return err
	})
	if err != nil {
		return nil, err
	}
	r := &Result{Status: head.Status, Header: head.Header, Size: head.Size}
	if r.Header == nil {
		r.Header = http.Header{}
	}
	if !head.File {
		r.Body = io.NopCloser(bytes.NewReader(inline))
		return r, nil
	}
	f, err := os.Open(s.resultPath(id))
	if os.IsNotExist(err) {
		return nil, ErrNotFound // deleted between the look-up and the open
	}
	if err != nil {
		return nil, err
	}
	r.Body = f
	return r, nil
}

// trashResult moves a job's result file, if it has one, to a temporary name before the commit
// that deletes the job: a crash before the commit leaves a file Open removes, never an orphan
// that nothing refers to.
func (s *boltStore) trashResult(id string) (string, error) {
	trash := filepath.Join(s.resultsDir, tempPrefix+"deleted-"+id)
	err := os.Rename(s.resultPath(id), trash)
	if os.IsNotExist(err) {
		return "", nil
	}
	return trash, err
}

func restoreTrash(trash, path string) {
	if trash != "" {
		os.Rename(trash, path)
	}
}
