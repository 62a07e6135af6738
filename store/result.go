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

// A result body past the inline size is written to a file in the results folder named
// "<job id>-<random>", and the result record names that file: the commit that stores the record
// is what makes the file the job's result, and no file is renamed after a commit. Open keeps
// the files a record names and removes the rest (spools of jobs that never finished, bodies of
// refused Finish calls).

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

// resultPath is where the result file of that name lives.
func (s *boltStore) resultPath(name string) string { return filepath.Join(s.resultsDir, name) }

// resultWriter keeps a body in memory up to the inline size, then spools it to a file of its
// own name. seal makes the file durable; the record that names it makes it the job's result.
type resultWriter struct {
	store   *boltStore
	id      string
	mem     []byte
	file    *os.File // the spool while writing
	spool   string   // the spool's path once sealed
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
		f, err := os.CreateTemp(w.store.resultsDir, w.id+"-*")
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
// to be stored inline; a spooled one is fsynced, and so is the folder holding its name, which
// is returned for the record.
func (w *resultWriter) seal() (inline []byte, name string, err error) {
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
	return nil, filepath.Base(w.spool), syncDir(w.store.resultsDir)
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
	if head.File == "" {
		r.Body = io.NopCloser(bytes.NewReader(inline))
		return r, nil
	}
	f, err := os.Open(s.resultPath(head.File))
	if os.IsNotExist(err) {
		return nil, ErrNotFound // deleted between the look-up and the open
	}
	if err != nil {
		return nil, err
	}
	r.Body = f
	return r, nil
}

// trashPrefix names a result file on its way out: moved there inside the transaction that
// deletes its job, removed after the commit.
const trashPrefix = "deleted-"

// trashResult moves the result file of that name to its trash name and returns the trash path.
// Called again for the same file (a retried transaction), it finds the file already there.
func (s *boltStore) trashResult(name string) (string, error) {
	trash := s.resultPath(trashPrefix + name)
	err := os.Rename(s.resultPath(name), trash)
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

// restoreTrash puts a trashed file back, when the delete that moved it did not commit.
func restoreTrash(trash string) {
	if trash != "" {
		dir, name := filepath.Split(trash)
		os.Rename(trash, filepath.Join(dir, strings.TrimPrefix(name, trashPrefix)))
	}
}

// settleResultFiles makes the results folder match the result records, finishing what a crash
// interrupted: a file a record names stays (or, trashed by a delete that did not commit, is
// put back); every other file goes: the spool of a job that never finished, the body of a
// Finish that was refused or never committed, a file whose delete did commit. It costs one
// look-up per file in the folder, which holds only the bodies too large to keep inline.
func (s *boltStore) settleResultFiles() error {
	entries, err := os.ReadDir(s.resultsDir)
	if err != nil {
		return fmt.Errorf("store: %w", err)
	}
	if len(entries) == 0 {
		return nil
	}
	type file struct{ path, name string }
	var restore, drop []file
	err = s.view(func(tx *bolt.Tx) error {
		results := tx.Bucket(bucketResults)
		for _, e := range entries {
			path := filepath.Join(s.resultsDir, e.Name())
			name, trashed := strings.CutPrefix(e.Name(), trashPrefix)
			f := file{path, name}
			if len(name) <= idTextLen || name[idTextLen] != '-' {
				drop = append(drop, f)
				continue
			}
			id, ok := parseID(name[:idTextLen])
			named := false
			if v := results.Get(id[:]); ok && v != nil {
				head, _, err := decodeResult(v)
				named = err == nil && head.File == name
			}
			switch {
			case named && trashed:
				restore = append(restore, f)
			case !named:
				drop = append(drop, f)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("store: settle result files: %w", err)
	}
	for _, f := range restore {
		if err := os.Rename(f.path, s.resultPath(f.name)); err != nil {
			return fmt.Errorf("store: %w", err)
		}
	}
	for _, f := range drop {
		if err := removeIfExists(f.path); err != nil {
			return err
		}
	}
	return nil
}
