package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The security tests run their own Caddyfile (secureCaddyfile): Caddy's debug log on, access
// logs on every site, a known callback_secret (so the test can compute every token the upstream
// was given and look for it), an owner-bound route, and the callback listener on a port of its
// own, bound to loopback, as Caddyfile.example shows.

// testCallbackSecret is the callback_secret of the security tests' Caddy.
const testCallbackSecret = "e2e-security-callback-secret-0123456789abcdef"

// secureCaddy is a Caddy started with secureCaddyfile.
type secureCaddy struct {
	*caddyProc
	callbackPort int
}

// startSecureCaddy starts Caddy with secureCaddyfile and stops it when the test ends. It
// builds the caddyProc the way startCaddy does, with another configuration.
func startSecureCaddy(t *testing.T) *secureCaddy {
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
	}
	s := &secureCaddy{caddyProc: c, callbackPort: freePort(t, false)}
	if err := os.WriteFile(c.configPath, []byte(s.caddyfile()), 0o600); err != nil {
		t.Fatal(err)
	}
	s.start()
	t.Cleanup(func() {
		c.stop()
		if t.Failed() {
			c.dumpLog()
		}
	})
	return s
}

// start is caddyProc.start with a TLS wait bounded by time alone: caddyProc.waitTLS retries
// on every new log line, at most 300 times, and the debug log writes lines so fast that the
// tries run out in half a second, before Caddy has issued its certificate.
func (s *secureCaddy) start() {
	c, t := s.caddyProc, s.t
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
		cmd.Wait()
		logs.close()
		close(exited)
	}()
	if _, err := c.logs.waitFor(0, 30*time.Second, exited, `"serving initial configuration"`); err != nil {
		c.dumpLog()
		c.stop()
		t.Fatalf("caddy did not start: %v", err)
	}
	// Caddy logs when the certificate is in its cache; try after each such line, or every
	// 100ms, for at most 30s.
	rootPath := filepath.Join(c.dir, "storage", "pki", "authorities", "local", "root.crt")
	deadline := time.Now().Add(30 * time.Second)
	var lastErr error
	for time.Now().Before(deadline) {
		mark := c.logs.count()
		if lastErr = c.tryTLS(rootPath); lastErr == nil {
			return
		}
		c.logs.waitFor(mark, 100*time.Millisecond, c.exited, "certificate obtained successfully")
	}
	c.dumpLog()
	c.stop()
	t.Fatalf("caddy's TLS site never became ready: %v", lastErr)
}

// caddyfile: the client sites serve
//
//	/owned/*  jobs bound to the caller's Authorization header
//	/jobs/*   jobs bound to nobody
//	/down/*   jobs against an upstream that is not listening
//
// and the callbacks come to their own listener on 127.0.0.1 (callback_base of both routes).
func (s *secureCaddy) caddyfile() string {
	c := s.caddyProc
	return fmt.Sprintf(`{
	debug
	# What the README's Security section advises with debug on: reverse_proxy's debug lines
	# carry every header sent upstream, Progress-Token included, so the filter deletes it.
	log default {
		output stderr
		level DEBUG
		format filter {
			wrap json
			fields {
				request>headers>Progress-Token delete
			}
		}
	}
	# Every line again, unfiltered, to show what the filter removes and that nothing else
	# holds a token. (No include: a log that includes a logger takes it from the default log.)
	log unfiltered {
		output file %[10]s
		level DEBUG
		format json
	}
	admin %[1]s
	skip_install_trust
	auto_https disable_redirects
	default_bind 127.0.0.1
	http_port %[2]d
	https_port %[3]d
	storage file_system %[4]s
	progress {
		store %[5]s
		heartbeat 1s
		max_wait 30s
		callback_secret %[6]s
	}
}

(client_routes) {
	log
	respond /_jobs/*/progress 404 # callbacks only on the internal listener, as in Caddyfile.example
	progress_api
	progress /owned/* {
		owner {http.request.header.Authorization}
		callback_base http://127.0.0.1:%[9]d
	}
	progress /jobs/* {
		callback_base http://127.0.0.1:%[9]d
	}
	progress /down/*
	reverse_proxy /down/* %[7]s
	reverse_proxy %[8]s
}

http://127.0.0.1:%[2]d {
	import client_routes
}

https://127.0.0.1:%[3]d {
	tls internal
	import client_routes
}

http://127.0.0.1:%[9]d {
	bind 127.0.0.1
	log
	progress_api
}
`, c.admin, c.httpPort, c.httpsPort, filepath.Join(c.dir, "storage"), c.storePath, testCallbackSecret,
		c.closedAddr, upstreamAddr, s.callbackPort, s.unfilteredLog())
}

// unfilteredLog is the file of Caddy's log lines without the Progress-Token filter.
func (s *secureCaddy) unfilteredLog() string { return filepath.Join(s.dir, "unfiltered.log") }

// sayBody is what the upstream's /say answers.
type sayBody struct {
	Answer      int    `json:"answer"`
	TokenSHA256 string `json:"token_sha256"`
}

// rawStream is one event stream read to its end, byte for byte.
type rawStream struct {
	Status int
	Body   []byte
	Events []rawEvent
}

type rawEvent struct {
	ID   string
	Type string
	Data string
}

// sseLine is every line this server may write on an event stream; anything else is a field a
// string in a job smuggled in.
var sseLine = regexp.MustCompile(`^(|retry: [0-9]+|: (stream open|heartbeat)|id: [0-9]+|event: (progress|done)|data: \{.*\})$`)

// followRaw reads path's event stream until the server closes it (at most 30s) and checks every
// line the way a browser would split them: on CR LF, LF and a lone CR. Each line must be one
// the server writes, each data line one JSON document, each event id, type and data in that
// order, and the stream must end after exactly one done.
func followRaw(t *testing.T, cl *client, path string, hdrs ...string) rawStream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, _, err := cl.send(ctx, http.MethodGet, path, nil, append([]string{"Accept", "text/event-stream"}, hdrs...)...)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s: reading the stream: %v (read so far: %q)", path, err, body)
	}
	out := rawStream{Status: resp.StatusCode, Body: body}
	if resp.StatusCode != http.StatusOK {
		return out
	}
	if bytes.IndexByte(body, '\r') >= 0 {
		t.Errorf("%s: the stream holds a CR, which ends a line for a browser:\n%q", path, body)
	}
	sc := bufio.NewScanner(bytes.NewReader(body))
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	sc.Split(sseLines)
	var cur rawEvent
	order := 0 // 0 expects id, 1 event, 2 data, 3 the blank line
	for sc.Scan() {
		line := sc.Text()
		if !sseLine.MatchString(line) {
			t.Errorf("%s: line %q is not one this server writes", path, line)
			continue
		}
		switch {
		case strings.HasPrefix(line, "id: "):
			cur, order = rawEvent{ID: line[4:]}, 1
		case strings.HasPrefix(line, "event: "):
			if order != 1 {
				t.Errorf("%s: %q not right after an id", path, line)
			}
			cur.Type, order = line[7:], 2
		case strings.HasPrefix(line, "data: "):
			if order != 2 {
				t.Errorf("%s: %q not right after an event line", path, line)
			}
			cur.Data, order = line[6:], 3
			if !json.Valid([]byte(cur.Data)) {
				t.Errorf("%s: data line is not one JSON document: %q", path, line)
			}
		case line == "" && order == 3:
			out.Events = append(out.Events, cur)
			order = 0
		case line == "" && order != 0:
			t.Errorf("%s: event %q ends before its data", path, cur.ID)
			order = 0
		}
	}
	if len(out.Events) == 0 || out.Events[len(out.Events)-1].Type != "done" {
		t.Errorf("%s: the stream did not end on done: %d events", path, len(out.Events))
	}
	for i, ev := range out.Events[:max(len(out.Events)-1, 0)] {
		if ev.Type != "progress" {
			t.Errorf("%s: event %d is %q before the end", path, i, ev.Type)
		}
	}
	return out
}

// sseLines splits like the event stream format: lines end in CR LF, LF, or CR.
func sseLines(data []byte, atEOF bool) (int, []byte, error) {
	for i, b := range data {
		switch b {
		case '\n':
			return i + 1, data[:i], nil
		case '\r':
			if i+1 < len(data) {
				if data[i+1] == '\n' {
					return i + 2, data[:i], nil
				}
				return i + 1, data[:i], nil
			}
			if atEOF {
				return i + 1, data[:i], nil
			}
			return 0, nil, nil // a CR LF may be split across reads
		}
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// filesUnder lists every regular file under dirs (those that exist).
func filesUnder(t *testing.T, dirs ...string) []string {
	t.Helper()
	var files []string
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if os.IsNotExist(err) {
				return nil
			}
			if err != nil {
				return err
			}
			if d.Type().IsRegular() {
				files = append(files, path)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return files
}

// grepFiles reports, for each needle, the files that hold it.
func grepFiles(t *testing.T, files []string, needles map[string]string) map[string][]string {
	t.Helper()
	found := make(map[string][]string)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatalf("reading %s: %v", f, err)
		}
		for name, needle := range needles {
			if bytes.Contains(b, []byte(needle)) {
				found[name] = append(found[name], f)
			}
		}
	}
	return found
}
