package store

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"

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
// file. seal makes the spool durable under its temporary name; the commit that records the
// result is followed by a rename to the final name (see Finish), which Open redoes if a crash
// lost it.
type resultWriter struct {
	store   *boltStore
	id      string
	mem     []byte
	file    *os.File // the spool while writing
	spool   string   // the spool's name once sealed
	size    int64
	err     error
	settled bool // committed, or discarded
}

func (s *boltStore) NewResult(ctx context.Context, id string) (ResultWriter, error) {
	if _, ok := parseID(id); !ok {
		return nil, ErrNotFound // the id also names the spool file: never a path from outside
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

// seal makes the body durable before the commit that refers to it: a small body is returned
// to be stored inline; a spooled one is fsynced, and so is the folder holding its name.
func (w *resultWriter) seal() (inline []byte, spool string, err error) {
	if w.err != nil {
		return nil, "", w.err
	}
	if w.file == nil {
		return w.mem, "", nil
	}
	f := w.file
	w.file = nil
	w.spool = f.Name()
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, "", err
	}
	if err := f.Close(); err != nil {
		return nil, "", err
	}
	return nil, w.spool, syncDir(w.store.resultsDir)
}

// Discard drops the body. After a successful Finish it does nothing.
func (w *resultWriter) Discard() error {
	if w == nil || w.settled {
		return nil
	}
	w.settled = true
	w.mem = nil
	if w.err == nil {
		w.err = ErrClosed
	}
	if w.file != nil {
		w.file.Close()
		w.spool = w.file.Name()
		w.file = nil
	}
	return removeIfExists(w.spool)
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
	f, err := s.openResultFile(id, head.Size)
	if err != nil {
		return nil, err
	}
	r.Body = f
	return r, nil
}

// openResultFile opens a job's committed body. Finish renames the body from its spool name to
// its final one just after the commit that records it, so a reader between the two (one that
// read the job as finished straight from the database) finds it under the spool name: the same
// file either way.
func (s *boltStore) openResultFile(id string, size int64) (*os.File, error) {
	for range 2 {
		f, err := os.Open(s.resultPath(id))
		if !os.IsNotExist(err) {
			return f, err
		}
		spools, _ := filepath.Glob(filepath.Join(s.resultsDir, tempPrefix+id+"-*"))
		for _, name := range spools {
			if f, err := os.Open(name); err == nil {
				if info, err := f.Stat(); err == nil && info.Size() == size {
					return f, nil
				}
				f.Close()
			}
		}
		// The rename may have come between the two looks: look at the final name again.
	}
	return nil, ErrNotFound // deleted between the look-up and the open
}

// trashPrefix names a result file on its way out: moved there inside the transaction that
// deletes its job, removed after the commit.
const trashPrefix = tempPrefix + "deleted-"

// trashResult moves a job's result file to its trash name and returns that name. Called again
// for the same job (a retried transaction), it finds the file already there.
func (s *boltStore) trashResult(id string) (string, error) {
	trash := filepath.Join(s.resultsDir, trashPrefix+id)
	err := os.Rename(s.resultPath(id), trash)
	if os.IsNotExist(err) {
		if _, statErr := os.Stat(trash); statErr == nil {
			return trash, nil
		}
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("store: %w", err)
	}
	return trash, nil
}

func restoreTrash(trash, path string) {
	if trash != "" {
		os.Rename(trash, path)
	}
}

// settleTempResults finishes what a crash interrupted in the results folder, which holds few
// temporary files however many results are stored:
//   - a spool whose job has a committed file result and no file yet: the rename after the
//     commit was lost; redo it;
//   - a trashed file whose job still exists: the delete did not commit; put it back;
//   - anything else temporary: a spool of a job that never finished, a body a refused Finish
//     left, a trashed file whose delete did commit; remove it.
func (s *boltStore) settleTempResults() error {
	entries, err := os.ReadDir(s.resultsDir)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, tempPrefix) {
			continue
		}
		path := filepath.Join(s.resultsDir, name)
		id, ok := strings.CutPrefix(name, trashPrefix)
		if !ok && len(name) > len(tempPrefix)+idTextLen {
			id = name[len(tempPrefix) : len(tempPrefix)+idTextLen]
		}
		keep, err := s.wantsResultFile(id, path)
		if err != nil {
			return err
		}
		if keep {
			if err := os.Rename(path, s.resultPath(id)); err != nil {
				return fmt.Errorf("store: %w", err)
			}
			continue
		}
		if err := removeIfExists(path); err != nil {
			return err
		}
	}
	return nil
}

// wantsResultFile reports whether the file at path is the missing body of job id's committed
// result: the record says the body is a file of that size and the final name is free.
func (s *boltStore) wantsResultFile(id, path string) (bool, error) {
	rid, ok := parseID(id)
	if !ok {
		return false, nil
	}
	if _, err := os.Stat(s.resultPath(id)); err == nil {
		return false, nil
	}
	info, err := os.Stat(path)
	if err != nil {
		return false, nil
	}
	want := false
	err = s.view(func(tx *bolt.Tx) error {
		v := tx.Bucket(bucketResults).Get(rid[:])
		if v == nil || tx.Bucket(bucketJobs).Get(rid[:]) == nil {
			return nil
		}
		head, _, err := decodeResult(v)
		want = err == nil && head.File && head.Size == info.Size()
		return nil
	})
	return want, err
}
