package upstreamhook

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net/http"
	"net/url"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults and fixed bounds of the client.
const (
	defaultFlushTimeout = 5 * time.Second
	defaultMinInterval  = 200 * time.Millisecond

	// attemptTimeout bounds one callback, whatever the http.Client says: a sidecar that
	// accepts the connection and never answers must not hold the last update forever.
	attemptTimeout = 10 * time.Second

	// Transient failures are retried after firstBackoff, doubling up to maxBackoff, each wait
	// drawn from the upper half of its step so that the waits grow strictly until the cap yet
	// reporters that failed together do not retry together.
	firstBackoff = 100 * time.Millisecond
	maxBackoff   = 2 * time.Second

	// retryFor is how long one run of transient failures may last before the update being
	// retried is dropped, so that a reporter nobody closes does not retry forever.
	retryFor = time.Minute
)

// Options configure the reporters of Options.Middleware and NewReporter. The zero value is
// ready to use.
type Options struct {
	// Client sends the callbacks. Default: a client on http.DefaultTransport. Redirects are
	// not followed, whatever the client says (a redirected POST becomes a GET without a body,
	// and the callback URL is exact), and each callback is bounded by 10 s even if the client
	// has no Timeout.
	Client *http.Client

	// FlushTimeout bounds the final flush Middleware does when the handler returns.
	// Default: 5 s.
	FlushTimeout time.Duration

	// MinInterval is the least time between the starts of two callbacks of one reporter;
	// updates reported in between replace each other and only the last is sent.
	// Default: 200 ms. A negative value sends as fast as the sidecar answers.
	MinInterval time.Duration

	// Logf receives one line when an update is lost (malformed, refused, undeliverable) or a
	// reporter stops for good; never the token. It must be safe for concurrent use.
	// Default: log.Printf.
	Logf func(format string, args ...any)
}

// config is Options with the defaults filled in and the client made safe to use.
type config struct {
	client       *http.Client
	flushTimeout time.Duration
	minInterval  time.Duration
	logf         func(format string, args ...any)
}

func noRedirects(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }

var defaultClient = &http.Client{CheckRedirect: noRedirects}

func (o Options) config() config {
	c := config{client: defaultClient, flushTimeout: o.FlushTimeout, minInterval: o.MinInterval, logf: o.Logf}
	if o.Client != nil {
		// A copy, so that the caller's client keeps following redirects elsewhere.
		cl := *o.Client
		cl.CheckRedirect = noRedirects
		c.client = &cl
	}
	if c.flushTimeout <= 0 {
		c.flushTimeout = defaultFlushTimeout
	}
	if c.minInterval == 0 {
		c.minInterval = defaultMinInterval
	}
	if c.logf == nil {
		c.logf = log.Printf
	}
	return c
}

// A Reporter sends one job's progress to the sidecar. Its methods are safe for concurrent use,
// and only Close waits on the network. A Reporter that did not come from a request through
// the sidecar is a no-op: every method returns at once and Active is false.
type Reporter struct {
	url, token, jobID string // url is "" for the no-op reporter
	config

	// stopped is set once the reporter is closed or has given up, so that Report drops an
	// update without encoding it or taking the lock.
	stopped atomic.Bool

	// ctx is cancelled when Close stops waiting for the final flush: it aborts the callback
	// in flight and any wait between callbacks.
	ctx    context.Context
	cancel context.CancelFunc
	// closing is closed by Close: the pending update is sent without waiting out MinInterval.
	closing chan struct{}

	mu       sync.Mutex
	pending  []byte        // the latest update not yet taken for sending, encoded; nil if none
	running  bool          // a goroutine is sending; it exits when pending is nil
	done     chan struct{} // closed when that goroutine has exited
	closed   bool          // Close was called
	gone     bool          // the sidecar refused the reporter (job gone, finished, wrong token)
	nextSend time.Time     // no callback starts earlier (MinInterval, backoff)
	err      error         // why the last update taken for sending did not arrive; nil if it did
}

// noop is the reporter of requests that did not come through the sidecar.
var noop = &Reporter{}

func (r *Reporter) inert() bool { return r == nil || r.url == "" }

// NewReporter returns a reporter that sends to callbackURL with token: the values of the
// Progress-Callback and Progress-Token headers of the request that started the job, for code
// that is not an http.Handler (a worker the request was handed to, say). Call Close when the
// work is done. If callbackURL is not an absolute http or https URL or token is empty, the
// reporter is a no-op. Its JobID is read from the callback URL (…/<id>/progress).
func NewReporter(callbackURL, token string, o Options) *Reporter {
	c := o.config()
	r := c.reporter(callbackURL, token, "")
	if r.inert() && callbackURL != "" {
		c.logf("upstreamhook: not reporting progress: callback %q or its token is unusable", callbackURL)
	}
	return r
}

func (c config) reporter(callbackURL, token, jobID string) *Reporter {
	u, err := url.Parse(callbackURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || !validToken(token) {
		return noop
	}
	if jobID == "" {
		// DESIGN.md section 4: <callback_base><jobs_path>/<id>/progress
		if dir, last := path.Split(u.Path); last == "progress" {
			if id := path.Base(dir); id != "/" && id != "." {
				jobID = id
			}
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	return &Reporter{
		url: callbackURL, token: token, jobID: jobID, config: c,
		ctx: ctx, cancel: cancel, closing: make(chan struct{}),
	}
}

// validToken accepts what can follow "Bearer " in a header (RFC 6750 section 2.1, loosely):
// a token with a space or control character would fail every callback as a transport error,
// which would look transient.
func validToken(t string) bool {
	for i := range len(t) {
		if t[i] <= ' ' || t[i] >= 0x7f {
			return false
		}
	}
	return t != ""
}

type contextKey struct{}

// FromContext returns the reporter Middleware put in ctx, or a no-op reporter. It never
// returns nil.
func FromContext(ctx context.Context) *Reporter {
	if ctx != nil {
		if r, ok := ctx.Value(contextKey{}).(*Reporter); ok && r != nil {
			return r
		}
	}
	return noop
}

// Middleware is Options{}.Middleware.
func Middleware(next http.Handler) http.Handler { return Options{}.Middleware(next) }

// Middleware puts a reporter for the request's job in the request context, for
// FromContext. When the request did not come through the sidecar (no Progress-Callback or
// Progress-Token header, or a callback that is not an absolute http or https URL), the
// reporter is a no-op. When next returns (or panics), Middleware sends the last pending
// update before returning, waiting at most FlushTimeout: the sidecar finishes the job when it
// sees the response, and would refuse an update that arrived after that. A handler that
// flushes its response itself gives up that guarantee.
func (o Options) Middleware(next http.Handler) http.Handler {
	c := o.config()
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		r := c.reporter(req.Header.Get(HeaderCallback), req.Header.Get(HeaderToken), req.Header.Get(HeaderJobID))
		if r.inert() {
			next.ServeHTTP(w, req)
			return
		}
		defer func() {
			// Not the request's cancellation: a client that went away does not make the last
			// update less worth sending.
			ctx, cancel := context.WithTimeout(context.WithoutCancel(req.Context()), c.flushTimeout)
			defer cancel()
			if err := r.Close(ctx); errors.Is(err, context.DeadlineExceeded) {
				c.logf("upstreamhook: job %s: %v", r.jobID, err)
			}
		}()
		next.ServeHTTP(w, req.WithContext(context.WithValue(req.Context(), contextKey{}, r)))
	})
}

// Report queues u to be sent, and returns at once. Only the latest update waits: one reported
// before the previous was sent replaces it whole (fields are not merged, so report together
// what belongs together). An update the sidecar would refuse as malformed or too large (by
// the default Limits) is logged and dropped here, without displacing the one waiting.
// Transient failures (5xx, network) are retried with backoff for up to a minute; a 400 or 413
// drops that update only. After Close, or once the sidecar has said the job is gone or
// finished or the token is wrong (401, 404, 409), Report does nothing.
//
// u is encoded before Report returns: the caller may reuse u.Data.
func (r *Reporter) Report(u Update) {
	if r.inert() || r.stopped.Load() {
		return
	}
	body, err := encode(u)
	if err == nil {
		_, err = ParseUpdate(bytes.NewReader(body), Limits{})
	}
	if err != nil {
		r.logf("upstreamhook: job %s: update not sent: %v", r.jobID, err)
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || r.gone {
		return
	}
	r.pending = body
	if !r.running {
		r.running = true
		r.done = make(chan struct{})
		go r.run(r.done)
	}
}

// Percent reports p percent done, clamped to 0..100 (rounding tends to overshoot a little).
func (r *Reporter) Percent(p float64) {
	r.Report(Update{Percent: Float(min(max(p, 0), 100))})
}

// Step reports current of total steps done, with a message (which may be empty).
func (r *Reporter) Step(current, total float64, message string) {
	r.Report(Update{Current: Float(current), Total: Float(total), Message: message})
}

// Active reports whether updates are still being sent: false for the no-op reporter, after
// Close, and once the sidecar has refused the reporter for good.
func (r *Reporter) Active() bool { return !r.inert() && !r.stopped.Load() }

// JobID is the id of the job the reporter reports on, or "" if unknown.
func (r *Reporter) JobID() string {
	if r == nil {
		return ""
	}
	return r.jobID
}

// Close stops the reporter: later updates are dropped, the pending one is sent at once, and
// Close waits for that (with its retries) until ctx is done, then aborts it. When Close
// returns, the reporter's goroutine has exited. The error says why the last update did not
// reach the sidecar: ctx ran out, or the sidecar refused it; nil if it arrived or there was
// none. Close may be called more than once.
func (r *Reporter) Close(ctx context.Context) error {
	if r.inert() {
		return nil
	}
	r.mu.Lock()
	if !r.closed {
		r.closed = true
		r.stopped.Store(true)
		close(r.closing)
	}
	running, done := r.running, r.done
	r.mu.Unlock()
	defer r.cancel()
	if running {
		select {
		case <-done:
		case <-ctx.Done():
			r.cancel()
			<-done
			r.mu.Lock()
			lost := r.err
			r.mu.Unlock()
			if lost != nil {
				return fmt.Errorf("final update not delivered: %w (%v)", ctx.Err(), lost)
			}
		}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.err
}

// outcome is what a callback's answer means for the reporter.
type outcome int

const (
	delivered outcome = iota
	transient         // try again later: the sidecar is restarting, overloaded or unreachable
	rejected          // this update is wrong (400, 413): drop it, send the next
	refused           // the reporter is wrong (job gone or finished, bad token): stop for good
)

func classify(status int) outcome {
	switch {
	case status >= 200 && status < 300:
		return delivered
	case status == http.StatusBadRequest || status == http.StatusRequestEntityTooLarge:
		return rejected
	case status == http.StatusRequestTimeout || status == http.StatusTooEarly ||
		status == http.StatusTooManyRequests || status >= 500:
		return transient
	default:
		// 401, 404, 409, and what the protocol does not answer at all (a redirect, 403,
		// 405): the callback URL or token is not one the sidecar takes, and will not become
		// one by trying again.
		return refused
	}
}

// run sends pending updates until there are none, then exits; Report starts it again.
func (r *Reporter) run(done chan struct{}) {
	defer close(done)
	var (
		failures     int       // transient failures in a row
		failingSince time.Time // start of the first of them
	)
	for {
		r.mu.Lock()
		if r.pending == nil {
			r.running = false
			r.mu.Unlock()
			return
		}
		wait := time.Until(r.nextSend)
		r.mu.Unlock()

		// A pause for MinInterval ends early when Close asks for the final flush; a backoff
		// does not, since the sidecar just failed.
		if !r.pause(wait, failures == 0) {
			r.abort()
			return
		}

		r.mu.Lock()
		body := r.pending
		r.pending = nil
		if failures == 0 {
			r.err = nil // a new update: the fate of the last one no longer matters
		}
		r.mu.Unlock()

		start := time.Now()
		status, detail, err := r.post(body)
		o := transient
		if err == nil {
			o = classify(status)
		}
		switch o {
		case delivered:
			failures = 0
			r.sent(start, nil)
		case rejected:
			failures = 0
			err = fmt.Errorf("update refused (%d %s): %s", status, http.StatusText(status), detail)
			r.logf("upstreamhook: job %s: %v", r.jobID, err)
			r.sent(start, err)
		case refused:
			r.refuse(fmt.Errorf("callback refused (%d %s), no more updates: %s", status, http.StatusText(status), detail))
			return
		case transient:
			if r.ctx.Err() != nil {
				r.abort()
				return
			}
			if err == nil {
				err = fmt.Errorf("%d %s", status, http.StatusText(status))
			}
			if failures == 0 {
				failingSince = start
			}
			failures++
			if time.Since(failingSince) >= retryFor {
				failures = 0
				err = fmt.Errorf("update dropped after failing for %v: %w", retryFor, err)
				r.logf("upstreamhook: job %s: %v", r.jobID, err)
				r.sent(start, err)
				continue
			}
			r.mu.Lock()
			if r.pending == nil {
				r.pending = body // unless a newer update has replaced it meanwhile
			}
			r.nextSend = time.Now().Add(backoff(failures))
			r.err = err
			r.mu.Unlock()
		}
	}
}

// sent records the end of a callback that started at start and is not to be retried.
func (r *Reporter) sent(start time.Time, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err = err
	if r.minInterval > 0 {
		r.nextSend = start.Add(r.minInterval)
	}
}

// refuse ends the goroutine for good: the sidecar will take no update from this reporter.
func (r *Reporter) refuse(err error) {
	r.logf("upstreamhook: job %s: %v", r.jobID, err)
	r.mu.Lock()
	defer r.mu.Unlock()
	r.err = err
	r.pending = nil
	r.running = false
	r.gone = true
	r.stopped.Store(true)
}

// abort ends the goroutine when Close stopped waiting. The error of a failed attempt is kept:
// it says more than the abort.
func (r *Reporter) abort() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.err == nil {
		r.err = errors.New("no answer yet")
	}
	r.pending = nil
	r.running = false
}

// pause waits d, less if Close asks for the flush and cuttable is set; false if the reporter
// was aborted meanwhile.
func (r *Reporter) pause(d time.Duration, cuttable bool) bool {
	if d <= 0 {
		return r.ctx.Err() == nil
	}
	var closing <-chan struct{}
	if cuttable {
		closing = r.closing
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-closing:
	case <-r.ctx.Done():
		return false
	}
	return true
}

// backoff is the wait after the nth transient failure in a row (n >= 1): in
// [step/2, step), where step doubles from firstBackoff up to maxBackoff.
func backoff(n int) time.Duration {
	step := maxBackoff
	if n <= 6 { // 100 ms << 5 is past the cap already; no shift can overflow
		step = min(firstBackoff<<(n-1), maxBackoff)
	}
	half := step / 2
	return half + rand.N(half)
}

// post sends one callback and returns the status and the start of the answer's body, which
// for a 400 names the field at fault.
func (r *Reporter) post(body []byte) (status int, detail string, err error) {
	ctx, cancel := context.WithTimeout(r.ctx, attemptTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, r.url, bytes.NewReader(body))
	if err != nil {
		return 0, "", err
	}
	req.Header.Set("Authorization", "Bearer "+r.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := r.client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	// Drain a little more so the connection can carry the next callback.
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4<<10))
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// encode writes u as a callback body. HTML escaping is off: it would write "<" as six bytes,
// and the sidecar's limits count the bytes it receives.
func encode(u Update) ([]byte, error) {
	var b bytes.Buffer
	e := json.NewEncoder(&b)
	e.SetEscapeHTML(false)
	if err := e.Encode(u); err != nil {
		return nil, err
	}
	return bytes.TrimSuffix(b.Bytes(), []byte("\n")), nil
}
