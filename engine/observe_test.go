package engine

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/upstreamhook"
)

// traced gives r a span of its own from tp, as Caddy's tracing directive does for every
// request it handles; the span ends when the test ends.
func traced(t *testing.T, tp trace.TracerProvider, r *http.Request, name string) (*http.Request, trace.SpanContext) {
	ctx, span := tp.Tracer("test").Start(r.Context(), name, trace.WithSpanKind(trace.SpanKindServer))
	t.Cleanup(func() { span.End() })
	return r.WithContext(ctx), span.SpanContext()
}

// serve sends r to the route or the API and returns the response.
func serveTo(t *testing.T, h func(http.ResponseWriter, *http.Request) error, r *http.Request) *httptest.ResponseRecorder {
	t.Helper()
	w := httptest.NewRecorder()
	if err := h(w, r); err != nil {
		p, ok := err.(*Problem)
		if !ok {
			t.Fatal(err)
		}
		p.Write(w)
	}
	return w
}

func spanNamed(t *testing.T, spans []sdktrace.ReadOnlySpan, name string, attr attribute.KeyValue) sdktrace.ReadOnlySpan {
	t.Helper()
	for _, s := range spans {
		if s.Name() != name {
			continue
		}
		for _, a := range s.Attributes() {
			if a == attr {
				return s
			}
		}
	}
	var names []string
	for _, s := range spans {
		names = append(names, s.Name())
	}
	t.Fatalf("no ended span %q with %v among %v", name, attr, names)
	return nil
}

func hasAttr(s sdktrace.ReadOnlySpan, want attribute.KeyValue) bool {
	for _, a := range s.Attributes() {
		if a == want {
			return true
		}
	}
	return false
}

func linksTo(s sdktrace.ReadOnlySpan, sc trace.SpanContext) bool {
	for _, l := range s.Links() {
		if l.SpanContext.TraceID() == sc.TraceID() && l.SpanContext.SpanID() == sc.SpanID() {
			return true
		}
	}
	return false
}

// TestJobTrace follows one queued job through its life with tracing on: the job's span is a new
// root linked to the creating request's span; queue wait and upstream call are its children;
// the upstream request carries the upstream span's traceparent; a callback and an event stream
// are spans under their own requests, linked to the job. After a restart, an event stream on
// the same job still links to the job's span.
func TestJobTrace(t *testing.T) {
	recorder := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(recorder))
	path := filepath.Join(t.TempDir(), "progress.db")
	st, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e := New(st, nil, nil, nil)
	route := &Route{Engine: e, Name: "/reports/*", Concurrency: 1, CallbackBase: "http://127.0.0.1:2080"}
	route.Init()
	api := &API{Engine: e, Heartbeat: time.Minute}
	api.Init()
	closed := false
	t.Cleanup(func() {
		if !closed {
			e.Close()
			st.Close()
		}
	})

	// The first job holds the route's only slot, so the second queues.
	release := make(chan struct{})
	firstReq, _ := traced(t, tp, httptest.NewRequest("POST", "/reports/1", nil), "create first")
	firstReq.Header.Set("Prefer", "respond-async")
	w := serveTo(t, func(w http.ResponseWriter, r *http.Request) error {
		return route.Serve(w, r, Owner{}, func(w http.ResponseWriter, r *http.Request) error {
			<-release
			return nil
		})
	}, firstReq)
	first := docOf(t, w)

	var upstreamTraceParent string
	var callbackCode int
	req, createSpan := traced(t, tp, httptest.NewRequest("POST", "/reports/2", strings.NewReader("x")), "create second")
	req.Header.Set("Prefer", "respond-async")
	w = serveTo(t, func(w http.ResponseWriter, r *http.Request) error {
		return route.Serve(w, r, Owner{}, func(w http.ResponseWriter, up *http.Request) error {
			upstreamTraceParent = up.Header.Get("traceparent")
			// The upstream reports progress through the callback endpoint, in a request that
			// has a span of its own (the callback site's tracing).
			cb, _ := traced(t, tp, httptest.NewRequest("POST", "/_jobs/"+up.Header.Get(upstreamhook.HeaderJobID)+"/progress",
				strings.NewReader(`{"percent":50,"stage":"half"}`)), "callback request")
			cb.Header.Set("Authorization", "Bearer "+up.Header.Get(upstreamhook.HeaderToken))
			callbackCode = serveTo(t, api.ServeHTTP, cb).Code
			w.WriteHeader(http.StatusCreated)
			io.WriteString(w, "made")
			return nil
		})
	}, req)
	second := docOf(t, w)
	if second.State != store.Queued {
		t.Fatalf("second job %s, want queued behind the first", second.State)
	}

	// A subscriber follows the second job to its end.
	sseReq, sseSpan := traced(t, tp, httptest.NewRequest("GET", "/_jobs/"+second.ID+"/events", nil), "events request")
	streamed := make(chan *httptest.ResponseRecorder)
	go func() {
		w := httptest.NewRecorder()
		api.ServeHTTP(w, sseReq)
		streamed <- w
	}()
	close(release)
	select {
	case w = <-streamed:
	case <-time.After(20 * time.Second):
		t.Fatal("the event stream did not end with the job")
	}
	if !strings.Contains(w.Body.String(), "event: done") || callbackCode != http.StatusNoContent {
		t.Fatalf("stream %q, callback %d", w.Body, callbackCode)
	}
	e.Close() // waits for the jobs' goroutines, which end their spans

	spans := recorder.Ended()
	job := spanNamed(t, spans, "progress job", attrJobID.String(second.ID))
	if job.Parent().IsValid() {
		t.Errorf("job span has parent %v; it must be a new root", job.Parent().SpanID())
	}
	if !linksTo(job, createSpan) {
		t.Errorf("job span does not link to the creating request's span; links %v", job.Links())
	}
	for _, want := range []attribute.KeyValue{attrRoute.String("/reports/*"), attrState.String("succeeded"), attrStatus.Int(201), attrHow.String(HowRespondAsync)} {
		if !hasAttr(job, want) {
			t.Errorf("job span lacks %v: %v", want, job.Attributes())
		}
	}
	jobSC := job.SpanContext()
	queue := spanNamed(t, spans, "progress queue", attrJobID.String(second.ID))
	upstream := spanNamed(t, spans, "progress upstream", attrJobID.String(second.ID))
	for name, s := range map[string]sdktrace.ReadOnlySpan{"queue": queue, "upstream": upstream} {
		if s.Parent().SpanID() != jobSC.SpanID() || s.SpanContext().TraceID() != jobSC.TraceID() {
			t.Errorf("%s span is not a child of the job span", name)
		}
	}
	if !queue.EndTime().After(queue.StartTime()) || queue.EndTime().After(upstream.StartTime()) {
		t.Errorf("queue span %v..%v does not end before the upstream span starts at %v", queue.StartTime(), queue.EndTime(), upstream.StartTime())
	}
	wantTP := "00-" + jobSC.TraceID().String() + "-" + upstream.SpanContext().SpanID().String() + "-01"
	if upstreamTraceParent != wantTP {
		t.Errorf("upstream saw traceparent %q, want the upstream span's %q", upstreamTraceParent, wantTP)
	}
	callback := spanNamed(t, spans, "progress callback", attrJobID.String(second.ID))
	if !linksTo(callback, jobSC) || callback.Parent().IsValid() && callback.Parent().TraceID() == jobSC.TraceID() {
		t.Errorf("callback span: parent %v, links %v; want under its request, linked to the job", callback.Parent(), callback.Links())
	}
	events := spanNamed(t, spans, "progress events", attrJobID.String(second.ID))
	if !linksTo(events, jobSC) || events.Parent().SpanID() != sseSpan.SpanID() {
		t.Errorf("events span: parent %v, links %v", events.Parent(), events.Links())
	}
	// Four events: queued (current when the stream began), running, the report, done.
	if !hasAttr(events, attrDelivered.Int(4)) {
		t.Errorf("events span attributes %v, want %v", events.Attributes(), attrDelivered.Int(4))
	}
	// The first job was created running: no queue span.
	for _, s := range spans {
		if s.Name() == "progress queue" && hasAttr(s, attrJobID.String(first.ID)) {
			t.Error("a job created running has a queue span")
		}
	}

	// After a restart, work on the job still links to its span.
	st.Close()
	closed = true
	st2, err := store.Open(path, store.Options{})
	if err != nil {
		t.Fatal(err)
	}
	e2 := New(st2, nil, nil, nil)
	t.Cleanup(func() { e2.Close(); st2.Close() })
	api2 := &API{Engine: e2, Heartbeat: time.Minute}
	api2.Init()
	again, _ := traced(t, tp, httptest.NewRequest("GET", "/_jobs/"+second.ID+"/events", nil), "events after restart")
	if w := serveTo(t, api2.ServeHTTP, again); !strings.Contains(w.Body.String(), "event: done") {
		t.Fatalf("after restart: %d %q", w.Code, w.Body)
	}
	var after []sdktrace.ReadOnlySpan
	for _, s := range recorder.Ended() {
		if s.Name() == "progress events" && s.Parent().SpanID() != sseSpan.SpanID() {
			after = append(after, s)
		}
	}
	if len(after) != 1 || !linksTo(after[0], jobSC) {
		t.Fatalf("event stream after restart: %d spans, links %v; want one linked to the job span", len(after), after)
	}
}

// TestNoSpanNoTrace: a request without a span (tracing off), or with one that was sampled out,
// makes no span and no trace context, and the upstream gets no traceparent of the job's.
func TestNoSpanNoTrace(t *testing.T) {
	recorder := tracetest.NewSpanRecorder()
	sampledOut := sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.NeverSample()), sdktrace.WithSpanProcessor(recorder))
	f := newFixture(t, Route{})
	for _, withSpan := range []bool{false, true} {
		r := httptest.NewRequest("POST", "/reports", nil)
		r.Header.Set("Prefer", "respond-async")
		if withSpan {
			r, _ = traced(t, sampledOut, r, "sampled out")
		}
		var seen http.Header
		w := serveTo(t, func(w http.ResponseWriter, r *http.Request) error {
			return f.route.Serve(w, r, Owner{}, func(w http.ResponseWriter, r *http.Request) error {
				seen = r.Header.Clone()
				return nil
			})
		}, r)
		doc := docOf(t, w)
		waitDone(t, f.st, doc.ID)
		got, err := f.st.Get(context.Background(), doc.ID)
		if err != nil {
			t.Fatal(err)
		}
		if got.Attrs[AttrTraceParent] != "" || seen.Get("traceparent") != "" {
			t.Fatalf("request span %v: the job keeps %q and the upstream saw %q", withSpan, got.Attrs[AttrTraceParent], seen.Get("traceparent"))
		}
	}
	f.engine.Close()
	if n := len(recorder.Started()); n != 0 {
		t.Fatalf("%d spans started for sampled-out requests", n)
	}
}

// TestTracesOff: with the engine's traces off (`traces off`), a sampled request span (Caddy's
// tracing directive on) gets no job span, no stored traceparent, no traceparent upstream and
// no callback span; only the requests' own spans are recorded.
func TestTracesOff(t *testing.T) {
	recorder := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(recorder))
	f := newFixture(t, Route{})
	f.engine.SetTraces(false)

	r, _ := traced(t, tp, httptest.NewRequest("POST", "/reports", nil), "create request")
	r.Header.Set("Prefer", "respond-async")
	var seen http.Header
	release := make(chan struct{})
	w := serveTo(t, func(w http.ResponseWriter, r *http.Request) error {
		return f.route.Serve(w, r, Owner{}, func(w http.ResponseWriter, r *http.Request) error {
			seen = r.Header.Clone()
			<-release
			return nil
		})
	}, r)
	doc := docOf(t, w)
	cb, _ := traced(t, tp, httptest.NewRequest("POST", "/_jobs/"+doc.ID+"/progress", strings.NewReader(`{"percent":50}`)), "callback request")
	cb.Header.Set("Authorization", "Bearer "+f.engine.Token(doc.ID))
	if w := serveTo(t, f.api.ServeHTTP, cb); w.Code != http.StatusNoContent {
		t.Fatalf("callback: %d %s", w.Code, w.Body)
	}
	close(release)
	waitDone(t, f.st, doc.ID)
	got, err := f.st.Get(context.Background(), doc.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Attrs[AttrTraceParent] != "" || seen.Get("traceparent") != "" {
		t.Fatalf("traces off: the job keeps %q and the upstream saw %q", got.Attrs[AttrTraceParent], seen.Get("traceparent"))
	}
	f.engine.Close()
	var names []string
	for _, s := range recorder.Started() {
		names = append(names, s.Name())
	}
	if len(names) != 2 || names[0] != "create request" || names[1] != "callback request" {
		t.Fatalf("spans started with traces off: %q, want only the two requests' own", names)
	}
}

// gathered reads the metrics as a scrape would.
type gathered map[string]*dto.MetricFamily

func gather(t *testing.T, m *Metrics) gathered {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(m.Collectors()...)
	fams, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := gathered{}
	for _, f := range fams {
		out[f.GetName()] = f
	}
	return out
}

// value is the counter or gauge value of the series with these labels (name=value pairs), or
// the sample count of a histogram; 0 when there is no such series.
func (g gathered) value(name string, labels ...string) float64 {
	var total float64
	f := g[name]
	if f == nil {
		return 0
	}
next:
	for _, m := range f.GetMetric() {
		have := map[string]string{}
		for _, l := range m.GetLabel() {
			have[l.GetName()] = l.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			total += m.Counter.GetValue()
		case m.Gauge != nil:
			total += m.Gauge.GetValue()
		case m.Histogram != nil:
			total += float64(m.Histogram.GetSampleCount())
		}
	}
	return total
}

// TestMetricsCountWhatHappened runs jobs that succeed, fail, queue, get canceled and report,
// with subscribers, and checks every metric against what happened.
func TestMetricsCountWhatHappened(t *testing.T) {
	f := newFixture(t, Route{Name: "/r/*", Concurrency: 1})
	m := NewMetrics()
	f.engine.SetMetrics(m)
	f.route.Init() // picks the metrics up

	// Held job (running), then one queued behind it that gets canceled, then one queued that
	// fails, then one that reports twice and succeeds.
	heldID, release := f.startHeld(t)
	canceled := docOf(t, f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error { return nil }))
	failing := docOf(t, f.start(t, "wait=0", func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusInternalServerError)
		return nil
	}))
	reportsSent := 0
	reporting := docOf(t, f.start(t, "respond-async", func(w http.ResponseWriter, r *http.Request) error {
		for _, body := range []string{`{"percent":10}`, `{"percent":90}`} {
			if got := f.report(t, r.Header.Get(upstreamhook.HeaderJobID), r.Header.Get(upstreamhook.HeaderToken), body); got.Code == http.StatusNoContent {
				reportsSent++
			}
		}
		return nil
	}))
	g := gather(t, m)
	if q, r := g.value("caddy_progress_jobs_queued"), g.value("caddy_progress_jobs_running"); q != 3 || r != 1 {
		t.Errorf("while one runs and three wait: queued %v running %v", q, r)
	}
	// A subscriber on the reporting job, from before it runs to its end, and a long-poller on
	// the failing one, waiting for its next change.
	streamed := make(chan string)
	go func() { streamed <- f.call(t, "GET", "/_jobs/"+reporting.ID+"/events", nil).Body.String() }()
	polled := make(chan int)
	go func() {
		polled <- f.call(t, "GET", "/_jobs/"+failing.ID+"?after="+strconv.FormatUint(failing.Seq, 10)+"&wait=20", nil).Code
	}()
	waitFor(t, func() bool {
		g := gather(t, m)
		return g.value("caddy_progress_subscribers", "kind", SubscriberSSE) == 1 && g.value("caddy_progress_subscribers", "kind", SubscriberLongPoll) == 1
	})
	if w := f.call(t, "POST", "/_jobs/"+canceled.ID+"/cancel", nil); w.Code != http.StatusOK {
		t.Fatalf("cancel: %d %s", w.Code, w.Body)
	}
	// Rejected callbacks: a wrong token, a malformed body, a finished job.
	f.report(t, heldID, "nope", `{"percent":1}`)
	f.report(t, heldID, f.engine.Token(heldID), `{"percent":"x"}`)
	f.report(t, canceled.ID, f.engine.Token(canceled.ID), `{"percent":1}`)
	close(release)
	for _, id := range []string{heldID, failing.ID, reporting.ID} {
		waitDone(t, f.st, id)
	}
	body := <-streamed
	if !strings.Contains(body, "event: done") {
		t.Fatalf("stream: %q", body)
	}
	// Every frame after the first (the document as it was when the stream began) is live.
	liveFrames := float64(strings.Count(body, "\nevent: ") - 1)
	if code := <-polled; code != http.StatusOK {
		t.Fatalf("long-poll: %d", code)
	}
	f.engine.Close() // every job goroutine has ended: the gauges are final

	g = gather(t, m)
	checks := []struct {
		name   string
		labels []string
		want   float64
	}{
		{"caddy_progress_jobs_created_total", []string{"route", "/r/*", "how", HowRespondAsync}, 3},
		{"caddy_progress_jobs_created_total", []string{"route", "/r/*", "how", HowWait}, 1},
		{"caddy_progress_jobs_finished_total", []string{"state", "succeeded"}, 2},
		{"caddy_progress_jobs_finished_total", []string{"state", "failed"}, 1},
		{"caddy_progress_jobs_finished_total", []string{"state", "canceled"}, 1},
		{"caddy_progress_jobs_queued", nil, 0},
		{"caddy_progress_jobs_running", nil, 0},
		{"caddy_progress_queue_wait_seconds", nil, 3}, // the three that started: held, failing, reporting
		{"caddy_progress_job_duration_seconds", nil, 4},
		{"caddy_progress_job_duration_seconds", []string{"state", "canceled"}, 1},
		{"caddy_progress_progress_events_total", []string{"source", SourceCallback}, float64(reportsSent)},
		{"caddy_progress_callbacks_rejected_total", []string{"reason", RejectToken}, 1},
		{"caddy_progress_callbacks_rejected_total", []string{"reason", RejectMalformed}, 1},
		{"caddy_progress_callbacks_rejected_total", []string{"reason", RejectFinished}, 1},
		{"caddy_progress_subscribers", nil, 0},
		{"caddy_progress_delivery_seconds", []string{"kind", SubscriberSSE}, liveFrames},
		{"caddy_progress_delivery_seconds", []string{"kind", SubscriberLongPoll}, 1},
	}
	for _, c := range checks {
		if got := g.value(c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
	if reportsSent != 2 {
		t.Errorf("%d reports acknowledged, want 2", reportsSent)
	}
	if liveFrames < 4 { // running, two reports, done; and queue moves
		t.Errorf("the stream had %v live events, want at least 4:\n%s", liveFrames, body)
	}
}

// waitFor polls cond every few milliseconds for up to 20 seconds.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met within 20s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}
