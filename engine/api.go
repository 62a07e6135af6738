package engine

import (
	"context"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/upstreamhook"
)

// API serves the job endpoints under JobsPath (DESIGN.md section 3).
type API struct {
	Engine   *Engine
	JobsPath string
	// MaxWait caps long-poll waits; Heartbeat is the SSE comment interval.
	MaxWait   time.Duration
	Heartbeat time.Duration
	// WriteTimeout bounds one write to an event stream: a subscriber that stops reading is
	// dropped after between one and 1.5 times it (see sseWriter).
	WriteTimeout time.Duration
	// CallbackLimits bound upstream progress reports.
	CallbackLimits upstreamhook.Limits
	// OwnerOf evaluates a job's owner expression for the request reading it.
	OwnerOf func(r *http.Request, expr string) string
	// Done ends every event stream when it is canceled (the configuration was replaced or the
	// server stops); clients resume with Last-Event-ID.
	Done context.Context

	frames sharedFrames // each live event encoded once for all its streams
}

// Defaults of the API.
const (
	DefaultHeartbeat    = 15 * time.Second
	DefaultWriteTimeout = 30 * time.Second
	sseRetryMillis      = 2000
)

// Init fills in defaults; call it once before ServeHTTP.
func (a *API) Init() {
	if a.JobsPath == "" {
		a.JobsPath = DefaultJobsPath
	}
	if a.MaxWait <= 0 {
		a.MaxWait = DefaultMaxWait
	}
	if a.Heartbeat <= 0 {
		a.Heartbeat = DefaultHeartbeat
	}
	if a.WriteTimeout <= 0 {
		a.WriteTimeout = DefaultWriteTimeout
	}
	if a.OwnerOf == nil {
		a.OwnerOf = func(*http.Request, string) string { return "" }
	}
	if a.Done == nil {
		a.Done = context.Background()
	}
}

// Handles reports whether the request's path is the API's.
func (a *API) Handles(r *http.Request) bool {
	return strings.HasPrefix(r.URL.Path, a.JobsPath+"/")
}

// ServeHTTP serves one API request; errors come back as a *Problem.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, a.JobsPath+"/")
	id, action, _ := strings.Cut(rest, "/")
	if strings.Contains(action, "/") || id == "" {
		return notFound()
	}
	if action == "progress" {
		return a.callback(w, r, id)
	}
	allowed := allowedMethods(action)
	if allowed == "" {
		return notFound()
	}
	if !strings.Contains(allowed, r.Method) {
		w.Header().Set("Allow", allowed)
		return problem(http.StatusMethodNotAllowed, "method-not-allowed", "Method not allowed",
			r.Method+" is not served here; use "+allowed)
	}
	job, err := a.load(r, id)
	if err != nil {
		return err
	}
	switch {
	case action == "" && r.Method == http.MethodDelete:
		return a.delete(w, r, job)
	case action == "":
		return a.status(w, r, job)
	case action == "events":
		return a.events(w, r, job)
	case action == "result":
		return a.result(w, r, job)
	default:
		return a.cancel(w, r, job)
	}
}

// allowedMethods is the Allow header of a job resource ("" for none). A switch, not a map
// literal: this runs for every request, and a map literal is built anew each time.
func allowedMethods(action string) string {
	switch action {
	case "":
		return "GET, HEAD, DELETE"
	case "events":
		return "GET"
	case "result":
		return "GET, HEAD"
	case "cancel":
		return "POST"
	}
	return ""
}

// load reads a job and checks that the reader is its owner. Someone else's job and a job that
// does not exist answer the same 404, after the same work.
func (a *API) load(r *http.Request, id string) (*store.Job, error) {
	st := a.Engine.Store
	job, err := st.Get(r.Context(), id)
	expr := ""
	if job != nil && job.Attrs != nil {
		expr = job.Attrs[AttrOwnerExpr]
	}
	mine := st.OwnerHash(a.OwnerOf(r, expr))
	if err != nil {
		return nil, storeProblem(err)
	}
	if !job.OwnedBy(mine) {
		return nil, notFound()
	}
	return job, nil
}

// waitFor reads how long a request asks to wait: ?wait=30s (or =30), or Prefer: wait=N.
func (a *API) waitFor(r *http.Request) (time.Duration, error) {
	if q := r.URL.Query().Get("wait"); q != "" {
		d, err := parseWait(q)
		if err != nil {
			return 0, problem(http.StatusBadRequest, "bad-wait", "Malformed wait parameter", err.Error())
		}
		return min(d, a.MaxWait), nil
	}
	prefs, err := ParsePrefer(r.Header)
	if err != nil {
		return 0, problem(http.StatusBadRequest, "bad-prefer", "Malformed Prefer header", err.Error())
	}
	return min(prefs.Wait, a.MaxWait), nil
}

func parseWait(q string) (time.Duration, error) {
	if len(q) > 32 {
		return 0, errors.New("wait is too long to be a duration")
	}
	if secs, err := strconv.ParseUint(q, 10, 32); err == nil {
		return time.Duration(secs) * time.Second, nil
	}
	d, err := time.ParseDuration(q)
	if err != nil || d < 0 {
		return 0, errors.New(`wait must be a number of seconds or a duration such as "30s"`)
	}
	return d, nil
}

// seenSeq reads the seq a long-poll client has seen: ?after=N or If-None-Match: "N".
func seenSeq(r *http.Request) (uint64, bool, error) {
	if q := r.URL.Query().Get("after"); q != "" {
		n, err := parseSeq(q)
		if err != nil {
			return 0, false, problem(http.StatusBadRequest, "bad-after", "Malformed after parameter", "after must be a job seq, a whole number")
		}
		return n, true, nil
	}
	inm := r.Header.Get("If-None-Match")
	if inm == "" {
		return 0, false, nil
	}
	if len(inm) > 64 {
		return 0, false, problem(http.StatusBadRequest, "bad-if-none-match", "Malformed If-None-Match", "an ETag of a job is a quoted seq, such as \"7\"")
	}
	// The newest of the listed ETags counts; weak ones compare the same (RFC 9110 13.1.2).
	var best uint64
	found := false
	for _, tag := range strings.Split(inm, ",") {
		tag = strings.TrimPrefix(strings.TrimSpace(tag), "W/")
		if n, err := parseSeq(strings.Trim(tag, `"`)); err == nil && len(tag) >= 2 && tag[0] == '"' {
			best, found = max(best, n), true
		}
	}
	return best, found, nil
}

func parseSeq(s string) (uint64, error) {
	if len(s) == 0 || len(s) > 20 {
		return 0, errors.New("bad seq")
	}
	return strconv.ParseUint(s, 10, 64)
}

func etag(seq uint64) string { return `"` + strconv.FormatUint(seq, 10) + `"` }

func (a *API) status(w http.ResponseWriter, r *http.Request, job *store.Job) error {
	w.Header().Set("Vary", "Accept")
	if wantsHTML(r.Header.Get("Accept")) {
		return a.page(w, job)
	}
	seen, hasSeen, err := seenSeq(r)
	if err != nil {
		return err
	}
	wait, err := a.waitFor(r)
	if err != nil {
		return err
	}
	h := w.Header()
	if hasSeen && wait > 0 && job.Seq <= seen {
		ctx, cancel := context.WithTimeout(r.Context(), wait)
		defer cancel()
		defer context.AfterFunc(a.Done, cancel)() // a stopping server must not wait for us
		m := a.Engine.Metrics()
		left := m.subscribed(SubscriberLongPoll)
		span := a.Engine.startRequestSpan(r, "progress long-poll", job.ID, job)
		ev, err := a.Engine.Store.Wait(ctx, job.ID, seen)
		left()
		if span != nil {
			if err == nil {
				span.SetAttributes(attrDelivered.Int(1))
			} else {
				span.SetAttributes(attrDelivered.Int(0))
			}
			span.End()
		}
		switch {
		case err == nil:
			m.delivered(SubscriberLongPoll, ev)
			h.Set("ETag", etag(ev.Seq))
			if !ev.Done() {
				h.Set("Retry-After", "1")
			}
			writeJSONBytes(w, http.StatusOK, ev.Data)
			return nil
		case (errors.Is(err, context.DeadlineExceeded) || a.Done.Err() != nil) && r.Context().Err() == nil:
			// Served in full, also on a finished job, so a careless loop cannot spin; or cut
			// short because this configuration stops (reload, shutdown): the client asks again.
		case r.Context().Err() != nil:
			return nil // the client left
		default:
			return storeProblem(err)
		}
		if cur, err := a.Engine.Store.Get(r.Context(), job.ID); err == nil {
			job = cur
		}
	}
	h.Set("ETag", etag(job.Seq))
	h.Set("Cache-Control", "no-store")
	if !job.State.Terminal() {
		h.Set("Retry-After", strconv.Itoa(retryAfter(job)))
	}
	if hasSeen && job.Seq <= seen {
		w.WriteHeader(http.StatusNotModified)
		return nil
	}
	writeJSON(w, http.StatusOK, job)
	return nil
}

func (a *API) result(w http.ResponseWriter, r *http.Request, job *store.Job) error {
	if !job.State.Terminal() {
		wait, err := a.waitFor(r)
		if err != nil {
			return err
		}
		if wait > 0 {
			ctx, cancel := context.WithTimeout(r.Context(), wait)
			defer cancel()
			defer context.AfterFunc(a.Done, cancel)() // a stopping server must not wait for us
			for !job.State.Terminal() {
				ev, err := a.Engine.Store.Wait(ctx, job.ID, job.Seq)
				if err != nil {
					break
				}
				if ev.Done() {
					if cur, err := a.Engine.Store.Get(r.Context(), job.ID); err == nil {
						job = cur
					}
					break
				}
				job.Seq = ev.Seq
			}
			if r.Context().Err() != nil {
				return nil
			}
		}
		if !job.State.Terminal() {
			if cur, err := a.Engine.Store.Get(r.Context(), job.ID); err == nil {
				job = cur
			}
			w.Header().Set("Location", job.Links.Self)
			w.Header().Set("Retry-After", strconv.Itoa(retryAfter(job)))
			writeJSON(w, http.StatusAccepted, job)
			return nil
		}
	}
	res, err := a.Engine.Store.Result(r.Context(), job.ID)
	if errors.Is(err, store.ErrNoResult) {
		return endedWithoutResponse(job)
	}
	if err != nil {
		return storeProblem(err)
	}
	defer res.Body.Close()
	h := w.Header()
	for k, v := range res.Header {
		if !hopByHop(k) {
			h[k] = v
		}
	}
	h.Set("Content-Length", strconv.FormatInt(res.Size, 10))
	w.WriteHeader(res.Status)
	if r.Method != http.MethodHead {
		io.Copy(w, res.Body)
	}
	return nil
}

// endedWithoutResponse explains a finished job that has no upstream response to replay.
func endedWithoutResponse(job *store.Job) *Problem {
	if job.State == store.Canceled {
		return problem(http.StatusConflict, "job-canceled", "Job canceled", "the job was canceled before the upstream answered")
	}
	code, msg := "failed", "the job failed without an upstream response"
	if job.Error != nil {
		code, msg = job.Error.Code, job.Error.Message
	}
	status := http.StatusBadGateway
	switch code {
	case "upstream_timeout":
		status = http.StatusGatewayTimeout
	case store.CodeInterrupted:
		status = http.StatusServiceUnavailable
	}
	return problem(status, "job-failed", "Job failed: "+code, msg)
}

var hopByHopHeaders = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true, "Proxy-Authorization": true,
	"Proxy-Connection": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
}

func hopByHop(name string) bool { return hopByHopHeaders[http.CanonicalHeaderKey(name)] }

func (a *API) cancel(w http.ResponseWriter, r *http.Request, job *store.Job) error {
	doc, err := a.Engine.Cancel(r.Context(), job.ID)
	if err != nil {
		return storeProblem(err)
	}
	w.Header().Set("ETag", etag(doc.Seq))
	writeJSON(w, http.StatusOK, doc)
	return nil
}

func (a *API) delete(w http.ResponseWriter, r *http.Request, job *store.Job) error {
	if _, err := a.Engine.Cancel(r.Context(), job.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		return storeProblem(err)
	}
	if err := a.Engine.Store.Delete(r.Context(), job.ID); err != nil && !errors.Is(err, store.ErrNotFound) {
		return storeProblem(err)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
