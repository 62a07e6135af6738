package caddymodule

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/caddy-progress/progress/engine"
	"github.com/caddy-progress/progress/store"
)

func init() {
	caddy.RegisterModule(Admin{})
}

// Admin is the `admin.api.progress` module: read-only job views for operators on Caddy's
// admin endpoint (DESIGN.md: it owns no resources). It serves
//
//	GET /progress/jobs[?state=&limit=&cursor=]  job counts by state and a page of jobs
//	GET /progress/jobs/{id}                     one job
//
// It reads the store of the running config's progress app at request time, so it opens
// nothing itself and follows reloads.
type Admin struct{}

// CaddyModule returns the Caddy module information.
func (Admin) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "admin.api.progress", New: func() caddy.Module { return new(Admin) }}
}

// Routes returns the admin routes.
func (a *Admin) Routes() []caddy.AdminRoute {
	h := caddy.AdminHandlerFunc(a.serveHTTP)
	return []caddy.AdminRoute{{Pattern: "/progress/jobs", Handler: h}, {Pattern: "/progress/jobs/", Handler: h}}
}

// adminJob is a job as operators see it: the client's document plus what the server keeps
// to itself but an operator needs (never the owner value or a token: only whether there is an
// owner, and the trace the job's spans belong to).
type adminJob struct {
	*store.Job
	Route      string `json:"route"`
	OwnerBound bool   `json:"owner_bound"`
	TraceID    string `json:"trace_id,omitempty"`
}

func viewJob(st store.Store, j *store.Job) adminJob {
	v := adminJob{Job: j, Route: j.Route, OwnerBound: !j.OwnedBy(st.OwnerHash(""))}
	// traceparent is version-traceid-spanid-flags (W3C Trace Context).
	if parts := strings.Split(j.Attrs[engine.AttrTraceParent], "-"); len(parts) == 4 {
		v.TraceID = parts[1]
	}
	return v
}

func (a *Admin) serveHTTP(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", "GET")
		return writeAdminProblem(w, http.StatusMethodNotAllowed, "method-not-allowed", "Method not allowed", "the progress admin API is read-only; use GET")
	}
	st, err := runningStore()
	if err != nil {
		return writeAdminProblem(w, http.StatusNotFound, "no-progress-app", "No progress app", err.Error())
	}
	id := strings.TrimPrefix(strings.TrimPrefix(r.URL.Path, "/progress/jobs"), "/")
	if id != "" {
		job, err := st.Get(r.Context(), id)
		if errors.Is(err, store.ErrNotFound) {
			return writeAdminProblem(w, http.StatusNotFound, "job-not-found", "No such job", "no job "+strconv.Quote(id)+" in the store")
		}
		if err != nil {
			return writeAdminProblem(w, http.StatusServiceUnavailable, "store-unavailable", "Job store unavailable", err.Error())
		}
		return writeAdminJSON(w, viewJob(st, job))
	}
	q := r.URL.Query()
	query := store.ListQuery{State: store.State(q.Get("state")), Cursor: q.Get("cursor")}
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n <= 0 {
			return writeAdminProblem(w, http.StatusBadRequest, "bad-limit", "Malformed limit", "limit must be a whole number from 1 to 1000")
		}
		query.Limit = n
	}
	page, err := st.List(r.Context(), query)
	if errors.Is(err, store.ErrInvalid) {
		return writeAdminProblem(w, http.StatusBadRequest, "bad-query", "Malformed query", err.Error()+" (state is queued, running, succeeded, failed or canceled; cursor is the next of the previous page)")
	}
	if err != nil {
		return writeAdminProblem(w, http.StatusServiceUnavailable, "store-unavailable", "Job store unavailable", err.Error())
	}
	out := struct {
		Counts map[store.State]int `json:"counts,omitempty"`
		Jobs   []adminJob          `json:"jobs"`
		Next   string              `json:"next,omitempty"`
	}{Jobs: make([]adminJob, 0, len(page.Jobs)), Next: page.Next}
	for _, j := range page.Jobs {
		out.Jobs = append(out.Jobs, viewJob(st, j))
	}
	if insp, ok := st.(store.Inspector); ok {
		if out.Counts, err = insp.CountByState(r.Context()); err != nil {
			return writeAdminProblem(w, http.StatusServiceUnavailable, "store-unavailable", "Job store unavailable", err.Error())
		}
	}
	return writeAdminJSON(w, out)
}

// runningStore finds the store of the running config's progress app.
func runningStore() (store.Store, error) {
	v, err := caddy.ActiveContext().AppIfConfigured("progress")
	if err != nil {
		return nil, errors.New("the running config has no progress app (no progress handler or global option)")
	}
	app, ok := v.(*App)
	if !ok || app.shared == nil {
		return nil, errors.New("the progress app of the running config has no store")
	}
	return app.shared.store, nil
}

func writeAdminJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(v)
}

func writeAdminProblem(w http.ResponseWriter, status int, slug, title, detail string) error {
	engine.NewProblem(status, slug, title, detail).Write(w)
	return nil
}

var (
	_ caddy.AdminRouter = (*Admin)(nil)
)
