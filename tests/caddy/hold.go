package main

import (
	"io"
	"net/http"
	"sync"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// benchHold is the floor of the idle benchmark (tests/bench -scenario idle): a Caddy handler
// that, like the bare net/http server there, only holds an event stream open. A GET gets the
// headers, one comment and one event (as a new subscriber of the plugin gets the job's current
// document), flushed once, and then waits; a POST sends one more event on every stream held.
// Measured beside the plugin, it tells Caddy's own cost per stream from the plugin's. It is
// registered only in this test build, never in the plugin.
type benchHold struct{}

var (
	holdMu   sync.Mutex
	holdFire = make(chan struct{})
)

func init() {
	caddy.RegisterModule(benchHold{})
	httpcaddyfile.RegisterHandlerDirective("bench_hold", func(httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		return benchHold{}, nil
	})
}

func (benchHold) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.bench_hold", New: func() caddy.Module { return benchHold{} }}
}

func (benchHold) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	if r.Method == http.MethodPost {
		holdMu.Lock()
		close(holdFire)
		holdFire = make(chan struct{})
		holdMu.Unlock()
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	holdMu.Lock()
	fire := holdFire
	holdMu.Unlock()
	w.Header().Set("Content-Type", "text/event-stream")
	w.WriteHeader(http.StatusOK)
	io.WriteString(w, ": stream open\n\nid: 1\nevent: progress\ndata: {\"percent\":0}\n\n")
	http.NewResponseController(w).Flush()
	select {
	case <-fire:
		io.WriteString(w, "id: 2\nevent: progress\ndata: {\"percent\":50}\n\n")
		http.NewResponseController(w).Flush()
	case <-r.Context().Done():
		return nil
	}
	<-r.Context().Done()
	return nil
}

var _ caddyhttp.MiddlewareHandler = benchHold{}
