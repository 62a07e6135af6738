package caddymodule

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/caddy-progress/progress/engine"
)

func init() {
	caddy.RegisterModule(Handler{})
	caddy.RegisterModule(APIHandler{})
}

// Handler is the `progress` handler: matched requests may become jobs, which run against the
// next handler (reverse_proxy, php_fastcgi, …) detached from the client.
type Handler struct {
	// Async is which requests become jobs: "prefer" (default; only those whose Prefer header
	// asks for respond-async or wait), "always" (every request, 202 at once) or "after" (every
	// request; the response passes through if it comes within After, else 202).
	Async string `json:"async,omitempty"`
	// After is the wait of async "after".
	After caddy.Duration `json:"after,omitempty"`
	// Concurrency bounds this route's jobs at the upstream at once; the rest queue. Default 0:
	// no bound.
	Concurrency int `json:"concurrency,omitempty"`
	// MaxQueue bounds how many jobs wait for a slot; past it new jobs get 503. Default 1000.
	MaxQueue int `json:"max_queue,omitempty"`
	// Timeout bounds a job's upstream request. Default 1h.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// CallbackBase is the origin the upstream posts progress to, as in http://127.0.0.1:2080;
	// the Progress-Callback header is this plus the job's progress path. Default: none.
	CallbackBase string `json:"callback_base,omitempty"`
	// Owner, a placeholder expression such as {http.request.header.Authorization}, binds each
	// job to the caller; only a request with the same value can see it. Default: none.
	Owner string `json:"owner,omitempty"`
	// MaxRequestBody bounds a job's request body. Default 64 MiB.
	MaxRequestBody int64 `json:"max_request_body,omitempty"`
	// SpoolAbove is the body size past which a request body waits on disk. Default 1 MiB.
	SpoolAbove int64 `json:"spool_above,omitempty"`
	// EstimateInterval is how often a running job whose upstream does not report gets an
	// estimated percent and ETA, from the run times of this route's earlier jobs. Default 1s;
	// negative turns estimates off.
	EstimateInterval caddy.Duration `json:"estimate_interval,omitempty"`
	// Name groups this route's jobs for estimates (with the request method). The Caddyfile
	// sets it to the matcher token. Default: none, which all unnamed routes share.
	Name string `json:"name,omitempty"`

	route *engine.Route
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.progress", New: func() caddy.Module { return new(Handler) }}
}

// Provision sets the route up on the shared engine.
func (h *Handler) Provision(ctx caddy.Context) error {
	app, err := appFrom(ctx)
	if err != nil {
		return err
	}
	mode := engine.ModePrefer
	switch h.Async {
	case "", "prefer":
	case "always":
		mode = engine.ModeAlways
	case "after":
		mode = engine.ModeAfter
	}
	h.route = &engine.Route{
		Engine: app.shared.engine, Mode: mode, After: time.Duration(h.After),
		JobsPath: app.JobsPath, MaxWait: time.Duration(app.MaxWait), Concurrency: h.Concurrency,
		MaxQueue: h.MaxQueue, Timeout: time.Duration(h.Timeout), CallbackBase: strings.TrimSuffix(h.CallbackBase, "/"),
		MaxBody: h.MaxRequestBody, SpoolAbove: h.SpoolAbove, Done: app.done,
		EstimateInterval: time.Duration(h.EstimateInterval), Name: h.Name,
	}
	h.route.Init()
	return nil
}

// Validate checks the options.
func (h *Handler) Validate() error {
	switch h.Async {
	case "", "prefer", "always":
		if h.After != 0 {
			return errors.New("progress: after is only for async after")
		}
	case "after":
		if h.After <= 0 {
			return errors.New("progress: async after needs a positive duration, as in `async after 5s`")
		}
	default:
		return fmt.Errorf("progress: async %q: want prefer, always or after <duration>", h.Async)
	}
	if h.Concurrency < 0 || h.MaxQueue < 0 || h.Timeout < 0 || h.MaxRequestBody < 0 || h.SpoolAbove < 0 {
		return errors.New("progress: limits must not be negative")
	}
	if h.CallbackBase != "" {
		u, err := url.Parse(h.CallbackBase)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
			return fmt.Errorf("progress: callback_base %q must be an origin such as http://127.0.0.1:2080", h.CallbackBase)
		}
	}
	return nil
}

// ServeHTTP passes the request on untouched, or makes it a job.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	owner := engine.Owner{Expr: h.Owner, Value: ownerOf(r, h.Owner)}
	err := h.route.Serve(w, r, owner, func(uw http.ResponseWriter, ur *http.Request) error {
		if ur == r {
			return next.ServeHTTP(uw, ur) // not a job: the legacy behaviour, untouched
		}
		return next.ServeHTTP(uw, detach(ur, r, uw))
	})
	return writeProblem(w, err)
}

// detach gives a job's request a replacer and variables of its own: the client's request
// finishes (and Caddy logs it) while the job's handlers still run, and the two must not share
// mutable state.
func detach(job, client *http.Request, w http.ResponseWriter) *http.Request {
	server, _ := client.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	vars, _ := client.Context().Value(caddyhttp.VarsCtxKey).(map[string]any)
	job = caddyhttp.PrepareRequest(job, caddy.NewReplacer(), w, server)
	if fresh, ok := job.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		for k, v := range vars {
			if _, set := fresh[k]; !set {
				fresh[k] = v
			}
		}
	}
	return job
}

// APIHandler is the `progress_api` handler: it serves the job API under the app's jobs_path
// and passes every other request to the next handler.
type APIHandler struct {
	api *engine.API
}

// CaddyModule returns the Caddy module information.
func (APIHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.progress_api", New: func() caddy.Module { return new(APIHandler) }}
}

// Provision connects the API to the shared engine.
func (h *APIHandler) Provision(ctx caddy.Context) error {
	app, err := appFrom(ctx)
	if err != nil {
		return err
	}
	h.api = app.api()
	return nil
}

// ServeHTTP serves paths under jobs_path and passes the rest on.
func (h *APIHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if !h.api.Handles(r) {
		return next.ServeHTTP(w, r)
	}
	return writeProblem(w, h.api.ServeHTTP(w, r))
}

// writeProblem answers a problem as its problem+json document; other errors go to Caddy.
func writeProblem(w http.ResponseWriter, err error) error {
	var p *engine.Problem
	if errors.As(err, &p) {
		p.Write(w)
		return nil
	}
	return err
}

var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddy.Provisioner           = (*APIHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*APIHandler)(nil)
)
