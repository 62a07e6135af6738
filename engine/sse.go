package engine

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
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
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(a.Done, cancel)
	defer stop()
	sub, err := a.Engine.Store.Subscribe(ctx, job.ID, after)
	if err != nil {
		return storeProblem(err)
	}
	defer sub.Close()
	m := a.Engine.Metrics()
	defer m.subscribed(SubscriberSSE)()
	delivered := 0
	if span := startRequestSpan(r, "progress events", job.ID, job); span != nil {
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
	if err := out.send([]byte("retry: " + strconv.Itoa(sseRetryMillis) + "\n: stream open\n\n")); err != nil {
		return nil
	}
	heartbeat := []byte(": heartbeat\n\n")
	for {
		next, cancelNext := context.WithTimeout(ctx, a.Heartbeat)
		ev, err := sub.Next(next)
		cancelNext()
		switch {
		case err == nil:
			if err := out.send(frame(ev)); err != nil {
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
		case errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil:
			if err := out.send(heartbeat); err != nil {
				return nil
			}
		case errors.Is(err, io.EOF), ctx.Err() != nil:
			return nil
		default:
			// The job was deleted or the store closed: end the stream; a reconnect gets the
			// answer that fits (404, or the resumed stream).
			return nil
		}
	}
}

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

// sseWriter writes and flushes each piece at once (quic-go holds small writes back until a
// flush), with a deadline so that a stalled subscriber is dropped rather than kept.
type sseWriter struct {
	w       http.ResponseWriter
	rc      *http.ResponseController
	timeout time.Duration
}

func (s *sseWriter) send(b []byte) error {
	if err := s.rc.SetWriteDeadline(time.Now().Add(s.timeout)); err != nil && !errors.Is(err, http.ErrNotSupported) {
		return err
	}
	if _, err := s.w.Write(b); err != nil {
		return err
	}
	return s.rc.Flush()
}
