package caddyrun

import (
	"io"
	"net"
	"net/http"
	"sync/atomic"
	"time"
)

// OTLPSink stands for a trace collector in the harness process: an OTLP/HTTP endpoint
// (POST /v1/traces) that reads every export, counts it and discards it, answering 200 with an
// empty ExportTraceServiceResponse (an empty protobuf message is zero bytes). It lets Caddy's
// `tracing` directive export over the network as it would in production, while the harness
// proves the spans arrived.
type OTLPSink struct {
	ln       net.Listener
	srv      *http.Server
	requests atomic.Int64
	bytes    atomic.Int64
}

// StartOTLPSink listens on a free loopback port.
func StartOTLPSink() (*OTLPSink, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &OTLPSink{ln: ln}
	s.srv = &http.Server{Handler: http.HandlerFunc(s.serve), ReadHeaderTimeout: 10 * time.Second}
	go s.srv.Serve(ln)
	return s, nil
}

func (s *OTLPSink) serve(w http.ResponseWriter, r *http.Request) {
	n, _ := io.Copy(io.Discard, r.Body)
	if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" {
		http.Error(w, "this sink takes POST /v1/traces only", http.StatusNotFound)
		return
	}
	s.requests.Add(1)
	s.bytes.Add(n)
	w.Header().Set("Content-Type", "application/x-protobuf")
	w.WriteHeader(http.StatusOK)
}

// Counts are the exports received so far and their bytes (protobuf, as sent).
func (s *OTLPSink) Counts() (requests, bytes int64) { return s.requests.Load(), s.bytes.Load() }

// Env is the environment that points Caddy's `tracing` directive (autoexport) at the sink over
// OTLP/HTTP with protobuf.
func (s *OTLPSink) Env() []string {
	return []string{
		"OTEL_TRACES_EXPORTER=otlp",
		"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
		"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=http://" + s.ln.Addr().String() + "/v1/traces",
	}
}

// Close stops the sink.
func (s *OTLPSink) Close() { s.srv.Close() }
