package e2e

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	coltracepb "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"
)

// otlpSink is an OTLP/HTTP trace receiver on loopback: what Caddy's tracing exports lands here.
type otlpSink struct {
	url   string
	mu    sync.Mutex
	spans []*tracepb.Span
}

func startOTLPSink(t *testing.T) *otlpSink {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &otlpSink{url: "http://" + ln.Addr().String() + "/v1/traces"}
	srv := &http.Server{Handler: http.HandlerFunc(s.receive), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return s
}

func (s *otlpSink) receive(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	var req coltracepb.ExportTraceServiceRequest
	if err == nil {
		err = proto.Unmarshal(body, &req)
	}
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	s.mu.Lock()
	for _, rs := range req.ResourceSpans {
		for _, ss := range rs.ScopeSpans {
			s.spans = append(s.spans, ss.Spans...)
		}
	}
	s.mu.Unlock()
	out, _ := proto.Marshal(&coltracepb.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	w.Write(out)
}

// find returns the received spans named name whose progress.job.id is id.
func (s *otlpSink) find(name, id string) []*tracepb.Span {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*tracepb.Span
	for _, sp := range s.spans {
		if sp.Name != name {
			continue
		}
		for _, a := range sp.Attributes {
			if a.Key == "progress.job.id" && a.Value.GetStringValue() == id {
				out = append(out, sp)
			}
		}
	}
	return out
}

// byID finds a received span.
func (s *otlpSink) byID(spanID []byte) *tracepb.Span {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, sp := range s.spans {
		if string(sp.SpanId) == string(spanID) {
			return sp
		}
	}
	return nil
}

// waitOne waits up to 20 seconds for exactly-at-least one span named name for job id.
func (s *otlpSink) waitOne(t *testing.T, name, id string) *tracepb.Span {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if got := s.find(name, id); len(got) > 0 {
			return got[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q span for job %s exported within 20s", name, id)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func linked(sp *tracepb.Span, to *tracepb.Span) bool {
	for _, l := range sp.Links {
		if string(l.TraceId) == string(to.TraceId) && string(l.SpanId) == string(to.SpanId) {
			return true
		}
	}
	return false
}

// TestTracingThroughCaddy turns on Caddy's own `tracing` directive, exporting by OTLP to a
// receiver in the test, and checks what a job's trace looks like when it leaves Caddy: the job
// span a new root linked to the creating request's span (Caddy's), the upstream call its child,
// the upstream request carrying that child's traceparent, callback and event-stream spans under
// their own requests' spans and linked to the job's.
func TestTracingThroughCaddy(t *testing.T) {
	sink := startOTLPSink(t)
	c := startCaddy(t, caddyOptions{Tracing: true, Env: []string{
		"OTEL_TRACES_EXPORTER=otlp", "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=" + sink.url, "OTEL_BSP_SCHEDULE_DELAY=50",
		"OTEL_SERVICE_NAME=caddy-progress-e2e",
	}})
	cl := c.newClient(t, "h2")

	doc, _ := cl.startJob(t, http.MethodPost, "/jobs/report?steps=2&ms=20", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	checkStream(t, "report job", cl.follow(ctx, doc.Links.Events, sseOptions{}))
	slow, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=20", nil)
	checkStream(t, "slow job", cl.follow(ctx, slow.Links.Events, sseOptions{}))
	var answer struct {
		TraceParent string `json:"traceparent"`
	}
	if err := json.Unmarshal(cl.result(t, slow.ID).body, &answer); err != nil {
		t.Fatal(err)
	}

	for _, id := range []string{doc.ID, slow.ID} {
		job := sink.waitOne(t, "progress job", id)
		if len(job.ParentSpanId) != 0 {
			t.Errorf("job %s: span has a parent; it must be a new root", id)
		}
		if len(job.Links) != 1 {
			t.Fatalf("job %s: span has %d links, want 1 (the creating request's)", id, len(job.Links))
		}
		creating := sink.byID(job.Links[0].SpanId)
		if creating == nil || creating.Kind != tracepb.Span_SPAN_KIND_SERVER || string(creating.TraceId) == string(job.TraceId) {
			t.Errorf("job %s: the link does not lead to a request span of Caddy's in another trace: %v", id, creating)
		}
		upstream := sink.waitOne(t, "progress upstream", id)
		if string(upstream.ParentSpanId) != string(job.SpanId) || string(upstream.TraceId) != string(job.TraceId) {
			t.Errorf("job %s: upstream span is not the job span's child", id)
		}
		if id == slow.ID {
			want := "00-" + hex.EncodeToString(job.TraceId) + "-" + hex.EncodeToString(upstream.SpanId) + "-01"
			if answer.TraceParent != want {
				t.Errorf("the upstream saw traceparent %q, want the upstream span's %q", answer.TraceParent, want)
			}
		}
		events := sink.waitOne(t, "progress events", id)
		if !linked(events, job) || sink.byID(events.ParentSpanId) == nil {
			t.Errorf("job %s: events span not linked to the job, or not under its request's span", id)
		}
	}
	callbacks := 0
	deadline := time.Now().Add(20 * time.Second)
	for callbacks < 2 && time.Now().Before(deadline) {
		callbacks = 0
		for _, cb := range sink.find("progress callback", doc.ID) {
			if linked(cb, sink.waitOne(t, "progress job", doc.ID)) && len(cb.ParentSpanId) != 0 {
				callbacks++
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	if callbacks != 2 {
		t.Errorf("%d callback spans linked to the job and under their requests' spans, want 2", callbacks)
	}
	c.checkLog()
}
