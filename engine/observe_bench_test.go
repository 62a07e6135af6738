package engine

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// The overhead of observability (issue #5: within 5%), measured on the plugin alone (a real
// bbolt store with fsync, the engine, no Caddy and no network for job creation), where it is
// the largest share of the cost: in front of Caddy, HTTP and TLS dilute it. "on" is metrics
// on and every request carrying a sampled span, as Caddy's tracing directive gives it, from a
// tracer provider that batches and exports OTLP/HTTP protobuf to a loopback receiver that
// discards it; "metrics" is metrics alone; "off" is neither. Run all in one process:
//
//	go test -run XXX -bench Observability -count 6 ./engine

// observed sets a fixture's observability (off, metrics alone, or on: metrics and tracing)
// and returns the tracer provider that requests take their spans from.
func observed(b *testing.B, f *fixture, mode string) trace.TracerProvider {
	switch mode {
	case "off":
		f.engine.SetMetrics(nil)
		f.route.Init()
		return noop.NewTracerProvider()
	case "metrics":
		f.engine.SetMetrics(NewMetrics())
		f.route.Init()
		return noop.NewTracerProvider()
	}
	sink := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
	}))
	b.Cleanup(sink.Close)
	exp, err := otlptracehttp.New(context.Background(), otlptracehttp.WithEndpointURL(sink.URL+"/v1/traces"))
	if err != nil {
		b.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp))
	b.Cleanup(func() { tp.Shutdown(context.Background()) })
	f.engine.SetMetrics(NewMetrics())
	f.route.Init()
	return tp
}

// benchFixture is newFixture with a heartbeat long enough never to fire in a measurement.
func benchFixture(b *testing.B, route Route) *fixture {
	f := newFixture(b, route)
	f.api.Heartbeat = time.Minute
	return f
}

// BenchmarkObservability/create: job creation (Prefer: respond-async to 202, the job's store
// writes and its instant upstream call in the background) from 32 concurrent clients.
// BenchmarkObservability/deliver: a progress callback to the moment each of 10 SSE
// subscribers (over loopback HTTP/1.1) has read its event; ns/op is that latency, with p50
// and p99 reported.
func BenchmarkObservability(b *testing.B) {
	modes := []string{"off", "metrics", "on"}
	for _, mode := range modes {
		b.Run("create/"+mode, func(b *testing.B) { benchCreate(b, mode) })
	}
	for _, mode := range modes {
		b.Run("deliver/"+mode, func(b *testing.B) { benchDeliver(b, mode) })
	}
}

func benchCreate(b *testing.B, mode string) {
	f := benchFixture(b, Route{Name: "/bench/*"})
	tp := observed(b, f, mode)
	tracer := tp.Tracer("bench")
	upstream := func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusOK)
		io.WriteString(w, `{"ok":true}`)
		return nil
	}
	b.SetParallelism(16) // 32 in flight on 2 cores: enough to fill group commits
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			r := httptest.NewRequest("POST", "/bench/x", strings.NewReader(`{"n":1}`))
			r.Header.Set("Prefer", "respond-async")
			ctx, span := tracer.Start(r.Context(), "request", trace.WithSpanKind(trace.SpanKindServer))
			w := httptest.NewRecorder()
			if err := f.route.Serve(w, r.WithContext(ctx), Owner{}, upstream); err != nil || w.Code != http.StatusAccepted {
				b.Errorf("create: %v %d", err, w.Code)
			}
			span.End()
		}
	})
	b.StopTimer()
	f.engine.Close() // the background jobs end before the store closes
}

func benchDeliver(b *testing.B, mode string) {
	f := benchFixture(b, Route{Name: "/bench/*"})
	tp := observed(b, f, mode)
	tracer := tp.Tracer("bench")
	// Every request gets a span first, as under Caddy's tracing directive.
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, span := tracer.Start(r.Context(), "request", trace.WithSpanKind(trace.SpanKindServer))
		defer span.End()
		if err := f.api.ServeHTTP(w, r.WithContext(ctx)); err != nil {
			if p, ok := err.(*Problem); ok {
				p.Write(w)
			}
		}
	}))
	b.Cleanup(srv.Close)

	id, release := f.startHeld(b)
	defer close(release)
	token := f.engine.Token(id)

	// Ten subscribers, each telling the newest seq it has read.
	const subscribers = 10
	seen := make([]atomic.Uint64, subscribers)
	wake := make(chan struct{}, subscribers*4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range subscribers {
		req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL+"/_jobs/"+id+"/events", nil)
		resp, err := srv.Client().Do(req)
		if err != nil || resp.StatusCode != http.StatusOK {
			b.Fatalf("subscribe: %v", err)
		}
		go func() {
			defer resp.Body.Close()
			sc := bufio.NewScanner(resp.Body)
			for sc.Scan() {
				if line := sc.Text(); strings.HasPrefix(line, "id: ") {
					n, _ := strconv.ParseUint(line[4:], 10, 64)
					seen[i].Store(n)
					wake <- struct{}{}
				}
			}
		}()
	}
	client := srv.Client()
	// Reports one after another: each is one write and one event, seq one past the last.
	doc, err := f.st.Get(context.Background(), id)
	if err != nil {
		b.Fatal(err)
	}
	seq := doc.Seq
	post := func(percent int) uint64 {
		req, _ := http.NewRequest("POST", srv.URL+"/_jobs/"+id+"/progress", strings.NewReader(`{"percent":`+strconv.Itoa(percent%100)+`,"message":"step `+strconv.Itoa(percent)+`"}`))
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := client.Do(req)
		if err != nil || resp.StatusCode != http.StatusNoContent {
			b.Fatalf("callback: %v", err)
		}
		resp.Body.Close()
		seq++
		return seq
	}
	waitAll := func(seq uint64) {
		for {
			all := true
			for i := range seen {
				all = all && seen[i].Load() >= seq
			}
			if all {
				return
			}
			select {
			case <-wake:
			case <-time.After(10 * time.Second):
				b.Fatalf("subscribers did not get seq %d", seq)
			}
		}
	}
	waitAll(post(0)) // every subscriber is reading
	latencies := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := range b.N {
		began := time.Now()
		seq := post(i + 1)
		waitAll(seq)
		latencies = append(latencies, time.Since(began))
	}
	b.StopTimer()
	slices.Sort(latencies)
	b.ReportMetric(float64(latencies[len(latencies)/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(latencies[len(latencies)*99/100].Microseconds()), "p99-µs")
}
