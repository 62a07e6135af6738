package browser

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
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
	"syscall"
	"testing"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/http3"
)

// The demo stack: the demo app and Caddy with examples/Caddyfile, the same file
// `./xcaddy.sh demo` runs, pointed by its environment variables at the test's own ports and
// folders.

// moduleRoot is the repository's root, seen from tests/browser (where go test runs).
const moduleRoot = "../.."

// buildBinaries builds Caddy with the plugin (tests/caddy, as the end-to-end tests do: the same
// modules as ./xcaddy.sh build, without needing xcaddy) and the demo app into dir.
func buildBinaries(dir string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("the go command is not on PATH: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	args := []string{"build", "-o", dir + string(filepath.Separator), "./tests/caddy", "./examples/demoapp"}
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = moduleRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// proc is a started child process whose output is kept line by line.
type proc struct {
	name   string
	cmd    *exec.Cmd
	out    *lines
	exited chan struct{}
}

func startProc(t *testing.T, name string, cmd *exec.Cmd, logPath string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: cmd, out: newLines(logPath), exited: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() {
		cmd.Wait() // returns once all output is in p.out
		p.out.close()
		close(p.exited)
	}()
	t.Cleanup(func() { p.stop(t) })
	return p
}

// stop ends the process with SIGTERM, as a service manager does, and reports a process that
// does not exit within 10 seconds (then killed).
func (p *proc) stop(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	timer := time.NewTimer(10 * time.Second)
	defer timer.Stop()
	select {
	case <-p.exited:
	case <-timer.C:
		p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("%s did not exit within 10s of SIGTERM", p.name)
	}
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// tail is the end of the process's output, for failure messages.
func (p *proc) tail(n int) string {
	all := p.out.all()
	if len(all) > n {
		all = all[len(all)-n:]
	}
	return fmt.Sprintf("last %d lines of %s's output (%s):\n%s", len(all), p.name, p.out.path, strings.Join(all, "\n"))
}

// startApp starts the demo app on a free loopback port, with work durations short enough for
// a test, and returns it with its address (the first line it prints).
func startApp(t *testing.T, bin, dir string, quiet time.Duration) (*proc, string) {
	t.Helper()
	cmd := exec.Command(bin, "-addr", "127.0.0.1:0",
		"-collect", "300ms", "-pages", "8", "-page", "250ms", "-quiet", quiet.String())
	p := startProc(t, "demoapp", cmd, filepath.Join(dir, "demoapp.log"))
	line, err := p.out.waitFor(0, 30*time.Second, p.exited, func(string) bool { return true })
	if err != nil {
		t.Fatalf("the demo app printed no address: %v\n%s", err, p.tail(20))
	}
	if _, _, err := net.SplitHostPort(line); err != nil {
		t.Fatalf("the demo app's first line is %q, not an address", line)
	}
	return p, line
}

// demoCaddy is Caddy running examples/Caddyfile.
type demoCaddy struct {
	*proc
	port    int    // the HTTPS site
	base    string // https://localhost:port
	dataDir string // XDG_DATA_HOME: Caddy's local CA is under it
	roots   *x509.CertPool
}

// startCaddy runs examples/Caddyfile with every port and folder of its own, and waits until
// the HTTPS site answers over HTTP/2 with a certificate from Caddy's local CA.
func startCaddy(t *testing.T, bin, dir, appAddr string) *demoCaddy {
	t.Helper()
	_, appPort, _ := net.SplitHostPort(appAddr)
	site, err := filepath.Abs(filepath.Join(moduleRoot, "examples", "site"))
	if err != nil {
		t.Fatal(err)
	}
	config, err := filepath.Abs(filepath.Join(moduleRoot, "examples", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	c := &demoCaddy{port: freePort(t, true), dataDir: filepath.Join(dir, "data")}
	c.base = "https://localhost:" + strconv.Itoa(c.port)
	for _, d := range []string{"home", "data", "config"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	cmd := exec.Command(bin, "run", "--config", config, "--adapter", "caddyfile")
	cmd.Dir = dir
	cmd.Env = append(cleanEnv(),
		"HOME="+filepath.Join(dir, "home"),
		"XDG_DATA_HOME="+c.dataDir,
		"XDG_CONFIG_HOME="+filepath.Join(dir, "config"),
		"DEMO_PORT="+strconv.Itoa(c.port),
		"DEMO_CALLBACK_PORT="+strconv.Itoa(freePort(t, false)),
		"DEMO_ADMIN_PORT="+strconv.Itoa(freePort(t, false)),
		"DEMO_APP_PORT="+appPort,
		"DEMO_STATE="+dir,
		"DEMO_SITE="+site,
	)
	c.proc = startProc(t, "caddy", cmd, filepath.Join(dir, "caddy.log"))
	c.waitReady(t)
	return c
}

// cleanEnv is the test's environment less what would point Caddy at the caller's own
// folders or admin endpoint, or set the demo's ports.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if k == "HOME" || strings.HasPrefix(k, "XDG_") || k == "CADDY_ADMIN" || strings.HasPrefix(k, "DEMO_") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// waitReady polls (every 100ms, for at most 60s) until the page answers 200 over HTTP/2 with
// a certificate that Caddy's local root signed: Caddy makes its CA and issues the
// certificate in the background after it starts, and nothing else signals that.
func (c *demoCaddy) waitReady(t *testing.T) {
	t.Helper()
	rootPath := filepath.Join(c.dataDir, "caddy", "pki", "authorities", "local", "root.crt")
	deadline := time.Now().Add(60 * time.Second)
	var lastErr error
	for time.Now().Before(deadline) {
		if !c.running() {
			t.Fatalf("caddy exited at start\n%s", c.tail(40))
		}
		if lastErr = c.tryPage(rootPath); lastErr == nil {
			return
		}
		select {
		case <-c.exited:
		case <-time.After(100 * time.Millisecond):
		}
	}
	t.Fatalf("caddy's demo site never answered: %v\n%s", lastErr, c.tail(40))
}

func (c *demoCaddy) tryPage(rootPath string) error {
	pem, err := os.ReadFile(rootPath)
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return fmt.Errorf("no certificate in %s", rootPath)
	}
	if err := c.getPage(roots, 2); err != nil {
		return err
	}
	c.roots = roots
	return nil
}

// getPage fetches the demo page over HTTP/major (1, 2, or 3 over QUIC), trusting roots, and
// checks the answer.
func (c *demoCaddy) getPage(roots *x509.CertPool, major int) error {
	tlsConf := &tls.Config{RootCAs: roots, ServerName: "localhost"}
	// The site binds 127.0.0.1 only, and "localhost" may resolve to ::1 first.
	addr := "127.0.0.1:" + strconv.Itoa(c.port)
	var rt http.RoundTripper
	switch major {
	case 1, 2:
		tr := &http.Transport{
			TLSClientConfig: tlsConf,
			DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", addr)
			},
			Protocols: new(http.Protocols),
		}
		tr.Protocols.SetHTTP1(major == 1)
		tr.Protocols.SetHTTP2(major == 2)
		defer tr.CloseIdleConnections()
		rt = tr
	case 3:
		tr := &http3.Transport{
			TLSClientConfig: tlsConf,
			Dial: func(ctx context.Context, _ string, tlsCfg *tls.Config, cfg *quic.Config) (*quic.Conn, error) {
				return quic.DialAddrEarly(ctx, addr, tlsCfg, cfg)
			},
		}
		defer tr.Close()
		rt = tr
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/", nil)
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != major || !strings.Contains(string(body), "caddy-progress demo") {
		return fmt.Errorf("GET / answered %s over %s, want 200 and the demo page over HTTP/%d", resp.Status, resp.Proto, major)
	}
	return nil
}

// checkLog reports what must never be in Caddy's output: panics, data races and errors of the
// progress plugin.
func (c *demoCaddy) checkLog(t *testing.T) {
	t.Helper()
	for _, line := range c.out.all() {
		switch {
		case strings.Contains(line, "WARNING: DATA RACE"), strings.HasPrefix(line, "panic:"),
			strings.Contains(line, `"msg":"panic`), strings.Contains(line, "fatal error:"):
			t.Errorf("caddy log: %s", line)
		case strings.Contains(line, `"level":"error"`) && strings.Contains(line, `"logger":"progress`):
			t.Errorf("caddy log, progress error: %s", line)
		}
	}
}

// freePort finds a loopback port nothing listens on; with udp the same number must be free
// over UDP too, for HTTP/3.
func freePort(t *testing.T, udp bool) int {
	t.Helper()
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ok := true
		if udp {
			pc, err := net.ListenPacket("udp", "127.0.0.1:"+strconv.Itoa(port))
			if err != nil {
				ok = false
			} else {
				pc.Close()
			}
		}
		ln.Close()
		if ok {
			return port
		}
	}
	t.Fatal("no free port found in 50 tries")
	return 0
}

// lines keeps a process's output, line by line, in memory and in a file, and wakes whoever
// waits for a line.
type lines struct {
	path    string
	mu      sync.Mutex
	file    *os.File
	partial []byte
	list    []string
	changed chan struct{} // closed and replaced on every new line
}

func newLines(path string) *lines {
	f, _ := os.OpenFile(path, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	return &lines{path: path, file: f, changed: make(chan struct{})}
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil {
		l.file.Write(p)
	}
	l.partial = append(l.partial, p...)
	added := false
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		l.list = append(l.list, strings.TrimSuffix(string(l.partial[:i]), "\r"))
		l.partial = l.partial[i+1:]
		added = true
	}
	if added {
		close(l.changed)
		l.changed = make(chan struct{})
	}
	return len(p), nil
}

func (l *lines) close() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.file != nil {
		l.file.Close()
		l.file = nil
	}
}

func (l *lines) all() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.list...)
}

func (l *lines) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.list)
}

// waitFor returns the first line at or after index from that match accepts; it gives up when
// the process exits or the timeout passes.
func (l *lines) waitFor(from int, timeout time.Duration, exited <-chan struct{}, match func(string) bool) (string, error) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		l.mu.Lock()
		for ; from < len(l.list); from++ {
			if match(l.list[from]) {
				line := l.list[from]
				l.mu.Unlock()
				return line, nil
			}
		}
		changed := l.changed
		l.mu.Unlock()
		select {
		case <-changed:
		case <-exited:
			return "", errors.New("the process exited")
		case <-timer.C:
			return "", fmt.Errorf("no such line within %v", timeout)
		}
	}
}
