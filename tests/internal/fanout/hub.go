package fanout

import (
	"context"
	"crypto/hmac"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/caddy-progress/progress/tests/internal/caddyrun"
	"github.com/caddy-progress/progress/tests/internal/child"
)

// The baseline: a minimal SSE hub in Go, memory only (no store, no fsync, no Caddy), speaking
// the same protocol as the plugin to the same clients: POST /_jobs/{id}/progress over HTTP/1.1
// (bearer token checked, JSON body parsed, the whole job document re-encoded), and
// GET /_jobs/{id}/events over HTTP/2 with TLS, each event the whole document on one data line,
// latest-wins for a subscriber that falls behind (one wake-up channel per subscriber, as the
// plugin's feed has). What the plugin adds on top of this is Caddy's request handling, the
// durable commit before publishing, and the store's bookkeeping; so plugin ÷ hub is the price
// of those on this machine, at this moment, with the harness's own cost in both.

type hub struct {
	mu   sync.Mutex
	jobs map[string]*hubJob
}

type hubJob struct {
	mu      sync.Mutex
	id      string
	seq     uint64
	doc     []byte
	created time.Time
	percent *float64
	message string
	wakers  map[chan struct{}]struct{}
}

// hubDoc mirrors the fields of the plugin's job document, so both send events of similar size.
type hubDoc struct {
	ID       string `json:"id"`
	State    string `json:"state"`
	Seq      uint64 `json:"seq"`
	Progress *struct {
		Percent *float64 `json:"percent,omitempty"`
		Message string   `json:"message,omitempty"`
	} `json:"progress,omitempty"`
	ETASeconds *float64          `json:"eta_seconds,omitempty"`
	Request    map[string]string `json:"request"`
	CreatedAt  time.Time         `json:"created_at"`
	StartedAt  time.Time         `json:"started_at"`
	UpdatedAt  time.Time         `json:"updated_at"`
	ExpiresAt  time.Time         `json:"expires_at"`
	Links      map[string]string `json:"links"`
}

func hubToken(id string) string { return "token-" + id }

func (h *hub) job(id string) *hubJob {
	h.mu.Lock()
	defer h.mu.Unlock()
	j := h.jobs[id]
	if j == nil {
		j = &hubJob{id: id, created: time.Now(), wakers: map[chan struct{}]struct{}{}}
		j.encodeLocked(time.Now())
		h.jobs[id] = j
	}
	return j
}

func (j *hubJob) encodeLocked(now time.Time) {
	j.seq++
	d := hubDoc{ID: j.id, State: "running", Seq: j.seq, Request: map[string]string{"method": "POST", "uri": "/work/" + j.id},
		CreatedAt: j.created, StartedAt: j.created, UpdatedAt: now, ExpiresAt: j.created.Add(24 * time.Hour),
		Links: map[string]string{"self": "/_jobs/" + j.id, "events": "/_jobs/" + j.id + "/events",
			"result": "/_jobs/" + j.id + "/result", "cancel": "/_jobs/" + j.id + "/cancel"}}
	if j.percent != nil || j.message != "" {
		d.Progress = &struct {
			Percent *float64 `json:"percent,omitempty"`
			Message string   `json:"message,omitempty"`
		}{j.percent, j.message}
		if j.percent != nil && *j.percent > 0 {
			eta := now.Sub(j.created).Seconds() * (100 - *j.percent) / *j.percent
			d.ETASeconds = &eta
		}
	}
	j.doc, _ = json.Marshal(d)
}

func (h *hub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rest, ok := strings.CutPrefix(r.URL.Path, "/_jobs/")
	id, action, _ := strings.Cut(rest, "/")
	switch {
	case !ok || id == "":
		w.WriteHeader(http.StatusOK) // readiness probe
	case action == "progress" && r.Method == http.MethodPost:
		h.report(w, r, id)
	case action == "events" && r.Method == http.MethodGet:
		h.events(w, r, id)
	default:
		http.NotFound(w, r)
	}
}

func (h *hub) report(w http.ResponseWriter, r *http.Request, id string) {
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !hmac.Equal([]byte(token), []byte(hubToken(id))) {
		http.Error(w, "bad token", http.StatusUnauthorized)
		return
	}
	var u struct {
		Percent *float64 `json:"percent"`
		Message string   `json:"message"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&u); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	j := h.job(id)
	j.mu.Lock()
	if u.Percent != nil {
		j.percent = u.Percent
	}
	if u.Message != "" {
		j.message = u.Message
	}
	j.encodeLocked(time.Now())
	for c := range j.wakers {
		select {
		case c <- struct{}{}:
		default:
		}
	}
	j.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (h *hub) events(w http.ResponseWriter, r *http.Request, id string) {
	j := h.job(id)
	wake := make(chan struct{}, 1)
	j.mu.Lock()
	j.wakers[wake] = struct{}{}
	j.mu.Unlock()
	defer func() {
		j.mu.Lock()
		delete(j.wakers, wake)
		j.mu.Unlock()
	}()
	hd := w.Header()
	hd.Set("Content-Type", "text/event-stream")
	hd.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	rc := http.NewResponseController(w)
	io.WriteString(w, "retry: 2000\n: stream open\n\n")
	if rc.Flush() != nil {
		return
	}
	var last uint64
	for {
		j.mu.Lock()
		seq, doc := j.seq, j.doc
		j.mu.Unlock()
		if seq > last {
			last = seq
			b := make([]byte, 0, len(doc)+48)
			b = append(b, "id: "...)
			b = strconv.AppendUint(b, seq, 10)
			b = append(b, "\nevent: progress\ndata: "...)
			b = append(b, doc...)
			b = append(b, "\n\n"...)
			if _, err := w.Write(b); err != nil || rc.Flush() != nil {
				return
			}
			continue
		}
		select {
		case <-wake:
		case <-r.Context().Done():
			return
		}
	}
}

// serveHub serves the hub: HTTP/2 over TLS on tlsLn (subscribers), HTTP/1.1 on cbLn
// (callbacks), until ctx ends.
func serveHub(ctx context.Context, tlsLn, cbLn net.Listener) error {
	cert, err := caddyrun.SelfSigned()
	if err != nil {
		return err
	}
	h := &hub{jobs: map[string]*hubJob{}}
	s1 := &http.Server{Handler: h, TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}}
	s1.Protocols = new(http.Protocols)
	s1.Protocols.SetHTTP1(true)
	s1.Protocols.SetHTTP2(true)
	s2 := &http.Server{Handler: h}
	go s1.ServeTLS(tlsLn, "", "")
	go s2.Serve(cbLn)
	<-ctx.Done()
	s1.Close()
	s2.Close()
	return nil
}

// HubMain is the hub as its own process (`latency __hub`): it prints "<tls addr> <callback
// addr>" on its first line and serves until SIGTERM.
func HubMain(args []string) int {
	fs := flag.NewFlagSet("hub", flag.ContinueOnError)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "hub:", err)
		return 1
	}
	cbLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "hub:", err)
		return 1
	}
	fmt.Fprintln(Out, tlsLn.Addr().String(), cbLn.Addr().String())
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := serveHub(ctx, tlsLn, cbLn); err != nil {
		fmt.Fprintln(os.Stderr, "hub:", err)
		return 1
	}
	return 0
}

// hubTarget is the hub seen from the harness: a child process, or (in the smoke test) served
// from the harness's own process, then pid is the harness's.
type hubTarget struct {
	proc            *child.Proc
	cancel          context.CancelFunc
	tlsAddr, cbAddr string
}

func startHubProc(self, dir string) (*hubTarget, error) {
	var out child.Output
	p, err := child.Start("hub", self, []string{"__hub"}, os.Environ(), dir, &out, os.Stderr, nil)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if line, ok := out.FirstLine(); ok {
			f := strings.Fields(line)
			if len(f) != 2 {
				p.Stop(time.Second)
				return nil, fmt.Errorf("hub printed %q", line)
			}
			return &hubTarget{proc: p, tlsAddr: f[0], cbAddr: f[1]}, nil
		}
		if p.Exited() {
			return nil, fmt.Errorf("the hub exited at once")
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.Stop(time.Second)
	return nil, fmt.Errorf("the hub printed no address within 30s")
}

func startHubInProcess() (*hubTarget, error) {
	tlsLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	cbLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tlsLn.Close()
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	go serveHub(ctx, tlsLn, cbLn)
	return &hubTarget{cancel: cancel, tlsAddr: tlsLn.Addr().String(), cbAddr: cbLn.Addr().String()}, nil
}

func (h *hubTarget) name() string { return "hub" }

func (h *hubTarget) pid() int {
	if h.proc == nil {
		return os.Getpid()
	}
	return h.proc.PID()
}

func (h *hubTarget) makeJobs(_ context.Context, n int) ([]job, error) {
	jobs := make([]job, n)
	for i := range jobs {
		id := fmt.Sprintf("hubjob%06d", i)
		jobs[i] = job{ID: id, Token: hubToken(id),
			Callback: "http://" + h.cbAddr + "/_jobs/" + id + "/progress",
			Events:   "https://" + h.tlsAddr + "/_jobs/" + id + "/events"}
	}
	return jobs, nil
}

func (h *hubTarget) profile(context.Context, int, string) error { return errNotSupported }

func (h *hubTarget) trace(context.Context, int, string) error { return errNotSupported }

func (h *hubTarget) close() {
	if h.proc != nil {
		h.proc.Stop(5 * time.Second)
	}
	if h.cancel != nil {
		h.cancel()
	}
}
