// Package caddyrun runs Caddy with the plugin for the benchmark harnesses (tests/bench,
// tests/latency): the build of ./tests/caddy, an in-process upstream that holds every job open
// and hands over its token, Caddy on a fresh folder and store, and job creation.
package caddyrun

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-progress/progress/tests/internal/child"
)

// Job is one running job: its id, the upstream's token and callback URL, and its event stream.
type Job struct {
	ID       string
	Token    string
	Callback string // absolute URL of POST …/progress
	Events   string // absolute URL of GET …/events
	// Mirrors are the same event stream served by other Caddy instances sharing the store
	// (Redis): the harness spreads a job's watchers over Events and these.
	Mirrors []string
}

// Build builds ./tests/caddy (Caddy with the standard modules and the plugin) into dir, as
// tests/e2e does, and returns the binary's path.
func Build(root, dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator), "./tests/caddy")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./tests/caddy: %v\n%s", err, out)
	}
	return filepath.Join(dir, "caddy"), nil
}

// ModuleRoot is the folder of go.mod.
func ModuleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("run it inside the module (go env GOMOD: %q, %v)", gomod, err)
	}
	return filepath.Dir(gomod), nil
}

// ---------------------------------------------------------------------------------------------
// The upstream

// Upstream is the legacy app, served from the harness process itself: it records the three
// Progress-* headers of every proxied request and holds the request open (the job stays
// running) until Close. Being in-process, it hands the job's token and callback URL to the
// harness without any IPC, and the harness posts the callbacks exactly as the legacy app would.
type Upstream struct {
	ln      net.Listener
	srv     *http.Server
	release chan struct{}
	once    sync.Once

	mu   sync.Mutex
	seen map[string]chan Job
}

// StartUpstream listens on a free loopback port.
func StartUpstream() (*Upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &Upstream{ln: ln, release: make(chan struct{}), seen: map[string]chan Job{}}
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve), ReadHeaderTimeout: 10 * time.Second}
	go u.srv.Serve(ln)
	return u, nil
}

// Addr is the upstream's host:port.
func (u *Upstream) Addr() string { return u.ln.Addr().String() }

func (u *Upstream) slot(id string) chan Job {
	u.mu.Lock()
	defer u.mu.Unlock()
	c := u.seen[id]
	if c == nil {
		c = make(chan Job, 1)
		u.seen[id] = c
	}
	return c
}

func (u *Upstream) serve(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	id := r.Header.Get("Progress-Job-Id")
	if id == "" {
		w.WriteHeader(http.StatusOK) // a readiness probe, not a job
		return
	}
	select {
	case u.slot(id) <- Job{ID: id, Token: r.Header.Get("Progress-Token"), Callback: r.Header.Get("Progress-Callback")}:
	default:
	}
	select {
	case <-u.release:
	case <-r.Context().Done():
		return
	}
	w.Header().Set("Content-Type", "application/json")
	io.WriteString(w, `{"ok":true}`)
}

// wait returns what the upstream saw of job id.
func (u *Upstream) wait(ctx context.Context, id string) (Job, error) {
	select {
	case j := <-u.slot(id):
		return j, nil
	case <-ctx.Done():
		return Job{}, fmt.Errorf("the upstream never saw job %s: %w", id, ctx.Err())
	}
}

// Close lets every held job finish and stops the upstream.
func (u *Upstream) Close() {
	u.once.Do(func() { close(u.release) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u.srv.Shutdown(ctx)
}

// ---------------------------------------------------------------------------------------------
// Caddy

// Options change the Caddyfile that Start writes.
type Options struct {
	// Progress is extra lines for the global `progress { … }` block (e.g. "heartbeat 2m").
	Progress string
	// Servers is extra lines for the global `servers { … }` block (e.g. Caddy's timeouts).
	Servers string
	// HTTP3 also serves the TLS site over HTTP/3 (UDP, same port).
	HTTP3 bool
	// Store is the store file; empty: progress.db in Caddy's folder.
	Store string
	// Env is extra environment for Caddy (e.g. GODEBUG=gctrace=1).
	Env []string
	// HoldSite adds https://127.0.0.1:<HoldPort> served by bench_hold alone (tests/caddy's
	// handler that only holds an event stream open: Caddy's own cost per stream).
	HoldSite bool
	// Tracing adds Caddy's `tracing` directive to both plugin sites (the exporter comes from
	// the OTEL_* variables in Env, e.g. OTLPSink.Env).
	Tracing bool
}

// Caddy is one running Caddy with the plugin.
type Caddy struct {
	Dir       string
	Proc      *child.Proc
	Admin     string // host:port of the admin endpoint
	TLSPort   int    // https://127.0.0.1:TLSPort: progress_api + progress + reverse_proxy
	CBPort    int    // http://127.0.0.1:CBPort: progress_api, for callbacks
	HoldPort  int    // with Options.HoldSite: https://127.0.0.1:HoldPort, bench_hold
	LogPath   string
	Caddyfile string
	up        *Upstream
	binPath   string
}

// Start starts Caddy in a fresh folder under parent:
//
//	https://127.0.0.1:<tls>  progress_api + progress (callback_base http://127.0.0.1:<cb>) + reverse_proxy <upstream>
//	http://127.0.0.1:<cb>    progress_api (the upstream's callbacks, HTTP/1.1)
//
// and returns once both sites answer.
func Start(bin, parent string, up *Upstream, o Options) (*Caddy, error) {
	c, err := Prepare(bin, parent, up, o)
	if err != nil {
		return nil, err
	}
	if err := c.Launch(o.Env); err != nil {
		return nil, err
	}
	if err := c.WaitReady(60 * time.Second); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Prepare writes Caddy's folder and Caddyfile, without starting it.
func Prepare(bin, parent string, up *Upstream, o Options) (*Caddy, error) {
	dir, err := os.MkdirTemp(parent, "caddy-")
	if err != nil {
		return nil, err
	}
	ports, err := FreePorts(4)
	if err != nil {
		return nil, err
	}
	c := &Caddy{Dir: dir, up: up, Admin: "127.0.0.1:" + strconv.Itoa(ports[0]), TLSPort: ports[1], CBPort: ports[2]}
	holdSite := ""
	if o.HoldSite {
		c.HoldPort = ports[3]
		holdSite = fmt.Sprintf("\nhttps://127.0.0.1:%d {\n\tbind 127.0.0.1\n\ttls internal\n\troute {\n\t\tbench_hold\n\t}\n}\n", c.HoldPort)
	}
	tracing := ""
	if o.Tracing {
		tracing = "\n\ttracing"
	}
	protocols := "h1 h2"
	if o.HTTP3 {
		protocols = "h1 h2 h3"
	}
	storePath := o.Store
	if storePath == "" {
		storePath = filepath.Join(dir, "progress.db")
	}
	c.Caddyfile = fmt.Sprintf(`{
	admin %[1]s
	skip_install_trust
	auto_https disable_redirects
	storage file_system %[2]s
	servers {
		protocols %[7]s
%[10]s
	}
	progress {
		store %[3]s
%[8]s
	}
}

https://127.0.0.1:%[4]d {
	bind 127.0.0.1
	tls internal%[9]s
	progress_api
	progress {
		callback_base http://127.0.0.1:%[5]d
	}
	reverse_proxy %[6]s
}

http://127.0.0.1:%[5]d {
	bind 127.0.0.1%[9]s
	progress_api
}
`, c.Admin, filepath.Join(dir, "storage"), storePath, c.TLSPort, c.CBPort, up.Addr(), protocols, o.Progress, tracing, o.Servers) + holdSite
	if err := os.WriteFile(filepath.Join(dir, "Caddyfile"), []byte(c.Caddyfile), 0o600); err != nil {
		return nil, err
	}
	for _, d := range []string{"home", "data", "config"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	c.LogPath = filepath.Join(dir, "caddy.log")
	c.binPath = bin
	return c, nil
}

// Launch starts the prepared Caddy process and returns at once.
func (c *Caddy) Launch(extraEnv []string) error {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") || k == "CADDY_ADMIN" {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "HOME="+filepath.Join(c.Dir, "home"), "XDG_DATA_HOME="+filepath.Join(c.Dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(c.Dir, "config"))
	env = append(env, extraEnv...)
	logFile, err := os.OpenFile(c.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logFile.Close() // the child keeps its own descriptor
	c.Proc, err = child.Start("caddy", c.binPath, []string{"run", "--config", filepath.Join(c.Dir, "Caddyfile"), "--adapter", "caddyfile"}, env, c.Dir, logFile, logFile, nil)
	return err
}

// WaitReady waits until the TLS site answers over HTTP/2 (tls internal issues its certificate
// in the background) and the callback site answers.
func (c *Caddy) WaitReady(limit time.Duration) error {
	cl := H2Client()
	defer cl.CloseIdleConnections()
	deadline := time.Now().Add(limit)
	var last error
	for time.Now().Before(deadline) {
		if c.Proc.Exited() {
			return fmt.Errorf("caddy exited at once; log:\n%s", c.LogTail(30))
		}
		last = probe(cl, fmt.Sprintf("https://127.0.0.1:%d/ready", c.TLSPort), 2)
		if last == nil {
			last = probe(http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/ready", c.CBPort), 1)
		}
		if last == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("caddy was not ready within %v: %v", limit, last)
}

func probe(c *http.Client, url string, major int) error {
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.ProtoMajor != major {
		return fmt.Errorf("%s: %s", url, resp.Proto)
	}
	return nil
}

// PID is Caddy's process id.
func (c *Caddy) PID() int { return c.Proc.PID() }

// LogTail is the last n lines of Caddy's log.
func (c *Caddy) LogTail(n int) string {
	b, _ := os.ReadFile(c.LogPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// GCLines returns Caddy's gctrace lines ("gc N @Ts …").
func (c *Caddy) GCLines() []string {
	b, _ := os.ReadFile(c.LogPath)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "gc ") && strings.Contains(line, "ms clock") {
			out = append(out, line)
		}
	}
	return out
}

// ErrorLines returns the error lines of Caddy's log.
func (c *Caddy) ErrorLines() []string {
	b, _ := os.ReadFile(c.LogPath)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `"level":"error"`) || strings.HasPrefix(line, "panic:") || strings.Contains(line, "fatal error:") {
			out = append(out, line)
		}
	}
	return out
}

// MakeJobs starts n jobs with Prefer: respond-async over HTTP/2, and waits until the upstream
// holds every one (so each is running and its token known).
func (c *Caddy) MakeJobs(ctx context.Context, n int) ([]Job, error) {
	cl := H2Client()
	defer cl.CloseIdleConnections()
	jobs := make([]Job, n)
	errc := make(chan error, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("https://127.0.0.1:%d/work/%d", c.TLSPort, i), strings.NewReader(`{"n":1}`))
			req.Header.Set("Prefer", "respond-async")
			req.Header.Set("Content-Type", "application/json")
			resp, err := cl.Do(req)
			if err != nil {
				errc <- err
				return
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusAccepted {
				errc <- fmt.Errorf("POST /work: %s %s", resp.Status, body)
				return
			}
			var doc struct {
				ID    string `json:"id"`
				Links struct {
					Events string `json:"events"`
				} `json:"links"`
			}
			if err := json.Unmarshal(body, &doc); err != nil || doc.ID == "" {
				errc <- fmt.Errorf("202 body %q: %v", body, err)
				return
			}
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			j, err := c.up.wait(wctx, doc.ID)
			if err != nil {
				errc <- err
				return
			}
			j.Events = fmt.Sprintf("https://127.0.0.1:%d%s", c.TLSPort, doc.Links.Events)
			jobs[i] = j
		}()
	}
	wg.Wait()
	close(errc)
	if err := <-errc; err != nil {
		return nil, err
	}
	return jobs, nil
}

// Profile saves a CPU profile of Caddy over seconds (admin /debug/pprof/profile).
func (c *Caddy) Profile(ctx context.Context, seconds int, path string) error {
	return FetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", c.Admin, seconds), path)
}

// Allocs saves what Caddy allocated over seconds (admin /debug/pprof/allocs, a delta profile).
func (c *Caddy) Allocs(ctx context.Context, seconds int, path string) error {
	return FetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/allocs?seconds=%d", c.Admin, seconds), path)
}

// Trace saves an execution trace of Caddy over seconds (admin /debug/pprof/trace).
func (c *Caddy) Trace(ctx context.Context, seconds int, path string) error {
	return FetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/trace?seconds=%d", c.Admin, seconds), path)
}

// Heap saves a heap profile of Caddy after a GC (admin /debug/pprof/heap?gc=1).
func (c *Caddy) Heap(ctx context.Context, path string) error {
	return FetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/heap?gc=1", c.Admin), path)
}

// Close stops Caddy.
func (c *Caddy) Close() {
	if c.Proc != nil {
		c.Proc.Stop(20 * time.Second)
	}
}

// FetchProfile saves a pprof profile served at url.
func FetchProfile(ctx context.Context, url, path string) error {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s %s", url, resp.Status, bytes.TrimSpace(b[:min(len(b), 300)]))
	}
	if path == "" {
		return nil
	}
	return os.WriteFile(path, b, 0o644)
}

// FreePorts returns n distinct loopback TCP ports nothing listens on.
func FreePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// H2Client is an HTTP/2-only client over TLS that trusts any certificate (loopback only).
func H2Client() *http.Client {
	return &http.Client{Transport: H2Transport(), Timeout: 30 * time.Second}
}

// H2Transport is an HTTP/2-only transport over TLS that trusts any certificate.
func H2Transport() *http.Transport {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true)
	return tr
}

// SelfSigned is a throwaway certificate for 127.0.0.1, for the harnesses' own TLS servers.
func SelfSigned() (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, nil
}
