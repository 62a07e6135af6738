package engine

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/caddy-progress/progress/store"
	"github.com/caddy-progress/progress/upstreamhook"
)

// Mode says which matched requests become jobs.
type Mode int

const (
	// ModePrefer: only requests whose Prefer header asks for respond-async or wait; the rest
	// pass through untouched.
	ModePrefer Mode = iota
	// ModeAlways: every request, answered 202 at once.
	ModeAlways
	// ModeAfter: every request; the response passes through if it comes within After,
	// else 202.
	ModeAfter
)

// Route turns the requests of one `progress` handler into jobs.
type Route struct {
	Engine *Engine
	// Name identifies the route in job records, estimates and metrics.
	Name string
	Mode Mode
	// After is ModeAfter's wait.
	After time.Duration
	// JobsPath is where the job API lives, for Location and links.
	JobsPath string
	// MaxWait caps Prefer: wait.
	MaxWait time.Duration
	// Concurrency bounds the route's jobs at the upstream at once; 0 for no bound.
	Concurrency int
	// MaxQueue bounds how many jobs wait for a slot.
	MaxQueue int
	// Timeout bounds a job's upstream request.
	Timeout time.Duration
	// CallbackBase is the origin upstreams post progress to; "" sends no callback URL.
	CallbackBase string
	// MaxBody bounds a request body; bodies past SpoolAbove wait on disk, not in memory.
	MaxBody    int64
	SpoolAbove int64
	// SpoolDir holds spooled bodies; "" for the system's temporary folder.
	SpoolDir string
	// EstimateInterval is how often a running job that does not report may get an estimated
	// percent; 0 takes DefaultEstimateInterval, negative turns estimates off.
	EstimateInterval time.Duration
	// Done, when canceled (the configuration was replaced or the server stops), ends the
	// waits of clients that sent Prefer: wait: they get their 202 at once.
	Done context.Context

	queue   *queue
	metrics *routeMetrics // nil: metrics off
}

// Defaults of a route's limits.
const (
	DefaultMaxQueue   = 1000
	DefaultMaxBody    = 64 << 20
	DefaultSpoolAbove = 1 << 20
	DefaultMaxWait    = 60 * time.Second
	DefaultJobsPath   = "/_jobs"
)

// Init fills in defaults; call it once before Serve.
func (rt *Route) Init() {
	if rt.MaxQueue <= 0 {
		rt.MaxQueue = DefaultMaxQueue
	}
	if rt.MaxBody <= 0 {
		rt.MaxBody = DefaultMaxBody
	}
	if rt.SpoolAbove <= 0 {
		rt.SpoolAbove = DefaultSpoolAbove
	}
	if rt.Timeout <= 0 {
		rt.Timeout = defaultJobTimeout
	}
	if rt.MaxWait <= 0 {
		rt.MaxWait = DefaultMaxWait
	}
	if rt.JobsPath == "" {
		rt.JobsPath = DefaultJobsPath
	}
	if rt.Done == nil {
		rt.Done = context.Background()
	}
	if rt.EstimateInterval == 0 {
		rt.EstimateInterval = DefaultEstimateInterval
	}
	rt.queue = newQueue(rt.Concurrency, rt.MaxQueue)
	if rt.Engine != nil {
		rt.metrics = rt.Engine.Metrics().forRoute(rt.Name)
	}
}

// Owner is who a job is bound to: the value of the route's owner expression for this
// request, and the expression itself, which the job keeps so that the API can evaluate it for
// a reader.
type Owner struct {
	Value string
	Expr  string
}

// AttrOwnerExpr is the job attribute that keeps the owner expression.
const AttrOwnerExpr = "owner_expr"

// maxIdempotencyKey bounds an Idempotency-Key header.
const maxIdempotencyKey = 256

// Serve handles one matched request: it passes it to upstream untouched, or makes it a job.
func (rt *Route) Serve(w http.ResponseWriter, r *http.Request, owner Owner, upstream Upstream) error {
	prefs, err := ParsePrefer(r.Header)
	if err != nil {
		return problem(http.StatusBadRequest, "bad-prefer", "Malformed Prefer header", err.Error())
	}
	// Only the sidecar may speak for a job: a client's own Progress-* headers would have the
	// upstream post a job's real token to a URL the client chose.
	for _, name := range [...]string{upstreamhook.HeaderJobID, upstreamhook.HeaderCallback, upstreamhook.HeaderToken} {
		r.Header.Del(name)
	}
	wait, how := rt.decide(prefs)
	async := how != ""
	if !async {
		return upstream(w, r)
	}
	idemKey := r.Header.Get("Idempotency-Key")
	if len(idemKey) > maxIdempotencyKey {
		return problem(http.StatusBadRequest, "bad-idempotency-key", "Idempotency-Key too long",
			fmt.Sprintf("the key has %d bytes; at most %d are accepted", len(idemKey), maxIdempotencyKey))
	}
	body, err := spoolBody(r.Body, rt.MaxBody, rt.SpoolAbove, rt.SpoolDir)
	if err != nil {
		return err
	}
	handedOver := false
	defer func() {
		if !handedOver {
			body.Close()
		}
	}()
	ticket, err := rt.queue.reserve()
	if err != nil {
		p := problem(http.StatusServiceUnavailable, "queue-full", "Too many jobs waiting",
			fmt.Sprintf("this route runs %d jobs at once and %d are already waiting; try again later", rt.Concurrency, rt.MaxQueue))
		p.RetryAfter = 5
		return p
	}
	spec := store.NewJob{
		Owner:          owner.Value,
		IdempotencyKey: idemKey,
		Request:        store.RequestInfo{Method: r.Method, URI: r.RequestURI},
		Route:          rt.Name,
		BasePath:       rt.JobsPath,
		QueuePosition:  ticket.Position(),
		Running:        ticket.Position() == 0, // nothing ahead of it: it starts at once
	}
	if idemKey != "" {
		// Only a repeated key is compared with what it was first used for.
		spec.Fingerprint = fingerprint(r, body.hash)
	}
	if owner.Expr != "" {
		spec.Attrs = map[string]string{AttrOwnerExpr: owner.Expr}
	}
	jt := rt.Engine.startJobTrace(r, rt.Name, how)
	if jt != nil {
		if spec.Attrs == nil {
			spec.Attrs = make(map[string]string, 1)
		}
		spec.Attrs[AttrTraceParent] = jt.traceParent()
	}
	st := rt.Engine.Store
	doc, created, err := st.Create(r.Context(), spec)
	if err != nil || !created {
		ticket.release()
	}
	if err != nil {
		jt.failed(err)
	} else {
		jt.created(doc, !created)
	}
	switch {
	case errors.Is(err, store.ErrIdempotencyMismatch):
		return problem(http.StatusUnprocessableEntity, "idempotency-key-reused", "Idempotency-Key already used",
			"this Idempotency-Key was used for a request with another method, URI or body; use a new key for a new request")
	case errors.Is(err, store.ErrTooLarge):
		return problem(http.StatusRequestURITooLong, "job-too-large", "Request too large to track", err.Error())
	case err != nil:
		return storeProblem(err)
	case !created:
		writeAccepted(w, doc, prefs.RespondAsync, rt.JobsPath)
		return nil
	}

	result, err := st.NewResult(r.Context(), doc.ID)
	if err != nil {
		return storeProblem(err)
	}
	var client http.ResponseWriter
	if wait > 0 {
		client = w
	}
	j := &job{
		id: doc.ID, route: rt, ticket: ticket, body: body, upstream: upstream, running: doc.State == store.Running,
		capture: newCapture(result, client), done: make(chan struct{}), created: doc.CreatedAt, trace: jt,
	}
	j.started = j.running
	ctx, cancelJob := context.WithCancelCause(context.WithoutCancel(r.Context()))
	ctx, cancelTimer := context.WithTimeoutCause(ctx, rt.Timeout, context.DeadlineExceeded)
	cancel := func(cause error) {
		cancelJob(cause)
		cancelTimer()
	}
	j.request = rt.upstreamRequest(r, ctx, doc.ID, body)
	rt.metrics.jobCreated(how, j.running)
	rt.Engine.logCreated(doc, how)
	if !rt.Engine.start(j, ctx, cancel) {
		cancel(errShutdown)
		ticket.release()
		result.Discard()
		rt.metrics.jobLeft(j.running)
		final, _ := st.Finish(context.WithoutCancel(r.Context()), doc.ID, store.Outcome{State: store.Failed,
			Error: &store.JobError{Code: store.CodeInterrupted, Message: "the server was shutting down"}})
		rt.Engine.ended(final)
		jt.end(final)
		return problem(http.StatusServiceUnavailable, "shutting-down", "Server shutting down", "try again in a moment")
	}
	handedOver = true
	if wait == 0 {
		writeAccepted(w, doc, prefs.RespondAsync, rt.JobsPath)
		return nil
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case <-j.capture.headSent:
		<-j.done // the response passes through; it is ours to finish
		if j.capture.broken {
			panic(http.ErrAbortHandler) // cut the client's exchange: its body is incomplete
		}
		return nil
	case <-timer.C:
	case <-r.Context().Done():
	case <-rt.Done.Done(): // a stopping server must not wait for the upstream
	}
	if !j.capture.release() {
		<-j.done
		if j.capture.broken {
			panic(http.ErrAbortHandler)
		}
		return nil
	}
	if r.Context().Err() != nil {
		return nil // the client left; the job goes on
	}
	if cur, err := st.Get(r.Context(), doc.ID); err == nil {
		doc = cur
	}
	writeAccepted(w, doc, true, rt.JobsPath)
	return nil
}

// decide says whether a request becomes a job, and why (one of the How* values; "" for no),
// and how long its client waits for the response.
func (rt *Route) decide(p Preferences) (wait time.Duration, how string) {
	switch {
	case p.HasWait:
		wait, how = p.Wait, HowWait
	case p.RespondAsync:
		wait, how = 0, HowRespondAsync
	case rt.Mode == ModeAlways:
		wait, how = 0, HowAlways
	case rt.Mode == ModeAfter:
		wait, how = rt.After, HowAfter
	default:
		return 0, ""
	}
	return min(wait, rt.MaxWait), how
}

// upstreamRequest is the request the job sends on: the client's, on the job's detached
// context, with the spooled body and the three progress headers.
func (rt *Route) upstreamRequest(r *http.Request, ctx context.Context, id string, body *spooledBody) *http.Request {
	up := r.Clone(ctx)
	up.Body = body.reader()
	up.ContentLength = body.size
	up.GetBody = func() (io.ReadCloser, error) { return body.reader(), nil }
	if body.size == 0 {
		up.Body, up.GetBody = http.NoBody, nil
	}
	up.Header.Del("Prefer") // handled here; the upstream must not answer 202 itself
	up.Header.Set(upstreamhook.HeaderJobID, id)
	up.Header.Set(upstreamhook.HeaderToken, rt.Engine.Token(id))
	if rt.CallbackBase != "" {
		up.Header.Set(upstreamhook.HeaderCallback, rt.CallbackBase+rt.JobsPath+"/"+id+"/progress")
	}
	return up
}

// fingerprint identifies a request for Idempotency-Key: method, URI and body.
func fingerprint(r *http.Request, bodyHash []byte) []byte {
	h := sha256.New()
	for _, s := range []string{r.Method, r.RequestURI} {
		binary.Write(h, binary.BigEndian, uint32(len(s)))
		h.Write([]byte(s))
	}
	h.Write(bodyHash)
	return h.Sum(nil)
}

// writeAccepted answers 202 with the job document (RFC 7240 section 4.1; DESIGN.md section 3).
func writeAccepted(w http.ResponseWriter, doc *store.Job, applied bool, jobsPath string) {
	h := w.Header()
	h.Set("Location", doc.Links.Self)
	h.Set("Retry-After", strconv.Itoa(retryAfter(doc)))
	if applied {
		h.Set("Preference-Applied", "respond-async")
	}
	h.Set("Link", "<"+doc.Links.Events+`>; rel="monitor"`)
	writeJSON(w, http.StatusAccepted, doc)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		problem(http.StatusInternalServerError, "internal", "Could not encode the document", err.Error()).Write(w)
		return
	}
	writeJSONBytes(w, status, b)
}

func writeJSONBytes(w http.ResponseWriter, status int, b []byte) {
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(len(b)+1))
	w.WriteHeader(status)
	w.Write(b)
	w.Write([]byte{'\n'})
}

// storeProblem turns a store failure into a problem a client can act on.
func storeProblem(err error) *Problem {
	switch {
	case errors.Is(err, store.ErrNotFound):
		return notFound()
	case errors.Is(err, store.ErrClosed):
		p := problem(http.StatusServiceUnavailable, "store-unavailable", "Job store unavailable", "the server is restarting or reloading; try again in a moment")
		p.RetryAfter = 1
		return p
	}
	p := problem(http.StatusServiceUnavailable, "store-unavailable", "Job store unavailable", "the job store could not record the request: "+err.Error())
	p.RetryAfter = 5
	return p
}

func notFound() *Problem {
	return problem(http.StatusNotFound, "job-not-found", "No such job", "the job does not exist, has expired, or belongs to someone else")
}

// spooledBody is a request body read in full before the job starts (the client may leave at
// once), in memory up to a size, then in a temporary file.
type spooledBody struct {
	mem  []byte
	file *os.File
	size int64
	hash []byte
}

// spoolBuffers are spoolBody's read buffers: one per request would be most of what a job's
// creation allocates.
var spoolBuffers = sync.Pool{New: func() any { return new([32 << 10]byte) }}

func spoolBody(r io.Reader, max, spoolAbove int64, dir string) (*spooledBody, error) {
	b := &spooledBody{}
	h := sha256.New()
	if r == nil {
		r = http.NoBody
	}
	limited := io.LimitReader(r, max+1)
	pooled := spoolBuffers.Get().(*[32 << 10]byte)
	defer spoolBuffers.Put(pooled)
	buf := pooled[:]
	for {
		n, err := limited.Read(buf)
		if n > 0 {
			b.size += int64(n)
			if b.size > max {
				b.Close()
				return nil, problem(http.StatusRequestEntityTooLarge, "body-too-large", "Request body too large",
					fmt.Sprintf("a job's request body may have at most %d bytes (option max_request_body)", max))
			}
			h.Write(buf[:n])
			if b.file == nil && b.size > spoolAbove {
				f, ferr := os.CreateTemp(dir, "caddy-progress-body-*")
				if ferr != nil {
					return nil, problem(http.StatusInsufficientStorage, "spool-failed", "Could not keep the request body", ferr.Error())
				}
				os.Remove(f.Name()) // unlinked: the file goes when it is closed, even after a crash
				b.file = f
				if _, err := f.Write(b.mem); err != nil {
					b.Close()
					return nil, problem(http.StatusInsufficientStorage, "spool-failed", "Could not keep the request body", err.Error())
				}
				b.mem = nil
			}
			if b.file != nil {
				if _, err := b.file.Write(buf[:n]); err != nil {
					b.Close()
					return nil, problem(http.StatusInsufficientStorage, "spool-failed", "Could not keep the request body", err.Error())
				}
			} else {
				b.mem = append(b.mem, buf[:n]...)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			b.Close()
			return nil, problem(http.StatusBadRequest, "body-unreadable", "Request body could not be read", err.Error())
		}
	}
	b.hash = h.Sum(nil)
	return b, nil
}

// reader returns a fresh reader over the body (the upstream may retry).
func (b *spooledBody) reader() io.ReadCloser {
	if b.file != nil {
		return io.NopCloser(io.NewSectionReader(b.file, 0, b.size))
	}
	return io.NopCloser(bytes.NewReader(b.mem))
}

func (b *spooledBody) Close() error {
	if b.file != nil {
		return b.file.Close()
	}
	return nil
}
