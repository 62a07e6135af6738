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
	mux.HandleFunc("/seen", reg.seenHandler)
	mux.HandleFunc("/acked", reg.ackedHandler)
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
