package engine

import (
	"context"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-progress/progress/store"
)

// One log line per job transition, at info: created, started (when it queued first), ended.
// They carry the job id, route, state and durations; never the request's URI, headers or body,
// nor the callback token (DESIGN.md: no secrets in logs).

func (e *Engine) logCreated(doc *store.Job, how string) {
	if ce := e.Log.Check(zap.InfoLevel, "job created"); ce != nil {
		fields := []zap.Field{zap.String("job", doc.ID), zap.String("route", doc.Route), zap.String("state", string(doc.State)),
			zap.String("how", how), zap.String("method", doc.Request.Method)}
		if doc.QueuePosition != nil {
			fields = append(fields, zap.Int("queue_position", *doc.QueuePosition))
		}
		ce.Write(fields...)
	}
}

func (e *Engine) logStarted(j *job, waited time.Duration) {
	if ce := e.Log.Check(zap.InfoLevel, "job started"); ce != nil {
		ce.Write(zap.String("job", j.id), zap.String("route", j.route.Name), zap.String("state", string(store.Running)),
			zap.Duration("queue_wait", waited))
	}
}

// ended counts and logs a job's end, from the final document the store returned.
func (e *Engine) ended(doc *store.Job) {
	if doc == nil {
		return
	}
	e.Metrics().jobFinished(doc)
	ce := e.Log.Check(zap.InfoLevel, "job ended")
	if ce == nil {
		return
	}
	fields := []zap.Field{zap.String("job", doc.ID), zap.String("route", doc.Route), zap.String("state", string(doc.State))}
	if doc.FinishedAt != nil {
		fields = append(fields, zap.Duration("duration", doc.FinishedAt.Sub(doc.CreatedAt)))
		if doc.StartedAt != nil {
			fields = append(fields, zap.Duration("ran", doc.FinishedAt.Sub(*doc.StartedAt)))
		}
	}
	if doc.Response != nil {
		fields = append(fields, zap.Int("status", doc.Response.Status))
	}
	if doc.Error != nil {
		fields = append(fields, zap.String("error_code", doc.Error.Code))
	}
	ce.Write(fields...)
}

// endTrace closes a job's span when its goroutine ends. A job canceled by a client was ended
// by the API, not here, so its final document is read back.
func (e *Engine) endTrace(j *job) {
	if j.trace == nil {
		return
	}
	doc := j.final
	if doc == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		doc, _ = e.Store.Get(ctx, j.id)
		cancel()
	}
	j.trace.end(doc)
}
