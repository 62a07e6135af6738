package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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

// job is one job under measurement, however the target made it.
type job struct {
	id       string
	token    string
	callback string // absolute URL of POST …/progress
	events   string // absolute URL of GET …/events
}

// target is what the clients measure: Caddy with the plugin, or the in-memory baseline hub.
type target interface {
	name() string
	pid() int
	makeJobs(ctx context.Context, n int) ([]job, error)
	// profile fetches a CPU profile of the target's process, if it can, into path.
	profile(ctx context.Context, seconds int, path string) error
	// trace fetches an execution trace of the target's process, if it can, into path.
	trace(ctx context.Context, seconds int, path string) error
	close()
}

// buildCaddy builds ./tests/caddy (Caddy with the standard modules and the plugin) into dir, as
// tests/bench and tests/e2e do.
func buildCaddy(root, dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", dir+string(filepath.Separator), "./tests/caddy")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./tests/caddy: %v\n%s", err, out)
	}
	return filepath.Join(dir, "caddy"), nil
}

// moduleRoot is the folder of go.mod.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	gomod := strings.TrimSpace(string(out))
	if err != nil || gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("run it inside the module (go env GOMOD: %q, %v)", gomod, err)
	}
	return filepath.Dir(gomod), nil
}

// ---------------------------------------------------------------------------------------------
// The upstream

// upstream is the legacy app, served from the harness process itself: it records the three
// Progress-* headers of every proxied request and holds the request open (the job stays
// running) until released. Being in-process, it hands the job's token and callback URL to the
// reporters without any IPC, and the reporters post the callbacks exactly as the legacy app
// would (HTTP/1.1 keep-alive to callback_base).
type upstream struct {
	ln      net.Listener
	srv     *http.Server
	release chan struct{}
	once    sync.Once

	mu   sync.Mutex
	seen map[string]chan job
}

func startUpstream() (*upstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	u := &upstream{ln: ln, release: make(chan struct{}), seen: map[string]chan job{}}
	u.srv = &http.Server{Handler: http.HandlerFunc(u.serve), ReadHeaderTimeout: 10 * time.Second}
	go u.srv.Serve(ln)
	return u, nil
}

func (u *upstream) addr() string { return u.ln.Addr().String() }

func (u *upstream) slot(id string) chan job {
	u.mu.Lock()
	defer u.mu.Unlock()
	c := u.seen[id]
	if c == nil {
		c = make(chan job, 1)
		u.seen[id] = c
	}
	return c
}

func (u *upstream) serve(w http.ResponseWriter, r *http.Request) {
	io.Copy(io.Discard, r.Body)
	id := r.Header.Get("Progress-Job-Id")
	if id == "" {
		w.WriteHeader(http.StatusOK) // a readiness probe, not a job
		return
	}
	select {
	case u.slot(id) <- job{id: id, token: r.Header.Get("Progress-Token"), callback: r.Header.Get("Progress-Callback")}:
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
func (u *upstream) wait(ctx context.Context, id string) (job, error) {
	select {
	case j := <-u.slot(id):
		return j, nil
	case <-ctx.Done():
		return job{}, fmt.Errorf("the upstream never saw job %s: %w", id, ctx.Err())
	}
}

func (u *upstream) close() {
	u.once.Do(func() { close(u.release) })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	u.srv.Shutdown(ctx)
}

// ---------------------------------------------------------------------------------------------
// Caddy

type caddyTarget struct {
	label     string
	dir       string
	proc      *child.Proc
	up        *upstream
	admin     string
	tlsPort   int
	cbPort    int
	logPath   string
	caddyfile string
}

// startCaddy starts Caddy with a fresh store in a folder of its own:
//
//	https://127.0.0.1:<tls>  progress_api + progress (callback_base http://127.0.0.1:<cb>) + reverse_proxy <upstream>
//	http://127.0.0.1:<cb>    progress_api (the upstream's callbacks, HTTP/1.1)
func startCaddy(bin, parent string, up *upstream) (*caddyTarget, error) {
	dir, err := os.MkdirTemp(parent, "caddy-")
	if err != nil {
		return nil, err
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	c := &caddyTarget{dir: dir, up: up, admin: "127.0.0.1:" + strconv.Itoa(ports[0]), tlsPort: ports[1], cbPort: ports[2]}
	c.caddyfile = fmt.Sprintf(`{
	admin %[1]s
	skip_install_trust
	auto_https disable_redirects
	storage file_system %[2]s
	servers {
		protocols h1 h2
	}
	progress {
		store %[3]s
	}
}

https://127.0.0.1:%[4]d {
	bind 127.0.0.1
	tls internal
	progress_api
	progress {
		callback_base http://127.0.0.1:%[5]d
	}
	reverse_proxy %[6]s
}

http://127.0.0.1:%[5]d {
	bind 127.0.0.1
	progress_api
}
`, c.admin, filepath.Join(dir, "storage"), filepath.Join(dir, "progress.db"), c.tlsPort, c.cbPort, up.addr())
	config := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(config, []byte(c.caddyfile), 0o600); err != nil {
		return nil, err
	}
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") || k == "CADDY_ADMIN" {
			continue
		}
		env = append(env, kv)
	}
	for _, d := range []string{"home", "data", "config"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, err
		}
	}
	// gctrace: one line per GC in Caddy's log, to tell GC pauses from other stalls.
	env = append(env, "GODEBUG=gctrace=1", "HOME="+filepath.Join(dir, "home"), "XDG_DATA_HOME="+filepath.Join(dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	c.logPath = filepath.Join(dir, "caddy.log")
	logFile, err := os.Create(c.logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	if c.proc, err = child.Start("caddy", bin, []string{"run", "--config", config, "--adapter", "caddyfile"}, env, dir, logFile, logFile, nil); err != nil {
		return nil, err
	}
	// Ready when the TLS site answers over HTTP/2 (tls internal issues its certificate in the
	// background) and the callback site answers.
	cl := h2Client()
	defer cl.CloseIdleConnections()
	deadline := time.Now().Add(60 * time.Second)
	var last error
	for time.Now().Before(deadline) {
		if c.proc.Exited() {
			return nil, fmt.Errorf("caddy exited at once; log:\n%s", c.logTail(30))
		}
		last = probe(cl, fmt.Sprintf("https://127.0.0.1:%d/ready", c.tlsPort), 2)
		if last == nil {
			last = probe(http.DefaultClient, fmt.Sprintf("http://127.0.0.1:%d/ready", c.cbPort), 1)
		}
		if last == nil {
			return c, nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.close()
	return nil, fmt.Errorf("caddy was not ready within 60s: %v", last)
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

func (c *caddyTarget) name() string { return "caddy" }
func (c *caddyTarget) pid() int     { return c.proc.PID() }

func (c *caddyTarget) logTail(n int) string {
	b, _ := os.ReadFile(c.logPath)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// gcLines returns Caddy's gctrace lines ("gc N @Ts …").
func (c *caddyTarget) gcLines() []string {
	b, _ := os.ReadFile(c.logPath)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "gc ") && strings.Contains(line, "ms clock") {
			out = append(out, line)
		}
	}
	return out
}

// errorLines returns the error lines of Caddy's log.
func (c *caddyTarget) errorLines() []string {
	b, _ := os.ReadFile(c.logPath)
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, `"level":"error"`) || strings.HasPrefix(line, "panic:") || strings.Contains(line, "fatal error:") {
			out = append(out, line)
		}
	}
	return out
}

// makeJobs starts n jobs with Prefer: respond-async over HTTP/2, and waits until the upstream
// holds every one (so each is running and its token known).
func (c *caddyTarget) makeJobs(ctx context.Context, n int) ([]job, error) {
	cl := h2Client()
	defer cl.CloseIdleConnections()
	jobs := make([]job, n)
	errc := make(chan error, n)
	sem := make(chan struct{}, 32)
	var wg sync.WaitGroup
	for i := range jobs {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, fmt.Sprintf("https://127.0.0.1:%d/work/%d", c.tlsPort, i), strings.NewReader(`{"n":1}`))
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
			j.events = fmt.Sprintf("https://127.0.0.1:%d%s", c.tlsPort, doc.Links.Events)
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

func (c *caddyTarget) profile(ctx context.Context, seconds int, path string) error {
	return fetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/profile?seconds=%d", c.admin, seconds), path)
}

func (c *caddyTarget) trace(ctx context.Context, seconds int, path string) error {
	return fetchProfile(ctx, fmt.Sprintf("http://%s/debug/pprof/trace?seconds=%d", c.admin, seconds), path)
}

func (c *caddyTarget) close() {
	if c.proc != nil {
		c.proc.Stop(20 * time.Second)
	}
}

// fetchProfile saves a pprof profile served at url.
func fetchProfile(ctx context.Context, url, path string) error {
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
	return os.WriteFile(path, b, 0o644)
}

// freePorts returns n distinct loopback TCP ports nothing listens on.
func freePorts(n int) ([]int, error) {
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

// h2Client is an HTTP/2-only client over TLS that trusts any certificate (loopback only).
func h2Client() *http.Client {
	return &http.Client{Transport: h2Transport(), Timeout: 30 * time.Second}
}

func h2Transport() *http.Transport {
	tr := &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}, ForceAttemptHTTP2: true}
	tr.Protocols = new(http.Protocols)
	tr.Protocols.SetHTTP2(true)
	return tr
}

var errNotSupported = errors.New("not supported")
