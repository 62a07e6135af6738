package engine

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/upstreamhook"
)

// Upstream sends a job's request on (in Caddy: the rest of the handler chain, such as
// reverse_proxy) and writes the response to w. An error without a response written is the
// upstream's failure; its HTTP status, if it has one (see StatusOf), names the failure.
type Upstream func(w http.ResponseWriter, r *http.Request) error

// StatusOf extracts an HTTP status from an upstream error (Caddy's handler errors carry one);
// it returns 0 when there is none. Set by the Caddy module.
type StatusOf func(err error) int

// Engine runs jobs detached from the requests that started them. There is one per store,
// shared by every route and API handler using that store, and it lives across config
// reloads, so a reload never cuts a job's upstream request.
type Engine struct {
	Store    store.Store
	Log      *zap.Logger
	StatusOf StatusOf

	signer    *upstreamhook.Signer
	metrics   atomic.Pointer[Metrics] // nil: metrics off
	tracesOff atomic.Bool             // no job spans even under a sampled request span
	reports   reports
	estimates estimator
	// background counts goroutines the engine owns besides jobs (progress report writers).
	background sync.WaitGroup

	mu      sync.Mutex
	running map[string]context.CancelCauseFunc
	closed  bool
	closing chan struct{} // closed by Close: ends the retries of finish
	jobs    sync.WaitGroup
}

// New makes the engine of a store. Callback tokens derive from secret, or from the store's
// own secret when secret is empty.
func New(st store.Store, log *zap.Logger, statusOf StatusOf, secret []byte) *Engine {
	if log == nil {
		log = zap.NewNop()
	}
	if statusOf == nil {
		statusOf = func(error) int { return 0 }
	}
	if len(secret) == 0 {
		secret = st.Secret()
	}
	e := &Engine{Store: st, Log: log, StatusOf: statusOf, signer: upstreamhook.NewSigner(secret), running: make(map[string]context.CancelCauseFunc), closing: make(chan struct{})}
	if n, ok := st.(store.EndNotifier); ok {
		// A store shared by several instances: a job running here may be canceled or deleted
		// through another; its upstream request must stop here all the same.
		n.OnEndedElsewhere(e.abort)
	}
	return e
}

// abort stops the upstream request of a job that was ended (canceled, deleted) elsewhere.
func (e *Engine) abort(id string) {
	e.mu.Lock()
	cancel := e.running[id]
	e.mu.Unlock()
	if cancel != nil {
		cancel(errCanceled)
	}
}

// SetMetrics turns metrics on (or off, with nil) for what the engine does from now on; the
// newest config decides. Routes pick the metrics up when they are initialised.
func (e *Engine) SetMetrics(m *Metrics) { e.metrics.Store(m) }

// SetTraces turns the engine's spans on (the default) or off for what it does from now on;
// the newest config decides. Off, the plugin makes no span even when Caddy's tracing directive
// traces the request: Caddy's own request spans stay.
func (e *Engine) SetTraces(on bool) { e.tracesOff.Store(!on) }

// Metrics returns the metrics in use, nil when they are off.
func (e *Engine) Metrics() *Metrics { return e.metrics.Load() }

// Token is the upstream's secret for reporting progress on job id (DESIGN.md section 4): an
// HMAC of the id, useless for any other job.
func (e *Engine) Token(id string) string { return e.signer.Token(id) }

// errCanceled is the cause given to a job's context when a client cancels it.
var errCanceled = errors.New("job canceled")

// errShutdown is the cause given when the engine closes under running jobs.
var errShutdown = errors.New("server shutting down")

// Cancel ends a job as canceled and aborts its upstream request if it runs here.
func (e *Engine) Cancel(ctx context.Context, id string) (*store.Job, error) {
	job, changed, err := e.Store.Cancel(ctx, id)
	if err != nil {
		return nil, err
	}
	if changed {
		e.ended(job)
	}
	e.abort(id)
	return job, nil
}

// Close aborts the jobs still running and waits for them to record how they ended.
func (e *Engine) Close() {
	e.mu.Lock()
	if !e.closed {
		close(e.closing)
	}
	e.closed = true
	for _, cancel := range e.running {
		cancel(errShutdown)
	}
	e.mu.Unlock()
	e.jobs.Wait()
	e.background.Wait()
	e.saveAllRunTimes()
}

// job is everything one running job needs.
type job struct {
	id       string
	route    *Route
	ticket   *ticket
	request  *http.Request // detached from the client's context
	body     *spooledBody
	upstream Upstream
	running  bool // created running: no queue wait, no state change before the upstream call
	started  bool // its upstream request has begun (it left the queue); for the gauges
	created  time.Time
	trace    *jobTrace  // nil: tracing off
	final    *store.Job // the document its end recorded, when this engine recorded it
	capture  *capture
	done     chan struct{} // closed when the job has ended and its end is recorded
}

// start runs a created job on its own goroutine. It returns false if the engine is closing.
func (e *Engine) start(j *job, ctx context.Context, cancel context.CancelCauseFunc) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return false
	}
	e.running[j.id] = cancel
	e.jobs.Add(1)
	go func() {
		defer e.jobs.Done()
		defer close(j.done)
		defer func() {
			e.mu.Lock()
			delete(e.running, j.id)
			e.mu.Unlock()
			cancel(nil)
			j.route.metrics.jobLeft(j.started)
			e.endTrace(j)
		}()
		e.run(ctx, j)
	}()
	return true
}

func (e *Engine) run(ctx context.Context, j *job) {
	defer j.body.Close()
	st := e.Store
	// Records of the job's life use a context of their own: the job's may be canceled.
	rec := context.WithoutCancel(ctx)
	var queueSpan trace.Span
	if !j.running {
		_, queueSpan = j.trace.child("progress queue", trace.SpanKindInternal)
	}
	err := j.ticket.wait(ctx, func(position int) {
		st.Update(rec, j.id, func(doc *store.Job) error {
			if doc.State != store.Queued {
				return store.ErrNoChange
			}
			doc.QueuePosition = &position
			return nil
		})
	})
	if queueSpan != nil {
		queueSpan.End()
	}
	if err != nil {
		j.final = e.end(rec, ctx, j, nil)
		return
	}
	defer j.ticket.release()
	if !j.running {
		if _, err := st.Update(rec, j.id, func(doc *store.Job) error {
			doc.State = store.Running
			return nil
		}); err != nil {
			j.capture.result.Discard()
			if errors.Is(err, store.ErrFinished) || errors.Is(err, store.ErrNotFound) {
				return // canceled while queued, or deleted: nothing to run
			}
			// The store could not record the start (the disk is full): the job must not
			// stay queued for ever, nor run without its record saying so.
			j.final = e.finish(rec, j.id, store.Outcome{State: store.Failed, Error: &store.JobError{
				Code: CodeStoreUnavailable, Message: "the job store could not record the start of the job: " + err.Error()}})
			return
		}
		j.started = true
		waited := time.Since(j.created)
		j.route.metrics.jobStarted(waited)
		e.logStarted(j, waited)
	}
	j.request = j.request.WithContext(ctx)
	started := time.Now()
	routeKey := routeKey(j.request.Method, j.route.Name)
	stopEstimates := e.followEstimates(ctx, j.id, routeKey, started, j.route.EstimateInterval)
	upCtx, upSpan := j.trace.child("progress upstream", trace.SpanKindClient, attrMethod.String(j.request.Method))
	if upSpan != nil {
		propagate(upCtx, j.request.Header)
	}
	upErr := e.callUpstream(j)
	ranFor := time.Since(started)
	stopEstimates()
	if upSpan != nil {
		if j.capture.wroteHeader {
			upSpan.SetAttributes(attrStatus.Int(j.capture.status))
		}
		if upErr != nil {
			upSpan.SetStatus(codes.Error, upErr.Error())
		}
		upSpan.End()
	}
	c := j.capture
	// A client the response passes through (Prefer: wait) has only part of it: its handler
	// must abort the exchange too, not end it as if the body were complete.
	c.broken = upErr != nil && c.wroteHeader
	succeeded := upErr == nil && ctx.Err() == nil && c.resultErr == nil && (!c.wroteHeader || c.status < 400)
	j.final = e.end(rec, ctx, j, upErr)
	if succeeded {
		e.recordRunTime(routeKey, ranFor, time.Now())
	}
}

// callUpstream runs a job's upstream handler. A handler aborts a response it cannot finish by
// panicking with http.ErrAbortHandler (reverse_proxy does when the upstream breaks off mid-body
// or a write to the job's result fails: the disk is full, the result over its limit). net/http
// recovers that on its own goroutines; a job runs on the engine's, where it would end the
// process. Any other panic is recovered the same way net/http would, and logged.
func (e *Engine) callUpstream(j *job) (err error) {
	defer func() {
		v := recover()
		if v == nil {
			return
		}
		if v == http.ErrAbortHandler {
			err = errAborted
		} else {
			e.Log.Error("the upstream handler panicked", zap.String("job", j.id), zap.Any("panic", v), zap.Stack("stack"))
			err = fmt.Errorf("the upstream handler panicked: %v", v)
		}
	}()
	return j.upstream(j.capture, j.request)
}

// errAborted stands for http.ErrAbortHandler from the upstream handler: the response was cut.
var errAborted = errors.New("the handler aborted the response")

// end records how a job ended, from the upstream's answer or failure and the job's context,
// and returns the final document (nil when the end was not this call's to record).
func (e *Engine) end(rec, ctx context.Context, j *job, upErr error) *store.Job {
	c := j.capture
	out := store.Outcome{State: store.Failed}
	cause := context.Cause(ctx)
	switch {
	case errors.Is(cause, errCanceled):
		c.result.Discard()
		return nil // Cancel recorded it
	case errors.Is(cause, errShutdown):
		out.Error = &store.JobError{Code: store.CodeInterrupted, Message: "the server shut down before the upstream answered; start the job again"}
	case errors.Is(cause, context.DeadlineExceeded):
		out.Error = &store.JobError{Code: "upstream_timeout", Message: "the upstream did not answer within the job timeout (" + j.route.Timeout.String() + ")"}
	case c.resultErr != nil && errors.Is(c.resultErr, store.ErrTooLarge):
		out.Error = &store.JobError{Code: store.CodeResultTooLarge, Message: c.resultErr.Error()}
	case c.resultErr != nil:
		out.Error = &store.JobError{Code: CodeResultUnstorable, Message: "the upstream's response could not be stored: " + c.resultErr.Error()}
	case upErr != nil && c.wroteHeader:
		out.Error = &store.JobError{Code: "upstream_incomplete", Message: "the upstream's response broke off: " + upErr.Error()}
	case upErr != nil:
		out.Error = upstreamError(e.StatusOf(upErr), upErr)
	default:
		status := c.status
		if !c.wroteHeader {
			status = http.StatusOK // a handler that wrote nothing answered 200 with no body
		}
		out.Response = &store.ResponseHead{Status: status, Header: c.header}
		out.Body = c.result
		if status < 400 {
			out.State = store.Succeeded
		}
	}
	if out.Body == nil {
		c.result.Discard()
	}
	return e.finish(rec, j.id, out)
}

// Error codes of jobs the store could not keep up with.
const (
	// CodeResultUnstorable: the upstream answered, but its response could not be stored.
	CodeResultUnstorable = "result_unstorable"
	// CodeStoreUnavailable: the store could not record the start of the job.
	CodeStoreUnavailable = "store_unavailable"
)

// Pauses between attempts to record a job's end that the store refused.
const (
	finishRetryFirst = 100 * time.Millisecond
	finishRetryMax   = 2 * time.Second
)

// finish records a job's end. A store that cannot write (a full disk) must not leave the job
// running for ever, its subscribers waiting for a done that never comes: the end is tried
// again, with growing pauses, until the store takes it, the job is gone, or the engine closes
// (the next start then ends the job as interrupted). A refused Finish has let go of the
// result body, so a job that had a response ends failed with result_unstorable instead.
// It returns the final document, or nil when it did not record the end.
func (e *Engine) finish(rec context.Context, id string, out store.Outcome) *store.Job {
	pause := finishRetryFirst
	for attempt := 1; ; attempt++ {
		doc, err := e.Store.Finish(rec, id, out)
		if err == nil {
			e.ended(doc)
		}
		if err == nil || errors.Is(err, store.ErrFinished) || errors.Is(err, store.ErrNotFound) {
			if attempt > 1 && err == nil {
				e.Log.Info("recorded the end of a job after the store refused it", zap.String("job", id), zap.Int("attempts", attempt))
			}
			return doc
		}
		if attempt == 1 {
			e.Log.Error("recording the end of a job; trying again until the store takes it", zap.String("job", id), zap.Error(err))
		}
		if errors.Is(err, store.ErrClosed) || (attempt > 1 && (errors.Is(err, store.ErrInvalid) || errors.Is(err, store.ErrTooLarge))) {
			return nil // closed: the next start ends it as interrupted; invalid: no retry helps
		}
		if out.Response != nil {
			out = store.Outcome{State: store.Failed, Error: &store.JobError{Code: CodeResultUnstorable,
				Message: "the upstream answered " + strconv.Itoa(out.Response.Status) + ", but its response could not be stored: " + err.Error()}}
		}
		timer := time.NewTimer(pause)
		select {
		case <-timer.C:
		case <-e.closing:
			timer.Stop()
			return nil
		}
		pause = min(2*pause, finishRetryMax)
	}
}

func upstreamError(status int, err error) *store.JobError {
	switch status {
	case http.StatusBadGateway:
		return &store.JobError{Code: "upstream_unreachable", Message: "the upstream could not be reached: " + err.Error()}
	case http.StatusGatewayTimeout:
		return &store.JobError{Code: "upstream_timeout", Message: "the upstream timed out: " + err.Error()}
	}
	return &store.JobError{Code: "upstream_error", Message: err.Error()}
}

// retryAfter suggests, in seconds, when a client polling a job should look again.
func retryAfter(j *store.Job) int {
	if j.ETASeconds != nil {
		return int(min(max(*j.ETASeconds/2, 1), 30))
	}
	if j.QueuePosition != nil {
		return min(1+*j.QueuePosition, 30)
	}
	return 2
}

// jobTimeout bounds a job's upstream request when a route sets none.
const defaultJobTimeout = time.Hour
