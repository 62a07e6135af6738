package store

import (
	"errors"
	"fmt"
)

// Errors returned by stores. They are returned unwrapped where callers compare them, or
// wrapped with %w where a detail helps a person.
var (
	// ErrNotFound: no such job (unknown, expired, deleted, or a malformed id).
	ErrNotFound = errors.New("store: job not found")
	// ErrFinished: the job has already ended; it can no longer change.
	ErrFinished = errors.New("store: job already finished")
	// ErrNoChange, returned by an Update mutate func, leaves the job untouched.
	ErrNoChange = errors.New("store: no change")
	// ErrIdempotencyMismatch: the Idempotency-Key was used for another request.
	ErrIdempotencyMismatch = errors.New("store: idempotency key already used for a different request")
	// ErrNoResult: the job has no stored upstream response.
	ErrNoResult = errors.New("store: job has no result")
	// ErrClosed: the store has been closed.
	ErrClosed = errors.New("store: closed")
	// ErrLocked: another process holds the store file.
	ErrLocked = errors.New("store: file locked by another process")
	// ErrTooLarge is matched (errors.Is) by every *LimitError.
	ErrTooLarge = errors.New("store: limit exceeded")
	// ErrInvalid: a change that breaks a rule of the job model (say, an unknown state).
	ErrInvalid = errors.New("store: invalid change")
)

// LimitError reports a value over one of the store's limits. Limit is the name of the option
// that sets it, so that the message tells an operator what to raise.
type LimitError struct {
	Limit string // option name, e.g. "max_event_size"
	Max   int64
	Size  int64 // the size seen, or -1 if the writer stopped counting
}

func (e *LimitError) Error() string {
	if e.Size < 0 {
		return fmt.Sprintf("store: over %s (%d bytes)", e.Limit, e.Max)
	}
	return fmt.Sprintf("store: %d bytes is over %s (%d bytes)", e.Size, e.Limit, e.Max)
}

// Is makes errors.Is(err, ErrTooLarge) hold for every limit error.
func (e *LimitError) Is(target error) bool { return target == ErrTooLarge }
