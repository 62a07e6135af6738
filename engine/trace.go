package engine

import (
	"context"
	"net/http"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/caddy-progress/progress/store"
)

// Tracing follows the tracer provider of the request's own span: in Caddy, the `tracing`
// directive's. A request without a valid span (tracing off) makes no span here and pays one
// context lookup.
//
// A job outlives the request that created it, so its span is a new root, linked to that
// request's span; its queue wait and upstream call are its children, and the upstream request
// carries the upstream call's traceparent. Callbacks and event streams get spans of their own
// under their requests' spans, linked to the job's. The job's span context is kept with the job
// (job attribute AttrTraceParent), so work on it after a restart still links to it.

// tracerName is the instrumentation scope of the spans made here.
const tracerName = "github.com/caddy-progress/progress"

// AttrTraceParent is the job attribute holding the W3C traceparent of the job's span.
const AttrTraceParent = "traceparent"

// Span attributes.
const (
	attrJobID     = attribute.Key("progress.job.id")
	attrRoute     = attribute.Key("progress.route")
	attrState     = attribute.Key("progress.job.state")
	attrErrorCode = attribute.Key("progress.job.error_code")
	attrHow       = attribute.Key("progress.job.how")
	attrReused    = attribute.Key("progress.job.reused")
	attrQueuePos  = attribute.Key("progress.job.queue_position")
	attrStatus    = attribute.Key("http.response.status_code")
	attrMethod    = attribute.Key("http.request.method")
	attrResumed   = attribute.Key("progress.events.resumed_after")
	attrDelivered = attribute.Key("progress.events.delivered")
	attrReason    = attribute.Key("progress.callback.rejected")
)

// traceContext is W3C Trace Context, what the contract names (traceparent), whatever
// propagators the tracing directive uses for its own requests.
var traceContext propagation.TraceContext

// requestTracer returns a tracer from the provider of r's span, or nil when r has no span or
// the engine's traces are off.
func (e *Engine) requestTracer(r *http.Request) (trace.Tracer, trace.SpanContext) {
	parent := trace.SpanFromContext(r.Context())
	if e.tracesOff.Load() {
		return nil, parent.SpanContext()
	}
	sc := parent.SpanContext()
	if !sc.IsValid() || !sc.IsSampled() {
		// No tracing, or the request was sampled out: the job's spans, new roots, would
		// otherwise be sampled afresh, and a sampled-out request would still cost their upkeep.
		return nil, sc
	}
	return parent.TracerProvider().Tracer(tracerName), sc
}

// jobTrace is a job's span and what its children need; nil when tracing is off.
type jobTrace struct {
	tracer trace.Tracer
	ctx    context.Context // carries span
	span   trace.Span
	id     string // the job's, once made
}

// startJobTrace opens a job's root span, linked to the span of the request r creating it.
func (e *Engine) startJobTrace(r *http.Request, route, how string) *jobTrace {
	tracer, requestSpan := e.requestTracer(r)
	if tracer == nil {
		return nil
	}
	ctx, span := tracer.Start(context.Background(), "progress job",
		trace.WithNewRoot(), trace.WithLinks(trace.Link{SpanContext: requestSpan}),
		trace.WithSpanKind(trace.SpanKindInternal),
		trace.WithAttributes(attrRoute.String(route), attrMethod.String(r.Method), attrHow.String(how)))
	return &jobTrace{tracer: tracer, ctx: ctx, span: span}
}

// traceParent is the job span's context as a traceparent value, to keep with the job.
func (t *jobTrace) traceParent() string {
	carrier := propagation.MapCarrier{}
	traceContext.Inject(t.ctx, carrier)
	return carrier.Get("traceparent")
}

// created names the job the span stands for; reused says the request found its job already
// made (Idempotency-Key), so this span ends at once.
func (t *jobTrace) created(doc *store.Job, reused bool) {
	if t == nil {
		return
	}
	t.id = doc.ID
	t.span.SetAttributes(attrJobID.String(doc.ID))
	if reused {
		t.span.SetAttributes(attrReused.Bool(true))
		t.span.End()
	}
}

// failed ends the span of a job that could not be made.
func (t *jobTrace) failed(err error) {
	if t == nil {
		return
	}
	t.span.SetStatus(codes.Error, err.Error())
	t.span.End()
}

// child starts a child span of the job's (queue wait, upstream call); nil-safe.
func (t *jobTrace) child(name string, kind trace.SpanKind, attrs ...attribute.KeyValue) (context.Context, trace.Span) {
	if t == nil {
		return nil, nil
	}
	return t.tracer.Start(t.ctx, name, trace.WithSpanKind(kind), trace.WithAttributes(append(attrs, attrJobID.String(t.id))...))
}

// propagate makes the upstream request carry ctx's span as its traceparent, in place of the
// creating request's (Caddy's tracing put that one on the request, but the request that
// reaches the upstream is the job's).
func propagate(ctx context.Context, h http.Header) {
	h.Del("traceparent")
	h.Del("tracestate")
	traceContext.Inject(ctx, propagation.HeaderCarrier(h))
}

// end closes the job's span with how the job ended.
func (t *jobTrace) end(doc *store.Job) {
	if t == nil {
		return
	}
	if doc != nil {
		t.span.SetAttributes(attrState.String(string(doc.State)))
		if doc.Response != nil {
			t.span.SetAttributes(attrStatus.Int(doc.Response.Status))
		}
		if doc.Error != nil {
			t.span.SetAttributes(attrErrorCode.String(doc.Error.Code))
		}
		if doc.State == store.Failed {
			msg := "the job failed"
			if doc.Error != nil {
				msg = doc.Error.Code
			}
			t.span.SetStatus(codes.Error, msg)
		}
	}
	t.span.End()
}

// jobLink links to the span of the job doc, from the trace context kept with it; false when the
// job was made without tracing.
func jobLink(doc *store.Job) (trace.Link, bool) {
	if doc == nil || doc.Attrs[AttrTraceParent] == "" {
		return trace.Link{}, false
	}
	ctx := traceContext.Extract(context.Background(), propagation.MapCarrier{"traceparent": doc.Attrs[AttrTraceParent]})
	sc := trace.SpanContextFromContext(ctx)
	if !sc.IsValid() {
		return trace.Link{}, false
	}
	return trace.Link{SpanContext: sc, Attributes: []attribute.KeyValue{attrJobID.String(doc.ID)}}, true
}

// startRequestSpan starts a span under r's own span for work on a job (a callback, an event
// stream, a long-poll), linked to the job's span when doc is known; nil when tracing is off.
func (e *Engine) startRequestSpan(r *http.Request, name, id string, doc *store.Job) trace.Span {
	tracer, _ := e.requestTracer(r)
	if tracer == nil {
		return nil
	}
	opts := []trace.SpanStartOption{trace.WithSpanKind(trace.SpanKindInternal), trace.WithAttributes(attrJobID.String(id))}
	if link, ok := jobLink(doc); ok {
		opts = append(opts, trace.WithLinks(link))
	}
	_, span := tracer.Start(r.Context(), name, opts...)
	return span
}
