package fanout

import (
	"context"
	"errors"
	"strings"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
)

// job is one job under measurement, however the target made it.
type job = caddyrun.Job

// target is what the clients measure: Caddy with the plugin, or the in-memory baseline hub.
type target interface {
	name() string
	pid() int
	makeJobs(ctx context.Context, n int) ([]job, error)
	// profile fetches a CPU profile of the target's process, if it can, into path.
	profile(ctx context.Context, seconds int, path string) error
	// trace fetches an execution trace of the target's process, if it can, into path.
	trace(ctx context.Context, seconds int, path string) error
	close()
}

// caddyTarget is Caddy with the plugin (tests/internal/caddyrun), as a target.
type caddyTarget struct {
	*caddyrun.Caddy
	label string
	sink  *caddyrun.OTLPSink // with observe "on": where Caddy's spans go
}

// Observability settings of a Caddy target (issue #5's overhead target compares the last two).
const (
	observeDefault = ""    // as configured by default: metrics on, no `tracing`
	observeOff     = "off" // `progress { metrics off }`, no `tracing`
	observeOn      = "on"  // metrics on, `tracing` on both sites, spans exported over OTLP/HTTP to a sink here
)

// splitCaddyBin splits a -caddy-bin entry, `path` or `path;progress option`, so that one run
// can compare settings of one binary.
func splitCaddyBin(entry string) (path, progress string) {
	path, progress, _ = strings.Cut(entry, ";")
	return path, progress
}

// startCaddy starts Caddy with a fresh store (fsync on, as always) and GC tracing in its log;
// with h3 its TLS site also serves HTTP/3; observe is one of the observe* settings. bin is a
// -caddy-bin entry (splitCaddyBin).
func startCaddy(bin, parent string, up *caddyrun.Upstream, h3 bool, observe string) (*caddyTarget, error) {
	bin, progress := splitCaddyBin(bin)
	o := caddyrun.Options{Env: []string{"GODEBUG=gctrace=1"}, HTTP3: h3, Progress: progress, Servers: serverLines}
	var sink *caddyrun.OTLPSink
	switch observe {
	case observeOff:
		o.Progress += "\nmetrics off"
	case observeOn:
		var err error
		if sink, err = caddyrun.StartOTLPSink(); err != nil {
			return nil, err
		}
		o.Tracing = true
		o.Env = append(o.Env, sink.Env()...)
	}
	c, err := caddyrun.Start(bin, parent, up, o)
	if err != nil {
		if sink != nil {
			sink.Close()
		}
		return nil, err
	}
	return &caddyTarget{Caddy: c, sink: sink}, nil
}

func (c *caddyTarget) name() string { return "caddy" }
func (c *caddyTarget) pid() int     { return c.PID() }
func (c *caddyTarget) close() {
	c.Close()
	if c.sink != nil {
		c.sink.Close()
	}
}

func (c *caddyTarget) makeJobs(ctx context.Context, n int) ([]job, error) { return c.MakeJobs(ctx, n) }

func (c *caddyTarget) profile(ctx context.Context, seconds int, path string) error {
	if profileAllocs {
		return c.Allocs(ctx, seconds, path)
	}
	return c.Profile(ctx, seconds, path)
}

// serverLines are lines for the global `servers` block of every Caddy (-caddy-servers).
var serverLines string

// profileAllocs makes -profile take an allocation profile instead of a CPU profile (-allocs).
var profileAllocs bool

func (c *caddyTarget) trace(ctx context.Context, seconds int, path string) error {
	return c.Trace(ctx, seconds, path)
}

var (
	buildCaddy    = caddyrun.Build
	moduleRoot    = caddyrun.ModuleRoot
	startUpstream = caddyrun.StartUpstream
	h2Transport   = caddyrun.H2Transport
)

var errNotSupported = errors.New("not supported")

// gcLines are Caddy's gctrace lines, for the GC cycles in a window.
func (c *caddyTarget) gcLines() []string { return c.GCLines() }
