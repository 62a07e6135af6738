// Package e2e tests caddy-progress end to end: the real Caddy binary built from tests/caddy, a
// real legacy upstream built from tests/upstream, and clients speaking HTTP/1.1, HTTP/2 over
// TLS and HTTP/3 over QUIC, all on loopback.
//
// TestMain builds both binaries once and starts the upstream; every test starts its own Caddy
// (own ports, admin endpoint, store file, data and config directories) and stops it at the end.
package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// Set up once by TestMain.
var (
	caddyBin     string // the Caddy binary with the plugin
	upstreamAddr string // host:port of the running upstream
	skipReason   string // set when the binaries cannot be built here: every test skips
)

var updateGolden = flag.Bool("update", false, "rewrite the golden files under testdata/ instead of comparing with them")

// protocols are the three ways every client-facing test talks to Caddy.
var protocols = []string{"h1", "h2", "h3"}

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	goBin, err := exec.LookPath("go")
	if err != nil {
		skipReason = "the go command is not on PATH, so the Caddy and upstream binaries cannot be built (" + err.Error() + ")"
		loud("SKIPPING EVERY END-TO-END TEST: " + skipReason)
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "progress-e2e-bin-")
	if err != nil {
		loud("e2e: " + err.Error())
		return 1
	}
	defer os.RemoveAll(dir)
	start := time.Now()
	if err := buildBinaries(goBin, dir); err != nil {
		loud("e2e: building the test binaries failed:\n" + err.Error())
		return 1
	}
	fmt.Fprintf(os.Stderr, "e2e: built caddy and upstream in %v\n", time.Since(start).Round(time.Millisecond))
	caddyBin = filepath.Join(dir, "caddy")
	up, err := startUpstream(filepath.Join(dir, "upstream"))
	if err != nil {
		loud("e2e: starting the upstream failed: " + err.Error())
		return 1
	}
	defer up.stop()
	upstreamAddr = up.addr
	return m.Run()
}

func loud(msg string) {
	line := strings.Repeat("!", 78)
	fmt.Fprintf(os.Stderr, "\n%s\n!!! %s\n%s\n\n", line, msg, line)
}

// raceCaddy builds Caddy with the race detector when PROGRESS_E2E_RACE=1: slower, but a data
// race in the plugin then fails the test that provoked it (see caddyProc.checkLog).
var raceCaddy = os.Getenv("PROGRESS_E2E_RACE") == "1"

func buildBinaries(goBin, dir string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if raceCaddy {
		args = append(args, "-race")
	}
	args = append(args, "./tests/caddy", "./tests/upstream")
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = filepath.Join("..", "..") // the module root, from tests/e2e
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// needBinaries skips the test, loudly, when TestMain could not build the binaries.
func needBinaries(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip("SKIPPED: " + skipReason)
	}
}

// ---------------------------------------------------------------------------------------------
// The upstream process

type upstreamProc struct {
	cmd    *exec.Cmd
	addr   string
	exited chan struct{}
}

func startUpstream(bin string) (*upstreamProc, error) {
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &upstreamProc{cmd: cmd, exited: make(chan struct{})}
	lines := make(chan string, 1)
	go func() {
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- strings.TrimSpace(line)
		io.Copy(io.Discard, r)
	}()
	go func() {
		cmd.Wait()
		close(p.exited)
	}()
	timer := time.NewTimer(30 * time.Second)
	defer timer.Stop()
	select {
	case line := <-lines:
		if _, _, err := net.SplitHostPort(line); err != nil {
			p.stop()
			return nil, fmt.Errorf("upstream printed %q, not an address", line)
		}
		p.addr = line
		return p, nil
	case <-p.exited:
		return nil, fmt.Errorf("upstream exited at once: %v", cmd.ProcessState)
	case <-timer.C:
		p.stop()
		return nil, errors.New("upstream printed no address within 30s")
	}
}

func (p *upstreamProc) stop() {
	p.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(5 * time.Second)
	defer timer.Stop()
	select {
	case <-p.exited:
	case <-timer.C:
		p.cmd.Process.Kill()
		<-p.exited
	}
}

// seenDoc is the upstream's account of one job's request (GET /seen on the upstream).
type seenDoc struct {
	Started             bool   `json:"started"`
	CtxDone             bool   `json:"ctx_done"`
	Finished            bool   `json:"finished"`
	Path                string `json:"path"`
	FinishedAtUnixNano  int64  `json:"finished_at_unix_nano"`
	CtxDoneBeforeReturn bool   `json:"ctx_done_before_return"`
}

// upstreamSeen asks the upstream what happened to job id's request. With until set
// (started, ctx_done or finished) the upstream answers as soon as that happened, or after wait.
func upstreamSeen(t *testing.T, id, until string, wait time.Duration) seenDoc {
	t.Helper()
	q := url.Values{"id": {id}}
	if until != "" {
		q.Set("until", until)
		q.Set("wait", wait.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), wait+10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+upstreamAddr+"/seen?"+q.Encode(), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("asking the upstream about job %s: %v", id, err)
	}
	defer resp.Body.Close()
	var doc seenDoc
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		t.Fatalf("upstream /seen: %v", err)
	}
	return doc
}

// ---------------------------------------------------------------------------------------------
// Caddy processes

// caddyOptions vary the Caddyfile of a test.
type caddyOptions struct {
	// Heartbeat is the global progress heartbeat; default 1s.
	Heartbeat string
	// Tracing puts Caddy's `tracing` directive in front of the job routes of both sites.
	Tracing bool
	// Env is added to Caddy's environment (read when Caddy starts, not on reload).
	Env []string
}

// caddyProc is one running Caddy. Its methods without a *testing.T report to the test that
// started it, so call them from that test's goroutine, not from sub-tests.
type caddyProc struct {
	t          *testing.T
	dir        string
	configPath string
	storePath  string
	admin      string // host:port of the admin endpoint
	httpPort   int    // plain HTTP/1.1 site
	httpsPort  int    // TLS site: HTTP/1.1 and HTTP/2 on TCP, HTTP/3 on UDP, same number
	closedAddr string // an address nothing listens on (the unreachable upstream)
	roots      *x509.CertPool
	logs       *logWatcher

	extraEnv []string

	cmd     *exec.Cmd
	exited  chan struct{}
	stopped bool
}

// startCaddy starts a Caddy for the test and stops it when the test ends.
func startCaddy(t *testing.T, opts caddyOptions) *caddyProc {
	t.Helper()
	needBinaries(t)
	dir := t.TempDir()
	c := &caddyProc{
		t: t, dir: dir,
		configPath: filepath.Join(dir, "Caddyfile"),
		storePath:  filepath.Join(dir, "progress.db"),
		admin:      "127.0.0.1:" + strconv.Itoa(freePort(t, false)),
		httpPort:   freePort(t, false),
		httpsPort:  freePort(t, true),
		closedAddr: "127.0.0.1:" + strconv.Itoa(freePort(t, false)),
		extraEnv:   opts.Env,
	}
	c.writeConfig(t, opts)
	c.start()
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			c.dumpLog()
		}
	})
	return c
}

// restart starts the same configuration and store again after stop.
func (c *caddyProc) restart() {
	c.t.Helper()
	c.start()
}

func (c *caddyProc) start() {
	t := c.t
	t.Helper()
	for _, d := range []string{"home", "data", "config"} {
		if err := os.MkdirAll(filepath.Join(c.dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	c.logs = newLogWatcher(filepath.Join(c.dir, "caddy.log"))
	cmd := exec.Command(caddyBin, "run", "--config", c.configPath, "--adapter", "caddyfile")
	cmd.Dir = c.dir
	cmd.Env = c.env()
	cmd.Stdout = c.logs
	cmd.Stderr = c.logs
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting caddy: %v", err)
	}
	c.cmd, c.exited, c.stopped = cmd, make(chan struct{}), false
	exited, logs := c.exited, c.logs
	go func() {
		cmd.Wait() // returns once Caddy's output is all in logs
		logs.close()
		close(exited)
	}()
	if _, err := c.logs.waitFor(0, 30*time.Second, exited, `"serving initial configuration"`); err != nil {
		c.dumpLog()
		c.stop()
		t.Fatalf("caddy did not start: %v", err)
	}
	c.waitTLS()
}

// env keeps the caller's environment but points every directory Caddy writes to into the
// test's own folder, so nothing global is touched.
func (c *caddyProc) env() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") || k == "CADDY_ADMIN" {
			continue
		}
		env = append(env, kv)
	}
	return append(append(env,
		"HOME="+filepath.Join(c.dir, "home"),
		"XDG_DATA_HOME="+filepath.Join(c.dir, "data"),
		"XDG_CONFIG_HOME="+filepath.Join(c.dir, "config"),
	), c.extraEnv...)
}

// waitTLS loads Caddy's local root and waits until the TLS site hands out its certificate:
// Caddy issues it in the background after it starts. Each failed handshake waits for Caddy's
// next log line (the issuance logs several), at most 100ms since the certificate reaches
// Caddy's cache a moment after the last of them, before it tries again.
func (c *caddyProc) waitTLS() {
	t := c.t
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	rootPath := filepath.Join(c.dir, "storage", "pki", "authorities", "local", "root.crt")
	var lastErr error
	for attempt := 0; attempt < 300 && time.Now().Before(deadline); attempt++ {
		mark := c.logs.count()
		lastErr = c.tryTLS(rootPath)
		if lastErr == nil {
			return
		}
		c.logs.waitFor(mark, 100*time.Millisecond, c.exited, "") // any new line
	}
	c.dumpLog()
	t.Fatalf("caddy's TLS site never became ready: %v", lastErr)
}

func (c *caddyProc) tryTLS(rootPath string) error {
	pem, err := os.ReadFile(rootPath)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", rootPath)
	}
	d := &net.Dialer{Timeout: 2 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", c.tlsAddr(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"h2"}})
	if err != nil {
		return err
	}
	conn.Close()
	c.roots = pool
	return nil
}

func (c *caddyProc) tlsAddr() string { return "127.0.0.1:" + strconv.Itoa(c.httpsPort) }

// stop ends Caddy with SIGTERM, as a service manager does, and fails the test if it does not
// exit within 10 seconds.
func (c *caddyProc) stop() {
	c.t.Helper()
	if c.cmd == nil || c.stopped {
		return
	}
	c.stopped = true
	if _, err := c.stopWithin(10 * time.Second); err != nil {
		c.t.Error(err)
	}
	c.checkLog()
}

// stopWithin sends SIGTERM and waits for the exit; past the bound it takes a goroutine dump
// through the admin endpoint, kills Caddy and reports the hang.
func (c *caddyProc) stopWithin(bound time.Duration) (time.Duration, error) {
	c.stopped = true
	start := time.Now()
	c.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-c.exited:
		return time.Since(start), nil
	case <-timer.C:
	}
	dump := c.goroutines()
	c.cmd.Process.Kill()
	<-c.exited
	return time.Since(start), fmt.Errorf("caddy did not exit within %v of SIGTERM; its goroutines then:\n%s", bound, dump)
}

func (c *caddyProc) goroutines() string {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.admin+"/debug/pprof/goroutine?debug=2", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "(no goroutine dump: " + err.Error() + ")"
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 256<<10))
	return string(b)
}

// waitInFlight waits until Caddy handles at least n requests at once, by its
// caddy_http_requests_in_flight metric. Nothing signals that a request has reached a handler,
// so this polls, every 20ms, for at most 10s.
func (c *caddyProc) waitInFlight(n int) {
	c.t.Helper()
	ticker := time.NewTicker(20 * time.Millisecond)
	defer ticker.Stop()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	got := 0
	for {
		got = c.inFlight()
		if got >= n {
			return
		}
		select {
		case <-ticker.C:
		case <-deadline.C:
			c.t.Fatalf("caddy handles %d requests, want %d, after 10s", got, n)
		}
	}
}

func (c *caddyProc) inFlight() int {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+c.admin+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	defer resp.Body.Close()
	total := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_http_requests_in_flight{") {
			continue
		}
		if v, err := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64); err == nil {
			total += int(v)
		}
	}
	return total
}

// checkLog fails the test on what must never be in Caddy's log: panics, data races, and
// errors of the progress plugin.
func (c *caddyProc) checkLog() {
	c.t.Helper()
	for _, line := range c.logs.all() {
		switch {
		case strings.Contains(line, "WARNING: DATA RACE"), strings.HasPrefix(line, "panic:"),
			strings.Contains(line, `"msg":"panic`), strings.Contains(line, "fatal error:"):
			c.t.Errorf("caddy log: %s", line)
		case strings.Contains(line, `"level":"error"`) && strings.Contains(line, `"logger":"progress`):
			c.t.Errorf("caddy log, progress error: %s", line)
		}
	}
}

func (c *caddyProc) dumpLog() {
	lines := c.logs.all()
	if len(lines) > 80 {
		lines = lines[len(lines)-80:]
	}
	c.t.Logf("last %d lines of caddy's log (%s):\n%s", len(lines), c.logs.path, strings.Join(lines, "\n"))
}

// caddyfile is the configuration every test runs: the plain-HTTP site serves HTTP/1.1, the
// TLS site HTTP/1.1, HTTP/2 and HTTP/3 (Caddy enables HTTP/3 on HTTPS by default, on the
// same port number over UDP). Both sites have the same routes:
//
//	/jobs/*    jobs (async prefer), with a callback base
//	/serial/*  jobs, one at a time (concurrency 1)
//	/timed/*   jobs with a 2s timeout
//	/down/*    jobs against an upstream that is not listening
//	anything else: plain proxying to the upstream
func (c *caddyProc) caddyfile(o caddyOptions) string {
	heartbeat := o.Heartbeat
	if heartbeat == "" {
		heartbeat = "1s"
	}
	tracing := ""
	if o.Tracing {
		tracing = "tracing"
	}
	return fmt.Sprintf(`{
	admin %[1]s
	metrics
	skip_install_trust
	auto_https disable_redirects
	default_bind 127.0.0.1
	http_port %[2]d
	https_port %[3]d
	storage file_system %[4]s
	progress {
		store %[5]s
		heartbeat %[6]s
		max_wait 30s
	}
}

(job_routes) {
	%[9]s
	progress_api
	progress /jobs/* {
		callback_base http://127.0.0.1:%[2]d
	}
	progress /serial/* {
		concurrency 1
	}
	progress /timed/* {
		timeout 2s
	}
	progress /down/*
	reverse_proxy /down/* %[7]s
	reverse_proxy %[8]s
}

http://127.0.0.1:%[2]d {
	import job_routes
}

https://127.0.0.1:%[3]d {
	tls internal
	import job_routes
}
`, c.admin, c.httpPort, c.httpsPort, filepath.Join(c.dir, "storage"), c.storePath, heartbeat, c.closedAddr, upstreamAddr, tracing)
}

func (c *caddyProc) writeConfig(t *testing.T, o caddyOptions) {
	t.Helper()
	if err := os.WriteFile(c.configPath, []byte(c.caddyfile(o)), 0o600); err != nil {
		t.Fatal(err)
	}
}

// reload rewrites the Caddyfile and runs `caddy reload` against the admin endpoint, bounded
// by 30 seconds; it returns how long the reload took.
func (c *caddyProc) reload(t *testing.T, o caddyOptions) (time.Duration, error) {
	t.Helper()
	c.writeConfig(t, o)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, caddyBin, "reload", "--config", c.configPath, "--adapter", "caddyfile", "--address", c.admin)
	cmd.Dir = c.dir
	cmd.Env = c.env()
	start := time.Now()
	out, err := cmd.CombinedOutput()
	took := time.Since(start)
	if err != nil {
		return took, fmt.Errorf("caddy reload: %v (after %v)\n%s", err, took, out)
	}
	return took, nil
}

// handedOut holds every port freePort returned, guarded by handedOutMu.
var (
	handedOutMu sync.Mutex
	handedOut   = make(map[int]bool)
)

// freePort finds a loopback port nothing listens on by listening on port 0 and closing; with
// udp, the same number must also be free over UDP (for HTTP/3). It never returns a port twice:
// once closed, a port can come back from the next listen on port 0, and two of a Caddy's
// listeners on one port (the admin endpoint and a site, say) both bind, with SO_REUSEPORT, and
// split the connections between them.
func freePort(t *testing.T, udp bool) int {
	t.Helper()
	handedOutMu.Lock()
	defer handedOutMu.Unlock()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		if handedOut[port] {
			ln.Close()
			continue
		}
		if udp {
			pc, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(port))
			if err != nil {
				ln.Close()
				continue
			}
			pc.Close()
		}
		ln.Close()
		handedOut[port] = true
		return port
	}
	t.Fatal("no free port found in 50 tries")
	return 0
}

// logWatcher keeps Caddy's output, line by line, in memory and in a file, and wakes those
// waiting for a line.
type logWatcher struct {
	path    string
	mu      sync.Mutex
	file    *os.File
	partial []byte
	lines   []string
	changed chan struct{} // closed and replaced on every new line
}

func newLogWatcher(path string) *logWatcher {
	f, _ := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	return &logWatcher{path: path, file: f, changed: make(chan struct{})}
}

func (w *logWatcher) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.file != nil {
		w.file.Write(p)
	}
	w.partial = append(w.partial, p...)
	added := false
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			break
		}
		w.lines = append(w.lines, string(w.partial[:i]))
		w.partial = w.partial[i+1:]
		added = true
	}
	if added {
		close(w.changed)
		w.changed = make(chan struct{})
	}
	return len(p), nil
}

func (w *logWatcher) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.file != nil {
		w.file.Close()
		w.file = nil
	}
}

func (w *logWatcher) count() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.lines)
}

func (w *logWatcher) all() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]string(nil), w.lines...)
}

// waitFor waits until a line at or after index from contains substr ("" for any line), the
// process exits, or the timeout passes.
func (w *logWatcher) waitFor(from int, timeout time.Duration, exited <-chan struct{}, substr string) (string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		w.mu.Lock()
		for i := from; i < len(w.lines); i++ {
			if strings.Contains(w.lines[i], substr) {
				line := w.lines[i]
				w.mu.Unlock()
				return line, nil
			}
		}
		from = len(w.lines)
		changed := w.changed
		w.mu.Unlock()
		select {
		case <-changed:
		case <-exited:
			return "", errors.New("caddy exited")
		case <-timer.C:
			return "", fmt.Errorf("no log line with %q within %v", substr, timeout)
		}
	}
}

// ---------------------------------------------------------------------------------------------
// Clients

// client talks to one Caddy over one protocol.
type client struct {
	proto string
	major int // the HTTP major version every response must have
	base  string
	hc    *http.Client
}

// newClient makes a client for proto: h1 (plain HTTP/1.1), h2 (HTTP/2 over TLS, trusting
// Caddy's local root) or h3 (quic-go's HTTP/3 client, same trust).
func (c *caddyProc) newClient(t *testing.T, proto string) *client {
	t.Helper()
	var rt http.RoundTripper
	closeAll := func() {}
	cl := &client{proto: proto}
	tlsConf := &tls.Config{RootCAs: c.roots, ServerName: "127.0.0.1"}
	switch proto {
	case "h1":
		cl.major, cl.base = 1, "http://127.0.0.1:"+strconv.Itoa(c.httpPort)
		rt = &http.Transport{DisableCompression: true, MaxIdleConnsPerHost: 16}
	case "h2":
		cl.major, cl.base = 2, "https://"+c.tlsAddr()
		tr := &http.Transport{TLSClientConfig: tlsConf, DisableCompression: true, ForceAttemptHTTP2: true}
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetHTTP2(true)
		rt = tr
	case "h3":
		cl.major, cl.base = 3, "https://"+c.tlsAddr()
		// Every connection is kept to be closed at the end: after a GOAWAY (a reload) the
		// transport can drop a live connection from its pool (removeClient deletes by host
		// name, whichever connection is there), and Close would leave that one open, holding
		// up Caddy's shutdown until the QUIC idle timeout.
		var mu sync.Mutex
		var conns []*quic.Conn
		tr := &http3.Transport{TLSClientConfig: tlsConf, DisableCompression: true,
			Dial: func(ctx context.Context, addr string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
				conn, err := quic.DialAddrEarly(ctx, addr, tlsCfg, cfg)
				if err == nil {
					mu.Lock()
					conns = append(conns, conn)
					mu.Unlock()
				}
				return conn, err
			},
		}
		rt = tr
		closeAll = func() {
			tr.Close()
			mu.Lock()
			defer mu.Unlock()

			for _, conn := range conns {
				conn.CloseWithError(0, "")
			}
		}
	default:
		t.Fatalf("unknown protocol %q", proto)
	}
	cl.hc = &http.Client{
		Transport: rt,
		// Location answers (202) are not redirects, but be sure nothing is followed.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	t.Cleanup(func() {
		cl.hc.CloseIdleConnections()
		closeAll()
	})
	return cl
}

// reply is a finished exchange: the response with its body read.
type reply struct {
	*http.Response
	body    []byte
	start   time.Time
	end     time.Time
	elapsed time.Duration
}

// do sends a request (headers as name, value pairs) and reads the whole answer, within 60s.
func (cl *client) do(t *testing.T, method, path string, body []byte, hdrs ...string) *reply {
	t.Helper()
	r, err := cl.try(method, path, body, hdrs...)
	if err != nil {
		t.Fatal(err)
	}
	cl.checkProto(t, r.Response)
	return r
}

// try is do for goroutines other than the test's: it returns what went wrong.
func (cl *client) try(method, path string, body []byte, hdrs ...string) (*reply, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, start, err := cl.send(ctx, method, path, body, hdrs...)
	if err != nil {
		return nil, fmt.Errorf("%s %s %s: %v", cl.proto, method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s %s %s: reading the body: %v", cl.proto, method, path, err)
	}
	if resp.ProtoMajor != cl.major {
		return nil, fmt.Errorf("%s %s %s: response came over %s, want HTTP/%d", cl.proto, method, path, resp.Proto, cl.major)
	}
	end := time.Now()
	return &reply{Response: resp, body: b, start: start, end: end, elapsed: end.Sub(start)}, nil
}

func (cl *client) get(t *testing.T, path string, hdrs ...string) *reply {
	t.Helper()
	return cl.do(t, http.MethodGet, path, nil, hdrs...)
}

func (cl *client) send(ctx context.Context, method, path string, body []byte, hdrs ...string) (*http.Response, time.Time, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, cl.base+path, rd)
	if err != nil {
		return nil, time.Time{}, err
	}
	for i := 0; i+1 < len(hdrs); i += 2 {
		req.Header.Add(hdrs[i], hdrs[i+1])
	}
	start := time.Now()
	resp, err := cl.hc.Do(req)
	return resp, start, err
}

func (cl *client) checkProto(t *testing.T, resp *http.Response) {
	t.Helper()
	if resp.ProtoMajor != cl.major {
		t.Errorf("%s: response came over %s, want HTTP/%d", cl.proto, resp.Proto, cl.major)
	}
}

// ---------------------------------------------------------------------------------------------
// Documents

// jobDoc is the job document (DESIGN.md section 3).
type jobDoc struct {
	ID            string `json:"id"`
	State         string `json:"state"`
	Seq           uint64 `json:"seq"`
	QueuePosition *int   `json:"queue_position"`
	Progress      *struct {
		Percent   *float64 `json:"percent"`
		Current   *float64 `json:"current"`
		Total     *float64 `json:"total"`
		Stage     string   `json:"stage"`
		Message   string   `json:"message"`
		Estimated bool     `json:"estimated"`
	} `json:"progress"`
	ETASeconds *float64 `json:"eta_seconds"`
	Request    struct {
		Method string `json:"method"`
		URI    string `json:"uri"`
	} `json:"request"`
	Response *struct {
		Status        int    `json:"status"`
		ContentType   string `json:"content_type"`
		ContentLength int64  `json:"content_length"`
	} `json:"response"`
	Error *struct {
		Code    string `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
	Links struct {
		Self   string `json:"self"`
		Events string `json:"events"`
		Result string `json:"result"`
		Cancel string `json:"cancel"`
	} `json:"links"`
}

func (d jobDoc) terminal() bool {
	return d.State == "succeeded" || d.State == "failed" || d.State == "canceled"
}

// problemDoc is an RFC 9457 problem document.
type problemDoc struct {
	Type   string `json:"type"`
	Title  string `json:"title"`
	Status int    `json:"status"`
	Detail string `json:"detail"`
}

// slowBody is what the upstream's /slow answers.
type slowBody struct {
	SleptMS          int    `json:"slept_ms"`
	Path             string `json:"path"`
	ProgressJobID    string `json:"progress_job_id"`
	ProgressCallback string `json:"progress_callback"`
	ProgressToken    string `json:"progress_token"`
	Prefer           string `json:"prefer"`
}

func decodeJSON[T any](t *testing.T, r *reply) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(r.body, &v); err != nil {
		t.Fatalf("decoding %T from a %d answer: %v\n%s", v, r.StatusCode, err, r.body)
	}
	return v
}

// wantStatus fails the test unless the reply has the status.
func wantStatus(t *testing.T, r *reply, status int) {
	t.Helper()
	if r.StatusCode != status {
		t.Fatalf("%s %s: status %d, want %d; body:\n%s", r.Request.Method, r.Request.URL, r.StatusCode, status, r.body)
	}
}

// wantProblem checks an application/problem+json answer with the status and returns it.
func wantProblem(t *testing.T, r *reply, status int) problemDoc {
	t.Helper()
	wantStatus(t, r, status)
	if ct := r.Header.Get("Content-Type"); ct != "application/problem+json" {
		t.Errorf("%s: Content-Type %q, want application/problem+json", r.Request.URL, ct)
	}
	p := decodeJSON[problemDoc](t, r)
	if p.Type == "" || p.Title == "" || p.Detail == "" || p.Status != status {
		t.Errorf("%s: problem document lacks type, title, detail or status %d: %+v", r.Request.URL, status, p)
	}
	return p
}

// startJob sends a request with Prefer: respond-async and checks the 202 answer.
func (cl *client) startJob(t *testing.T, method, path string, body []byte, hdrs ...string) (jobDoc, *reply) {
	t.Helper()
	r := cl.do(t, method, path, body, append([]string{"Prefer", "respond-async"}, hdrs...)...)
	wantStatus(t, r, http.StatusAccepted)
	doc := decodeJSON[jobDoc](t, r)
	if doc.ID == "" || doc.Links.Self != "/_jobs/"+doc.ID {
		t.Fatalf("202 without a usable job document: %s", r.body)
	}
	return doc, r
}

// job reads a job document.
func (cl *client) job(t *testing.T, id string) jobDoc {
	t.Helper()
	r := cl.get(t, "/_jobs/"+id)
	wantStatus(t, r, http.StatusOK)
	return decodeJSON[jobDoc](t, r)
}

// result waits (server side, up to 25s) for a job to end and returns its result answer.
func (cl *client) result(t *testing.T, id string) *reply {
	t.Helper()
	return cl.get(t, "/_jobs/"+id+"/result?wait=25s")
}

// ---------------------------------------------------------------------------------------------
// Server-Sent Events, followed the way a browser's EventSource does

type sseEvent struct {
	ID   string
	Type string
	Data string
	At   time.Time // when the event's blank line arrived
	Conn int       // which connection (0-based) delivered it
}

func (e sseEvent) seq() uint64 {
	n, _ := strconv.ParseUint(e.ID, 10, 64)
	return n
}

func (e sseEvent) doc(t *testing.T) jobDoc {
	t.Helper()
	var d jobDoc
	if err := json.Unmarshal([]byte(e.Data), &d); err != nil {
		t.Fatalf("event %s: data is not a job document: %v\n%s", e.ID, err, e.Data)
	}
	return d
}

type sseOptions struct {
	// LastEventID is sent on the first connection: as the Last-Event-ID header, or as
	// ?last_event_id= when Query is set.
	LastEventID string
	Query       bool
	// OnEvent, if set, sees every event as it arrives (from the follower's goroutine).
	OnEvent func(sseEvent)
	// MaxConns bounds the connections (the first and the reconnections); default 6.
	MaxConns int
	// MaxRetryDelay caps the server's retry: before a reconnection; default 200ms, so the
	// tests stay quick.
	MaxRetryDelay time.Duration
}

// sseConnect is one connection of a follower.
type sseConnect struct {
	Status      int
	Proto       int
	Header      http.Header
	Start       time.Time
	LastEventID string // what it asked to resume from
	Err         error  // the connection failed before an answer
}

type sseResult struct {
	Events     []sseEvent
	Connects   []sseConnect
	Heartbeats int
	Retry      time.Duration
	// Ended says how following ended: "done" (saw event: done), "204" (the server said
	// there is nothing more), or "" with Err set.
	Ended string
	// ClosedAfterDone: after done the server closed the stream (within 3s) with nothing
	// more on it.
	ClosedAfterDone bool
	Err             error
}

// follow reads a job's event stream like EventSource: it resumes with Last-Event-ID after
// the stream ends without done (a reload, a shutdown), stops on done or on a 204.
func (cl *client) follow(ctx context.Context, path string, o sseOptions) *sseResult {
	if o.MaxConns <= 0 {
		o.MaxConns = 6
	}
	if o.MaxRetryDelay <= 0 {
		o.MaxRetryDelay = 200 * time.Millisecond
	}
	res := &sseResult{Retry: 2 * time.Second}
	last := o.LastEventID
	for n := 0; n < o.MaxConns; n++ {
		if n > 0 {
			timer := time.NewTimer(min(res.Retry, o.MaxRetryDelay))
			select {
			case <-timer.C:
			case <-ctx.Done():
				timer.Stop()
				res.Err = ctx.Err()
				return res
			}
		}
		u := cl.base + path
		hdr := http.Header{"Accept": {"text/event-stream"}, "Cache-Control": {"no-cache"}}
		if last != "" {
			if o.Query && n == 0 {
				u += "?last_event_id=" + url.QueryEscape(last)
			} else {
				hdr.Set("Last-Event-ID", last)
			}
		}
		connCtx, cancel := context.WithCancel(ctx)
		req, _ := http.NewRequestWithContext(connCtx, http.MethodGet, u, nil)
		req.Header = hdr
		start := time.Now()
		resp, err := cl.hc.Do(req)
		if err != nil {
			cancel()
			res.Connects = append(res.Connects, sseConnect{Start: start, LastEventID: last, Err: err})
			if ctx.Err() != nil {
				res.Err = ctx.Err()
				return res
			}
			continue // EventSource reconnects after a network error
		}
		res.Connects = append(res.Connects, sseConnect{Status: resp.StatusCode, Proto: resp.ProtoMajor, Header: resp.Header, Start: start, LastEventID: last})
		if resp.StatusCode == http.StatusNoContent {
			resp.Body.Close()
			cancel()
			res.Ended = "204"
			return res
		}
		if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			cancel()
			res.Err = fmt.Errorf("connection %d: status %d, Content-Type %q: %s", n, resp.StatusCode, resp.Header.Get("Content-Type"), b)
			return res
		}
		done := readStream(resp.Body, cancel, n, &last, res, o.OnEvent)
		resp.Body.Close()
		cancel()
		if done {
			res.Ended = "done"
			return res
		}
		if ctx.Err() != nil {
			res.Err = ctx.Err()
			return res
		}
	}
	res.Err = fmt.Errorf("no done after %d connections", o.MaxConns)
	return res
}

// readStream parses one connection's stream (the WHATWG event stream format). It returns true
// after event: done, having checked that the server closes the stream then.
func readStream(body io.Reader, cancel context.CancelFunc, conn int, last *string, res *sseResult, onEvent func(sseEvent)) bool {
	r := bufio.NewReaderSize(body, 64<<10)
	var data []string
	var typ, id string
	hasID := false
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return false // the stream ended (or broke) without done
		}
		line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
		if line == "" {
			if hasID {
				*last = id
			}
			if len(data) > 0 {
				if typ == "" {
					typ = "message"
				}
				ev := sseEvent{ID: *last, Type: typ, Data: strings.Join(data, "\n"), At: time.Now(), Conn: conn}
				res.Events = append(res.Events, ev)
				if onEvent != nil {
					onEvent(ev)
				}
				if typ == "done" {
					res.ClosedAfterDone = closesSoon(r, cancel, 3*time.Second)
					return true
				}
			}
			data, typ, id, hasID = nil, "", "", false
			continue
		}
		if strings.HasPrefix(line, ":") {
			if strings.Contains(line, "heartbeat") {
				res.Heartbeats++
			}
			continue
		}
		field, value, _ := strings.Cut(line, ":")
		value = strings.TrimPrefix(value, " ")
		switch field {
		case "data":
			data = append(data, value)
		case "event":
			typ = value
		case "id":
			if !strings.Contains(value, "\x00") {
				id, hasID = value, true
			}
		case "retry":
			if ms, err := strconv.Atoi(value); err == nil {
				res.Retry = time.Duration(ms) * time.Millisecond
			}
		}
	}
}

// closesSoon reports whether the stream ends within d with nothing but comments on it.
func closesSoon(r *bufio.Reader, cancel context.CancelFunc, d time.Duration) bool {
	timer := time.AfterFunc(d, cancel)
	defer timer.Stop()
	for {
		line, err := r.ReadString('\n')
		if errors.Is(err, io.EOF) {
			return timer.Stop() // false if the timer had to cut the stream
		}
		if err != nil {
			return false
		}
		if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, ":") {
			return false // something after done
		}
	}
}

// seqs lists the events' ids.
func seqs(evs []sseEvent) []uint64 {
	out := make([]uint64, len(evs))
	for i, e := range evs {
		out[i] = e.seq()
	}
	return out
}

// checkStream asserts what every followed stream must satisfy: ids strictly increasing (so no
// event twice), every event's id is its document's seq, every event before the last is a
// progress event and the last the only done.
func checkStream(t *testing.T, name string, res *sseResult) {
	t.Helper()
	if res.Err != nil {
		t.Errorf("%s: %v", name, res.Err)
	}
	if res.Ended != "done" {
		t.Errorf("%s: stream ended %q, want on event: done", name, res.Ended)
	}
	var prev uint64
	for i, ev := range res.Events {
		s := ev.seq()
		if s <= prev {
			t.Errorf("%s: event %d has id %q after %d: ids must increase strictly (seqs %v)", name, i, ev.ID, prev, seqs(res.Events))
		}
		prev = s
		if d := ev.doc(t); d.Seq != s {
			t.Errorf("%s: event id %d carries a document with seq %d", name, s, d.Seq)
		}
		last := i == len(res.Events)-1
		switch {
		case last && ev.Type != "done":
			t.Errorf("%s: last event is %q, want done", name, ev.Type)
		case !last && ev.Type != "progress":
			t.Errorf("%s: event %d is %q before the end, want progress", name, i, ev.Type)
		}
	}
	for i, c := range res.Connects {
		if c.Err == nil && c.Status == http.StatusOK {
			if got := c.Header.Get("Cache-Control"); got != "no-store" {
				t.Errorf("%s: connection %d: Cache-Control %q, want no-store", name, i, got)
			}
			if got := c.Header.Get("X-Accel-Buffering"); got != "no" {
				t.Errorf("%s: connection %d: X-Accel-Buffering %q, want no", name, i, got)
			}
		}
	}
}

// forEachProtocol runs f for each protocol as a sub-test.
func forEachProtocol(t *testing.T, c *caddyProc, f func(t *testing.T, cl *client)) {
	for _, p := range protocols {
		t.Run(p, func(t *testing.T) {
			f(t, c.newClient(t, p))
		})
	}
}
