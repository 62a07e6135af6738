package engine

import (
	"context"
	"errors"
	"net/http"
	"sync"
	"time"

	"go.opentelemetry.io/otel/codes"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/upstreamhook"
)

// callback serves POST {jobs_path}/{id}/progress, the upstream's progress report (DESIGN.md
// section 4). It answers 204 only once the report is durable.
func (a *API) callback(w http.ResponseWriter, r *http.Request, id string) (err error) {
	m := a.Engine.Metrics()
	span := a.Engine.startRequestSpan(r, "progress callback", id, nil)
	reason := ""
	defer func() {
		if reason != "" {
			m.callbackRejected(reason)
		}
		if span != nil {
			if reason != "" {
				span.SetAttributes(attrReason.String(reason))
				span.SetStatus(codes.Error, reason)
			}
			span.End()
		}
	}()
	if r.Method != http.MethodPost {
		reason = RejectMethod
		w.Header().Set("Allow", "POST")
		return problem(http.StatusMethodNotAllowed, "method-not-allowed", "Method not allowed",
			r.Method+" is not served here; upstreams report progress with POST")
	}
	// The token is checked before the job is looked up, so that without a valid token nobody
	// learns whether a job exists.
	token, ok := upstreamhook.BearerToken(r)
	if !ok || !a.Engine.signer.Check(id, token) {
		reason = RejectToken
		w.Header().Set("WWW-Authenticate", `Bearer realm="progress callback"`)
		detail := "send the job's Progress-Token as Authorization: Bearer <token>"
		if ok {
			detail = "the bearer token is not this job's Progress-Token"
		}
		return problem(http.StatusUnauthorized, "bad-callback-token", "Bad callback token", detail)
	}
	limits := a.CallbackLimits
	if limits.MaxBody <= 0 {
		limits.MaxBody = upstreamhook.DefaultMaxBody
	}
	update, err := upstreamhook.ParseUpdate(http.MaxBytesReader(nil, r.Body, limits.MaxBody), limits)
	var fieldErr *upstreamhook.FieldError
	var tooLarge *upstreamhook.TooLargeError
	switch {
	case errors.As(err, &tooLarge):
		reason = RejectTooLarge
		p := problem(http.StatusRequestEntityTooLarge, "callback-too-large", "Progress report too large", tooLarge.Error())
		p.Field = tooLarge.Field
		return p
	case errors.As(err, &fieldErr):
		reason = RejectMalformed
		p := problem(http.StatusBadRequest, "bad-callback", "Malformed progress report", fieldErr.Error())
		p.Field = fieldErr.Field
		return p
	case err != nil:
		reason = RejectMalformed
		return problem(http.StatusBadRequest, "bad-callback", "Malformed progress report", err.Error())
	}
	doc, err := a.Engine.report(r.Context(), id, update)
	if span != nil {
		if link, ok := jobLink(doc); ok {
			span.AddLink(link)
		}
	}
	if err != nil {
		switch {
		case errors.Is(err, store.ErrFinished):
			reason = RejectFinished
			return problem(http.StatusConflict, "job-finished", "Job already finished",
				"the job has ended; it takes no more progress reports")
		case errors.Is(err, store.ErrTooLarge):
			reason = RejectTooLarge
			return problem(http.StatusRequestEntityTooLarge, "callback-too-large", "Progress report too large", err.Error())
		case errors.Is(err, context.Canceled) && r.Context().Err() != nil:
			return nil // the upstream left before the report was durable; it was not acknowledged
		case errors.Is(err, store.ErrNotFound):
			reason = RejectNotFound
			return storeProblem(err)
		}
		reason = RejectStore
		return storeProblem(err)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// reports coalesces progress reports per job: while one store write for a job is in flight,
// later reports merge into a single pending one, so an upstream reporting in a tight loop
// costs one write per commit rather than one per report, and the last report is never lost.
type reports struct {
	mu   sync.Mutex
	jobs map[string]*jobReports
}

type jobReports struct {
	writing bool
	next    *reportBatch // merged reports waiting for the write in flight; nil if none
}

// reportBatch is reports merged into one write; done closes when the write has committed.
type reportBatch struct {
	update upstreamhook.Update
	done   chan struct{}
	job    *store.Job
	err    error
}

// report applies an upstream's report to job id and returns once it is durable (or failed).
func (e *Engine) report(ctx context.Context, id string, u upstreamhook.Update) (*store.Job, error) {
	e.reports.mu.Lock()
	if e.reports.jobs == nil {
		e.reports.jobs = make(map[string]*jobReports)
	}
	jr := e.reports.jobs[id]
	if jr == nil {
		jr = new(jobReports)
		e.reports.jobs[id] = jr
	}
	if jr.next == nil {
		jr.next = &reportBatch{done: make(chan struct{})}
	}
	b := jr.next
	mergeUpdate(&b.update, u)
	if !jr.writing {
		// No write of this job is in flight: this report writes its batch itself, on the
		// caller's goroutine. A report's path then has no goroutine start and no hand-off
		// to wait for (the usual case: an upstream reporting a few times a second).
		jr.writing = true
		e.reports.mu.Unlock()
		if e.writeBatch(id, jr) {
			// Reports arrived during the write: their callers wait for the next batch,
			// written on a goroutine of its own so that this caller does not wait for it.
			e.background.Add(1)
			go e.writeReports(id, jr)
		}
		return b.job, b.err
	}
	e.reports.mu.Unlock()

	select {
	case <-b.done:
		return b.job, b.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// writeReports writes a job's pending reports, one merged batch per store write, until none
// are left.
func (e *Engine) writeReports(id string, jr *jobReports) {
	defer e.background.Done()
	for e.writeBatch(id, jr) {
	}
}

// writeBatch writes the job's pending batch and reports whether another is pending now. The
// caller holds the job's writing flag, and a batch is pending (the caller's own, or one that
// writeBatch reported); writeBatch clears the flag when nothing is left.
func (e *Engine) writeBatch(id string, jr *jobReports) (more bool) {
	e.reports.mu.Lock()
	b := jr.next
	jr.next = nil
	e.reports.mu.Unlock()
	// Not the caller's context: the write serves every report merged into the batch.
	b.job, b.err = e.Store.Update(context.Background(), id, func(j *store.Job) error {
		applyUpdate(j, b.update, time.Now())
		return nil
	})
	if b.err == nil {
		e.Metrics().progressEvent(SourceCallback)
	}
	close(b.done)

	e.reports.mu.Lock()
	defer e.reports.mu.Unlock()
	if jr.next == nil {
		jr.writing = false
		delete(e.reports.jobs, id)
		return false
	}
	return true
}

// mergeUpdate folds a later report into an earlier one: the later one's fields win, and
// fields it leaves out keep the earlier values, exactly as if both had been applied in turn.
func mergeUpdate(into *upstreamhook.Update, u upstreamhook.Update) {
	if u.Percent != nil {
		into.Percent = u.Percent
	}
	if u.Current != nil {
		into.Current = u.Current
	}
	if u.Total != nil {
		into.Total = u.Total
	}
	if u.Stage != "" {
		into.Stage = u.Stage
	}
	if u.Message != "" {
		into.Message = u.Message
	}
	if u.Data != nil {
		into.Data = u.Data
	}
}

// applyUpdate applies a report to a job's document. A real report replaces an estimate
// outright: estimated figures are dropped, not mixed with reported ones. Without a percent,
// current/total gives one; eta_seconds follows from the percent and the time running.
func applyUpdate(j *store.Job, u upstreamhook.Update, now time.Time) {
	var p store.Progress
	if j.Progress != nil && !j.Progress.Estimated {
		p = *j.Progress
	}
	if u.Current != nil || u.Total != nil {
		// A new count makes a percent derived from the old one stale.
		p.Percent = nil
	}
	u2 := upstreamhook.Update{Percent: p.Percent, Current: p.Current, Total: p.Total, Stage: p.Stage, Message: p.Message, Data: p.Data}
	mergeUpdate(&u2, u)
	p = store.Progress{Percent: u2.Percent, Current: u2.Current, Total: u2.Total, Stage: u2.Stage, Message: u2.Message, Data: u2.Data}
	if p.Percent == nil && p.Current != nil && p.Total != nil && *p.Total > 0 {
		pct := min(100, 100**p.Current / *p.Total)
		p.Percent = &pct
	}
	j.Progress = &p
	j.ETASeconds = nil
	if p.Percent != nil && *p.Percent > 0 && j.StartedAt != nil {
		if elapsed := now.Sub(*j.StartedAt).Seconds(); elapsed > 0 {
			eta := elapsed * (100 - *p.Percent) / *p.Percent
			j.ETASeconds = &eta
		}
	}
}
