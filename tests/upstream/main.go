// Command upstream is a small legacy application for the end-to-end tests: it knows nothing of
// caddy-progress, it only answers slowly, fails, hangs or sends large bodies, and remembers what
// happened to the requests that carried a Progress-Job-Id so that a test can ask.
//
//	/slow?ms=N     200 after N ms; the body names the progress headers it received, as JSON
//	/fail          500 with a short text body
//	/hang          answers only when the request's context ends (the client or proxy gave up)
//	/large?size=N  N deterministic pseudo-random bytes, Content-Length and X-Checksum (sha256)
//	/echo          the request body, with its Content-Type
//	/report?steps=N&ms=M  reports progress N times through the sidecar's callback, M ms
//	               apart, the way any language would (a plain JSON POST with the bearer token),
//	               then answers 200 with the callback's answers and the token it used
//	/seen?id=ID    what happened to the request of job ID (see seenHandler)
//	/acked         per job id, the highest /report step the sidecar acknowledged with 204
//	/gate?name=G&size=N  waits until POST /open?name=G, then answers 200 with N bytes
//	/say           posts its own request body, as is, as one progress report through the
//	               callback, then answers 200 with the callback's status and a hash of the token
//	/raw           answers with a malformed HTTP/1.1 response (a header line holding bare CRs)
//	               and hangs up, so the proxy's error text carries bytes of the upstream's choosing
//	/reset?size=N&send=M&how=rst|fin|hang|empty  a response that breaks off (see resetHandler)
//	/late          200 at once, keeping the job's callback URL and token; /poke?id=ID then
//	               posts a progress report for that job, after the answer (see lateReports)
//
// Every endpoint is also served under one leading path segment (/jobs/slow, /serial/hang, …),
// so a Caddyfile can route by prefix without rewriting. It listens on -addr and prints the
// address it got on stdout, as the first line.
package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "address to listen on")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ln.Addr().String())
	os.Stdout.Sync()
	srv := &http.Server{Handler: newMux(), ReadHeaderTimeout: 10 * time.Second}
	log.Fatal(srv.Serve(ln))
}

func newMux() http.Handler {
	reg := &registry{jobs: make(map[string]*record), acked: make(map[string]int)}
	mux := http.NewServeMux()
	handle := func(name string, h http.HandlerFunc) {
		mux.HandleFunc("/"+name, h)
		mux.HandleFunc("/{prefix}/"+name, h)
	}
	handle("slow", reg.track(slowHandler))
	handle("fail", reg.track(failHandler))
	handle("hang", reg.track(hangHandler))
	handle("large", reg.track(largeHandler))
	handle("echo", reg.track(echoHandler))
	handle("report", reg.track(reg.reportHandler))
	handle("gate", reg.track(gates.gateHandler))
	mux.HandleFunc("/open", gates.openHandler)
	handle("say", reg.track(sayHandler))
	handle("raw", reg.track(rawHandler))
	handle("reset", reg.track(resetHandler))
	late := &lateReports{jobs: make(map[string][2]string)}
	handle("late", reg.track(late.answer))
	mux.HandleFunc("/seen", reg.seenHandler)
	mux.HandleFunc("/acked", reg.ackedHandler)
	mux.HandleFunc("/poke", late.poke)
	return mux
}

// record is what happened to one job's request.
type record struct {
	started     chan struct{} // closed when the request arrived
	ctxDone     chan struct{} // closed when the request's context ended before the handler returned
	finished    chan struct{} // closed when the handler returned
	path        string
	finishedAt  time.Time // set before finished is closed
	ctxDoneSeen bool      // set before finished is closed
}

type registry struct {
	mu    sync.Mutex
	jobs  map[string]*record
	acked map[string]int // job id → highest report step answered 204
}

func (g *registry) get(id string) *record {
	g.mu.Lock()
	defer g.mu.Unlock()
	r := g.jobs[id]
	if r == nil {
		r = &record{started: make(chan struct{}), ctxDone: make(chan struct{}), finished: make(chan struct{})}
		g.jobs[id] = r
	}
	return r
}

// track records the life of every request that carries a Progress-Job-Id.
func (g *registry) track(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.Header.Get("Progress-Job-Id")
		if id == "" {
			h(w, r)
			return
		}
		rec := g.get(id)
		g.mu.Lock()
		select {
		case <-rec.started:
			g.mu.Unlock()
			h(w, r) // a retry of the same job: the first request's record stands
			return
		default:
		}
		rec.path = r.URL.Path
		close(rec.started)
		g.mu.Unlock()
		var once sync.Once
		markDone := func() { once.Do(func() { close(rec.ctxDone) }) }
		stop := context.AfterFunc(r.Context(), markDone)
		h(w, r)
		stop()
		// Ask the context itself: its Done channel closes a moment before AfterFunc's f
		// starts, so stop's answer alone can miss an end the handler already saw.
		ended := r.Context().Err() != nil
		if ended {
			markDone()
		}
		g.mu.Lock()
		rec.ctxDoneSeen = ended
		rec.finishedAt = time.Now()
		g.mu.Unlock()
		close(rec.finished)
	}
}

// seenHandler answers what happened to job id's request, as JSON:
//
//	{"started": true, "ctx_done": false, "finished": false, "finished_at_unix_nano": 0, "path": "/jobs/hang"}
//
// With &until=started|ctx_done|finished and &wait=5s it waits (at most 30s) for that to happen
// first, so a test waits on the event instead of polling.
func (g *registry) seenHandler(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	if id == "" {
		http.Error(w, "id missing", http.StatusBadRequest)
		return
	}
	rec := g.get(id)
	if until := r.URL.Query().Get("until"); until != "" {
		wait, err := time.ParseDuration(r.URL.Query().Get("wait"))
		if err != nil || wait <= 0 {
			wait = 5 * time.Second
		}
		wait = min(wait, 30*time.Second)
		var ch chan struct{}
		switch until {
		case "started":
			ch = rec.started
		case "ctx_done":
			ch = rec.ctxDone
		case "finished":
			ch = rec.finished
		default:
			http.Error(w, "until must be started, ctx_done or finished", http.StatusBadRequest)
			return
		}
		timer := time.NewTimer(wait)
		defer timer.Stop()
		select {
		case <-ch:
		case <-timer.C:
		case <-r.Context().Done():
			return
		}
	}
	closed := func(c chan struct{}) bool {
		select {
		case <-c:
			return true
		default:
			return false
		}
	}
	g.mu.Lock()
	out := map[string]any{
		"started":  closed(rec.started),
		"ctx_done": closed(rec.ctxDone),
		"finished": closed(rec.finished),
		"path":     rec.path,
	}
	if closed(rec.finished) {
		out["finished_at_unix_nano"] = rec.finishedAt.UnixNano()
		out["ctx_done_before_return"] = rec.ctxDoneSeen
	}
	g.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	w.WriteHeader(status)
	w.Write(b)
}

func slowHandler(w http.ResponseWriter, r *http.Request) {
	ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
	ms = min(max(ms, 0), 600_000)
	timer := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer timer.Stop()
	select {
	case <-timer.C:
	case <-r.Context().Done():
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"slept_ms":          ms,
		"method":            r.Method,
		"path":              r.URL.Path,
		"progress_job_id":   r.Header.Get("Progress-Job-Id"),
		"progress_callback": r.Header.Get("Progress-Callback"),
		"progress_token":    r.Header.Get("Progress-Token"),
		"prefer":            r.Header.Get("Prefer"),
		"traceparent":       r.Header.Get("traceparent"),
	})
}

func failHandler(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("X-Upstream", "fail")
	w.WriteHeader(http.StatusInternalServerError)
	io.WriteString(w, "legacy app failed: the database is on fire\n")
}

func hangHandler(w http.ResponseWriter, r *http.Request) {
	<-r.Context().Done()
}

// largeStream makes /large's bytes: the same size always gives the same bytes.
func largeStream(size int64) io.Reader {
	var seed [32]byte
	copy(seed[:], "caddy-progress e2e large body")
	seed[31] = byte(size)
	return io.LimitReader(rand.NewChaCha8(seed), size)
}

var checksums sync.Map // size → hex sha256

func checksum(size int64) string {
	if v, ok := checksums.Load(size); ok {
		return v.(string)
	}
	h := sha256.New()
	io.Copy(h, largeStream(size))
	sum := hex.EncodeToString(h.Sum(nil))
	checksums.Store(size, sum)
	return sum
}

const maxLarge = 4 << 30

func largeHandler(w http.ResponseWriter, r *http.Request) {
	size, err := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
	if err != nil || size < 0 || size > maxLarge {
		http.Error(w, "size must be a byte count up to 4 GiB", http.StatusBadRequest)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(size, 10))
	h.Set("X-Checksum", checksum(size))
	w.WriteHeader(http.StatusOK)
	if r.Method != http.MethodHead {
		io.CopyBuffer(w, largeStream(size), make([]byte, 64<<10))
	}
}

func echoHandler(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 64<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" {
		w.Header().Set("Content-Type", ct)
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.Write(body)
}

// ackedHandler answers, as a JSON object, the highest /report step the sidecar acknowledged
// with 204 for every job that had one: {"<job id>": 3, …}. A crash test reads it after killing
// the sidecar to know which reports it must find again once the sidecar restarts.
func (g *registry) ackedHandler(w http.ResponseWriter, r *http.Request) {
	g.mu.Lock()
	out := make(map[string]int, len(g.acked))
	for id, n := range g.acked {
		out[id] = n
	}
	g.mu.Unlock()
	writeJSON(w, http.StatusOK, out)
}

// reportHandler posts progress reports to the sidecar (DESIGN.md section 4) and answers with
// what the sidecar said to each. Report i carries current i; each 204 is recorded for /acked.
func (g *registry) reportHandler(w http.ResponseWriter, r *http.Request) {
	steps, _ := strconv.Atoi(r.URL.Query().Get("steps"))
	steps = min(max(steps, 1), 1000)
	ms, _ := strconv.Atoi(r.URL.Query().Get("ms"))
	ms = min(max(ms, 0), 60_000)
	callback, token := r.Header.Get("Progress-Callback"), r.Header.Get("Progress-Token")
	client := &http.Client{Timeout: 10 * time.Second}
	var answers []int
	for i := 1; i <= steps; i++ {
		if i > 1 {
			timer := time.NewTimer(time.Duration(ms) * time.Millisecond)
			select {
			case <-timer.C:
			case <-r.Context().Done():
				timer.Stop()
				return
			}
		}
		body, _ := json.Marshal(map[string]any{
			"current": i, "total": steps, "stage": "step " + strconv.Itoa(i),
			"message": fmt.Sprintf("done %d of %d", i, steps),
		})
		req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, callback, bytes.NewReader(body))
		if err != nil {
			answers = append(answers, 0)
			continue
		}
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Content-Type", "application/json")
		resp, err := client.Do(req)
		if err != nil {
			answers = append(answers, 0)
			continue
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		answers = append(answers, resp.StatusCode)
		if id := r.Header.Get("Progress-Job-Id"); resp.StatusCode == http.StatusNoContent && id != "" {
			g.mu.Lock()
			g.acked[id] = max(g.acked[id], i)
			g.mu.Unlock()
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{
		"answers": answers, "progress_job_id": r.Header.Get("Progress-Job-Id"),
		"progress_callback": callback, "progress_token": token,
	})
}

// gates hold /gate?name=N requests until POST /open?name=N, so that a test decides the moment
// a job's upstream answers (say, after it has filled the disk). A gate stays open once opened.
var gates = &gateSet{m: make(map[string]chan struct{})}

type gateSet struct {
	mu sync.Mutex
	m  map[string]chan struct{}
}

func (g *gateSet) get(name string) chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	ch := g.m[name]
	if ch == nil {
		ch = make(chan struct{})
		g.m[name] = ch
	}
	return ch
}

// gateHandler waits for its gate, then answers 200 with size bytes (default 2) of 'g'.
func (g *gateSet) gateHandler(w http.ResponseWriter, r *http.Request) {
	size, _ := strconv.Atoi(r.URL.Query().Get("size"))
	size = min(max(size, 2), 64<<20)
	select {
	case <-g.get(r.URL.Query().Get("name")):
	case <-r.Context().Done():
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.Itoa(size))
	w.Write(bytes.Repeat([]byte{'g'}, size))
}

func (g *gateSet) openHandler(w http.ResponseWriter, r *http.Request) {
	ch := g.get(r.URL.Query().Get("name"))
	g.mu.Lock()
	select {
	case <-ch:
	default:
		close(ch)
	}
	g.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

// sayHandler posts the request body, unchanged, as a progress report, so a test can put any
// text into stage, message or data the way a real upstream would. It answers with the
// callback's status and the SHA-256 of the token it used, never the token itself: the answer
// becomes the job's stored result, which must hold no token.
func sayHandler(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	token := r.Header.Get("Progress-Token")
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, r.Header.Get("Progress-Callback"), bytes.NewReader(body))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	answer := 0
	if resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req); err == nil {
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		answer = resp.StatusCode
	}
	sum := sha256.Sum256([]byte(token))
	writeJSON(w, http.StatusOK, map[string]any{"answer": answer, "token_sha256": hex.EncodeToString(sum[:])})
}

// rawHandler writes a response Go's HTTP client refuses: a header line whose name holds bare
// CRs followed by what would be SSE fields. The client's error quotes the line, so the job's
// error message carries text the upstream chose.
func rawHandler(w http.ResponseWriter, r *http.Request) {
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	buf.WriteString("HTTP/1.1 200 OK\r\nX-Evil\rid: 999\revent: done\rdata: {\"injected\":true}\r\nContent-Length: 0\r\n\r\n")
	buf.Flush()
}

// resetHandler promises size bytes (Content-Length), sends the first send of them and then
// breaks the response off, as a crashing or overloaded app does:
//
//	how=rst    the connection is reset (RST: SO_LINGER 0, then close)
//	how=fin    the connection is closed early (FIN): the body is cut short
//	how=hang   the connection stays open and silent until the proxy gives up and closes it
//	how=empty  the connection is reset before anything was sent
func resetHandler(w http.ResponseWriter, r *http.Request) {
	size, _ := strconv.ParseInt(r.URL.Query().Get("size"), 10, 64)
	send, _ := strconv.ParseInt(r.URL.Query().Get("send"), 10, 64)
	size = min(max(size, 1), 1<<30)
	send = min(max(send, 0), size-1)
	how := r.URL.Query().Get("how")
	conn, buf, err := http.NewResponseController(w).Hijack()
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer conn.Close()
	if how != "empty" {
		fmt.Fprintf(buf, "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", size)
		io.Copy(buf, largeStream(send))
		buf.Flush()
	}
	switch how {
	case "hang":
		// Whatever the proxy sends or however it leaves, the read ends when it closes.
		io.Copy(io.Discard, conn)
	case "fin":
	default:
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
	}
}

// lateReports remembers the callback URL and token of /late's jobs, so that /poke can report
// progress for a job after its upstream request has been answered.
type lateReports struct {
	mu   sync.Mutex
	jobs map[string][2]string // job id → callback URL, token
}

func (l *lateReports) answer(w http.ResponseWriter, r *http.Request) {
	id := r.Header.Get("Progress-Job-Id")
	l.mu.Lock()
	l.jobs[id] = [2]string{r.Header.Get("Progress-Callback"), r.Header.Get("Progress-Token")}
	l.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"progress_job_id": id, "late": true})
}

// poke posts {"percent": 50} for job id with what /late kept, and answers the callback's
// status and body as JSON: {"status": 409, "content_type": "…", "body": "…"}.
func (l *lateReports) poke(w http.ResponseWriter, r *http.Request) {
	id := r.URL.Query().Get("id")
	l.mu.Lock()
	kept, ok := l.jobs[id]
	l.mu.Unlock()
	if !ok {
		http.Error(w, "no /late request seen for that job", http.StatusNotFound)
		return
	}
	req, err := http.NewRequestWithContext(r.Context(), http.MethodPost, kept[0],
		bytes.NewReader([]byte(`{"percent": 50, "message": "reported after the answer"}`)))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	req.Header.Set("Authorization", "Bearer "+kept[1])
	req.Header.Set("Content-Type", "application/json")
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	writeJSON(w, http.StatusOK, map[string]any{
		"status": resp.StatusCode, "content_type": resp.Header.Get("Content-Type"), "body": string(body),
	})
}
