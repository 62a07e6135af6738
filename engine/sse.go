package engine

import (
	"errors"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-progress/progress/store"
)

// events serves a job's Server-Sent Events stream (DESIGN.md section 3).
func (a *API) events(w http.ResponseWriter, r *http.Request, job *store.Job) error {
	after := job.Seq - 1 // a new subscriber gets the current document at once
	seen, resumed, err := lastEventID(r)
	if err != nil {
		return err
	}
	if resumed {
		if job.State.Terminal() && seen >= job.Seq {
			// The client has seen the end; 204 tells a browser's EventSource to stop reconnecting.
			w.WriteHeader(http.StatusNoContent)
			return nil
		}
		after = seen
	}
	// One stream holds, beside Caddy's and net/http's own state, the subscription, one timer
	// and the writer: no context, timer or goroutine per wait (issue #6: memory per idle
	// subscriber).
	ctx := r.Context()
	sub, err := a.Engine.Store.Subscribe(ctx, job.ID, after)
	if err != nil {
		return storeProblem(err)
	}
	defer sub.Close()
	frames := a.frames.join(job.ID)
	defer a.frames.leave(job.ID, frames)
	m := a.Engine.Metrics()
	defer m.subscribed(SubscriberSSE)()
	delivered := 0
	if span := a.Engine.startRequestSpan(r, "progress events", job.ID, job); span != nil {
		if resumed {
			span.SetAttributes(attrResumed.Int64(int64(after)))
		}
		defer func() {
			span.SetAttributes(attrDelivered.Int(delivered))
			span.End()
		}()
	}

	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Accel-Buffering", "no")
	h.Del("Content-Length")
	w.WriteHeader(http.StatusOK)
	out := &sseWriter{w: w, rc: http.NewResponseController(w), timeout: a.WriteTimeout}
	// A first comment line, flushed at once, gets the headers past buffering middleware
	// (Caddy's encode) and proxies, so the client knows the stream is open.
	if err := out.send(streamOpen); err != nil {
		return nil
	}
	heartbeat := time.NewTimer(a.Heartbeat)
	defer heartbeat.Stop()
	for {
		ev, ok, err := sub.Poll(ctx)
		switch {
		case ok:
			if err := out.send(frames.frame(ev)); err != nil {
				return nil
			}
			delivered++
			if ev.Seq > job.Seq {
				// Live: the store took the change after this stream began; what it replays
				// from before is history, not delivery latency.
				m.delivered(SubscriberSSE, ev)
			}
			if ev.Done() {
				return nil
			}
			heartbeat.Reset(a.Heartbeat)
			continue
		case err != nil:
			// io.EOF (the client has seen the end), the request ended, the job was deleted or
			// the store closed: end the stream; a reconnect gets the answer that fits (404, or
			// the resumed stream).
			return nil
		}
		select {
		case <-sub.Ready():
		case <-heartbeat.C:
			if err := out.send(heartbeatComment); err != nil {
				return nil
			}
			heartbeat.Reset(a.Heartbeat)
		case <-ctx.Done():
			return nil
		case <-a.Done.Done():
			return nil
		}
	}
}

var (
	streamOpen       = []byte("retry: " + strconv.Itoa(sseRetryMillis) + "\n: stream open\n\n")
	heartbeatComment = []byte(": heartbeat\n\n")
)

// lastEventID reads the seq a resuming subscriber has seen: ?last_event_id= (for clients that
// cannot set headers) wins over the Last-Event-ID header.
func lastEventID(r *http.Request) (uint64, bool, error) {
	last := r.Header.Get("Last-Event-ID")
	if q := r.URL.Query().Get("last_event_id"); q != "" {
		last = q
	}
	if last == "" {
		return 0, false, nil
	}
	seen, err := parseSeq(last)
	if err != nil {
		return 0, false, problem(http.StatusBadRequest, "bad-last-event-id", "Malformed Last-Event-ID", "an event id of this stream is a job seq, a whole number")
	}
	return seen, true, nil
}

// frame encodes one event. The data is one line of JSON, so nothing in it can start a field.
func frame(ev store.Event) []byte {
	b := make([]byte, 0, len(ev.Data)+48)
	b = append(b, "id: "...)
	b = strconv.AppendUint(b, ev.Seq, 10)
	b = append(b, "\nevent: "...)
	b = append(b, ev.Kind...)
	b = append(b, "\ndata: "...)
	b = append(b, ev.Data...)
	return append(b, "\n\n"...)
}

// sharedFrames encodes each live event once for all the streams of its job, rather than once
// per stream: ten thousand subscribers of a job share one encoded frame. A job's entry lives
// while it has streams.
type sharedFrames struct {
	mu   sync.Mutex
	jobs map[string]*jobFrames
}

type jobFrames struct {
	streams int                          // guarded by sharedFrames.mu
	last    atomic.Pointer[encodedFrame] // the newest frame encoded for the job
}

type encodedFrame struct {
	seq uint64
	b   []byte // never written to once stored
}

func (s *sharedFrames) join(id string) *jobFrames {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.jobs == nil {
		s.jobs = make(map[string]*jobFrames)
	}
	j := s.jobs[id]
	if j == nil {
		j = &jobFrames{}
		s.jobs[id] = j
	}
	j.streams++
	return j
}

func (s *sharedFrames) leave(id string, j *jobFrames) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if j.streams--; j.streams == 0 && s.jobs[id] == j {
		delete(s.jobs, id)
	}
}

// frame returns the encoded event, from the job's last frame when it is this event. Two streams
// may both encode an event at once; either result is right.
func (j *jobFrames) frame(ev store.Event) []byte {
	if f := j.last.Load(); f != nil && f.seq == ev.Seq {
		return f.b
	}
	b := frame(ev)
	j.last.Store(&encodedFrame{seq: ev.Seq, b: b})
	return b
}

// sseWriter writes and flushes each piece at once (quic-go holds small writes back until a
// flush), with a deadline so that a stalled subscriber is dropped rather than kept.
//
// The deadline is moved only when less than the timeout is left, to 1.5 times the timeout
// ahead, rather than before every write: on HTTP/2 each SetWriteDeadline is a message to the
// connection's serve loop, a timer reset there and an allocation, paid per event and
// subscriber. A write that stalls is dropped after between one and 1.5 timeouts.
type sseWriter struct {
	w        http.ResponseWriter
	rc       *http.ResponseController
	timeout  time.Duration
	deadline time.Time // the write deadline set last; zero before the first write
}

func (s *sseWriter) send(b []byte) error {
	if now := time.Now(); s.deadline.Sub(now) < s.timeout {
		s.deadline = now.Add(s.timeout + s.timeout/2)
		if err := s.rc.SetWriteDeadline(s.deadline); err != nil && !errors.Is(err, http.ErrNotSupported) {
			return err
		}
	}
	if _, err := s.w.Write(b); err != nil {
		return err
	}
	return s.rc.Flush()
}
