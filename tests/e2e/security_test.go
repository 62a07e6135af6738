package e2e

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddy-progress/progress/upstreamhook"
)

// randomText is a fresh secret-looking value, so that finding it anywhere can only mean it was
// copied there.
func randomText(prefix string) string {
	b := make([]byte, 18)
	rand.Read(b)
	return prefix + base64.RawURLEncoding.EncodeToString(b)
}

// missingID is a well-formed job id nobody was given: id with its last character changed
// (32 base64url characters carry 24 bytes exactly, so every spelling is canonical).
func missingID(id string) string {
	swap := "A"
	if strings.HasSuffix(id, "A") {
		swap = "B"
	}
	return id[:len(id)-1] + swap
}

// TestSecurityOwnerBinding: on a route with `owner {http.request.header.Authorization}`, every
// job endpoint (status, long-poll by ?after and by If-None-Match, the HTML page, events, resume,
// result, result long-poll, HEAD, cancel, delete) answers a caller with another Authorization,
// or none, exactly as it answers for a job that does not exist: 404, the same body, the same
// headers apart from Date. Nothing the intruder sends changes the job; its owner still gets
// every endpoint. The times of the two 404s are recorded, not asserted (see
// engine.TestForeignAndMissingJobDoTheSameWork for why their work is the same).
func TestSecurityOwnerBinding(t *testing.T) {
	s := startSecureCaddy(t)
	forEachProtocol(t, s.caddyProc, func(t *testing.T, cl *client) {
		alice := []string{"Authorization", randomText("Bearer alice-")}
		bob := []string{"Authorization", randomText("Bearer bob-")}
		running, _ := cl.startJob(t, http.MethodGet, "/owned/hang", nil, alice...)
		finished, _ := cl.startJob(t, http.MethodGet, "/owned/slow?ms=1", nil, alice...)
		if r := cl.get(t, "/_jobs/"+finished.ID+"/result?wait=20s", alice...); r.StatusCode != http.StatusOK {
			t.Fatalf("alice's finished job: result %d\n%s", r.StatusCode, r.body)
		}

		endpoints := []struct {
			name, method, suffix string
			hdrs                 []string
		}{
			{"status", "GET", "", nil},
			{"status HEAD", "HEAD", "", nil},
			{"long-poll after", "GET", "?after=1&wait=1s", nil},
			{"long-poll If-None-Match", "GET", "", []string{"If-None-Match", `"1"`, "Prefer", "wait=1"}},
			{"html page", "GET", "", []string{"Accept", "text/html"}},
			{"events", "GET", "/events", []string{"Accept", "text/event-stream"}},
			{"events resume", "GET", "/events", []string{"Accept", "text/event-stream", "Last-Event-ID", "1"}},
			{"events resume query", "GET", "/events?last_event_id=1", nil},
			{"result", "GET", "/result", nil},
			{"result HEAD", "HEAD", "/result", nil},
			{"result wait", "GET", "/result?wait=1s", nil},
			{"cancel", "POST", "/cancel", nil},
			{"delete", "DELETE", "", nil},
		}
		var foreignTimes, missingTimes []time.Duration
		for _, job := range []jobDoc{running, finished} {
			for _, ep := range endpoints {
				ref := cl.do(t, ep.method, "/_jobs/"+missingID(job.ID)+ep.suffix, nil, append(slices.Clone(bob), ep.hdrs...)...)
				if ref.StatusCode != http.StatusNotFound {
					t.Fatalf("%s of a missing job: %d, want 404\n%s", ep.name, ref.StatusCode, ref.body)
				}
				if ep.method != "HEAD" {
					wantProblem(t, ref, http.StatusNotFound)
				}
				if strings.Contains(string(ref.body), job.ID[:20]) {
					t.Errorf("%s: the 404 names the id: %s", ep.name, ref.body)
				}
				for _, who := range []struct {
					name string
					hdrs []string
				}{{"bob", bob}, {"nobody", nil}} {
					r := cl.do(t, ep.method, "/_jobs/"+job.ID+ep.suffix, nil, append(slices.Clone(who.hdrs), ep.hdrs...)...)
					if r.StatusCode != ref.StatusCode || string(r.body) != string(ref.body) {
						t.Errorf("%s of %s's view of alice's %s job: %d %s, a missing job: %d %s",
							ep.name, who.name, job.State, r.StatusCode, r.body, ref.StatusCode, ref.body)
					}
					if a, b := headerLines(r.Header), headerLines(ref.Header); a != b {
						t.Errorf("%s: headers for %s on alice's job differ from a missing job's:\n%s\nvs\n%s", ep.name, who.name, a, b)
					}
				}
			}
			// Recorded, not asserted: 50 alternating reads of each kind.
			for range 50 {
				r := cl.get(t, "/_jobs/"+job.ID, bob...)
				foreignTimes = append(foreignTimes, r.elapsed)
				r = cl.get(t, "/_jobs/"+missingID(job.ID), bob...)
				missingTimes = append(missingTimes, r.elapsed)
			}
		}
		t.Logf("%s: 404 times over %d reads each: someone else's job median %v p90 %v; missing job median %v p90 %v",
			cl.proto, len(foreignTimes), quantile(foreignTimes, 0.5), quantile(foreignTimes, 0.9),
			quantile(missingTimes, 0.5), quantile(missingTimes, 0.9))

		// Bob's cancel and delete did nothing: alice's running job still runs, at the upstream too.
		if d := decodeJSON[jobDoc](t, cl.get(t, "/_jobs/"+running.ID, alice...)); d.State != "running" {
			t.Errorf("alice's job after bob's cancel and delete: %s, want running", d.State)
		}
		if seen := upstreamSeen(t, running.ID, "", 0); !seen.Started || seen.CtxDone {
			t.Errorf("alice's upstream request after bob's cancel: %+v, want started and not ended", seen)
		}
		// Alice has every endpoint.
		for _, ep := range []struct {
			method, path string
			status       int
		}{
			{"GET", "/_jobs/" + finished.ID, 200},
			{"GET", "/_jobs/" + finished.ID + "/result", 200},
			{"GET", "/_jobs/" + finished.ID + "/events?last_event_id=999", 204},
			{"POST", "/_jobs/" + running.ID + "/cancel", 200},
			{"DELETE", "/_jobs/" + running.ID, 204},
			{"DELETE", "/_jobs/" + finished.ID, 204},
			{"GET", "/_jobs/" + finished.ID, 404},
		} {
			if r := cl.do(t, ep.method, ep.path, nil, alice...); r.StatusCode != ep.status {
				t.Errorf("alice: %s %s: %d, want %d\n%s", ep.method, ep.path, r.StatusCode, ep.status, r.body)
			}
		}
	})
}

// headerLines is a response's headers less Date, one "Name: value" a line, sorted.
func headerLines(h http.Header) string {
	var lines []string
	for k, vs := range h {
		if k == "Date" {
			continue
		}
		for _, v := range vs {
			lines = append(lines, k+": "+v)
		}
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}

func quantile(ds []time.Duration, q float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))]
}

// TestSecurityNoTokenInLogsOrDocuments runs jobs that report progress through the callback
// listener with Caddy's debug log and access logs on, then looks for every token the upstream
// was given (computed from the callback_secret and checked against the hash the upstream
// answers with) in Caddy's log, in every job document, event and result the API serves, and in
// the store file and its results folder. None may hold one; nor may any hold the
// callback_secret. The log must hold debug lines about these jobs, or the check proves nothing.
func TestSecurityNoTokenInLogsOrDocuments(t *testing.T) {
	s := startSecureCaddy(t)
	signer := upstreamhook.NewSigner([]byte(testCallbackSecret))
	cl := s.newClient(t, "h2")
	type started struct {
		id   string
		hdrs []string
	}
	var jobs []started
	for i := range 6 {
		path, hdrs := "/jobs/say", []string(nil)
		if i%2 == 1 {
			path, hdrs = "/owned/say", []string{"Authorization", randomText("Bearer owner-")}
		}
		body := fmt.Sprintf(`{"percent": %d, "stage": "step", "message": "job %d"}`, 10*(i+1), i)
		doc, _ := cl.startJob(t, http.MethodPost, path, []byte(body), append([]string{"Content-Type", "application/json"}, hdrs...)...)
		jobs = append(jobs, started{doc.ID, hdrs})
	}
	// A job whose upstream never reports (echo, which does not answer with its headers, unlike
	// slow), and one that fails: their tokens went out too.
	for _, path := range []string{"/jobs/echo", "/down/x"} {
		doc, _ := cl.startJob(t, http.MethodGet, path, nil)
		jobs = append(jobs, started{doc.ID, nil})
	}

	tokens := make(map[string]string)
	var served strings.Builder // every document, event and result served
	for i, j := range jobs {
		res := cl.get(t, "/_jobs/"+j.id+"/result?wait=25s", j.hdrs...)
		served.Write(res.body)
		tokens["token of job "+j.id] = signer.Token(j.id)
		if i < 6 {
			wantStatus(t, res, http.StatusOK)
			say := decodeJSON[sayBody](t, res)
			sum := sha256.Sum256([]byte(signer.Token(j.id)))
			if say.Answer != http.StatusNoContent || say.TokenSHA256 != hex.EncodeToString(sum[:]) {
				t.Fatalf("job %s: the upstream's report got %d, its token hash %s; want 204 and the hash of the token computed here",
					j.id, say.Answer, say.TokenSHA256)
			}
		}
		doc := cl.get(t, "/_jobs/"+j.id, j.hdrs...)
		wantStatus(t, doc, http.StatusOK)
		served.Write(doc.body)
		served.Write(cl.get(t, "/_jobs/"+j.id, append([]string{"Accept", "text/html"}, j.hdrs...)...).body)
		stream := followRaw(t, cl, "/_jobs/"+j.id+"/events?last_event_id=0", j.hdrs...)
		if len(stream.Events) < 2 {
			t.Errorf("job %s: %d events, want its whole history", j.id, len(stream.Events))
		}
		served.Write(stream.Body)
	}
	tokens["callback_secret"] = testCallbackSecret
	for name, tok := range tokens {
		if strings.Contains(served.String(), tok) {
			t.Errorf("the API served the %s", name)
		}
	}

	s.stop() // everything is on disk and in the logs once Caddy has exited
	debugLines, jobLines := 0, 0
	for _, line := range s.logs.all() {
		if !strings.Contains(line, `"level":"debug"`) {
			continue
		}
		debugLines++
		if strings.Contains(line, jobs[0].id) {
			jobLines++
		}
	}
	if jobLines == 0 {
		t.Fatalf("the log has %d debug lines, none naming job %s: the debug log does not cover the jobs, so this test proves nothing", debugLines, jobs[0].id)
	}
	files := append([]string{s.logs.path}, filesUnder(t, s.storePath, s.storePath+".results")...)
	for name, where := range grepFiles(t, files, tokens) {
		t.Errorf("the %s is in %v", name, where)
	}

	// Without the filter, Caddy's reverse_proxy writes each token in its "upstream roundtrip"
	// debug line, as the Progress-Token request header (Caddy redacts only Authorization,
	// Cookie, Proxy-Authorization and Set-Cookie). That is the only place a token may be.
	unfiltered, err := os.ReadFile(s.unfilteredLog())
	if err != nil {
		t.Fatal(err)
	}
	roundtrips := 0
	for line := range strings.Lines(string(unfiltered)) {
		var entry struct {
			Logger  string `json:"logger"`
			Msg     string `json:"msg"`
			Request struct {
				Headers http.Header `json:"headers"`
			} `json:"request"`
		}
		for name, tok := range tokens {
			if !strings.Contains(line, tok) {
				continue
			}
			if err := json.Unmarshal([]byte(line), &entry); err != nil || entry.Logger != "http.handlers.reverse_proxy" ||
				entry.Msg != "upstream roundtrip" || entry.Request.Headers.Get("Progress-Token") != tok ||
				strings.Count(line, tok) != 1 {
				t.Errorf("the %s is in a log line other than reverse_proxy's upstream roundtrip header: %s", name, line)
			}
			roundtrips++
		}
	}
	if roundtrips != len(jobs) {
		t.Errorf("the unfiltered reverse_proxy log holds %d tokens, want one per job (%d): the filtered log's silence proves less than it seems", roundtrips, len(jobs))
	}
	t.Logf("%d tokens (6 acknowledged in a callback) and the secret, looked for in %d log lines (%d debug, filtered), %d bytes served, %d store files, and the unfiltered log",
		len(jobs), len(s.logs.all()), debugLines, served.Len(), len(files)-1)
}

// injections are strings made to end an SSE line and start fields of their own, in every
// spelling of a line end the format knows, plus the Unicode line and paragraph separators.
var injections = []string{
	"\nid: 999\nevent: done\ndata: {\"injected\":1}\n\n",
	"\r\nevent: done\r\ndata: x\r\n\r\n",
	"\rretry: 1\rdata: x\r\r",
	"\u2028id: 7\u2029\u0085: x",
	": comment\n\nid: 5",
}

// TestSecuritySSEFieldInjection sends hostile text into every string that reaches a job
// document, each by the way it really arrives: the request URI (percent-encoded line ends),
// stage, message, a data key and value (the upstream's own progress report, through the
// callback listener), and the error message (an upstream whose malformed answer the proxy
// quotes; an unreachable upstream). Each job's stream is read raw, over HTTP/1.1 and HTTP/2,
// and every line must be one the server writes (followRaw), every data line one JSON document,
// and the hostile text must come out of the JSON whole, in its field: it reached the event and
// stayed data.
func TestSecuritySSEFieldInjection(t *testing.T) {
	s := startSecureCaddy(t)
	for _, proto := range []string{"h1", "h2"} {
		t.Run(proto, func(t *testing.T) {
			cl := s.newClient(t, proto)
			evil := strings.Join(injections, "|")
			encoded := url.QueryEscape(evil)
			uriJob, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=1&q="+encoded+"&%0Aid:%20999=%0D%0Aevent:%20done", nil)

			report, _ := json.Marshal(map[string]any{
				"stage": injections[0] + injections[2], "message": evil,
				"data": map[string]any{evil: evil, "nested": []any{evil}},
			})
			sayJob, _ := cl.startJob(t, http.MethodPost, "/jobs/say?x="+encoded, report, "Content-Type", "application/json")
			rawJob, _ := cl.startJob(t, http.MethodGet, "/jobs/raw", nil)
			downJob, _ := cl.startJob(t, http.MethodGet, "/down/x?"+encoded, nil)

			for _, job := range []jobDoc{uriJob, sayJob, rawJob, downJob} {
				cl.result(t, job.ID) // wait for the end
				for _, path := range []string{job.Links.Events, job.Links.Events + "?last_event_id=0"} {
					stream := followRaw(t, cl, path)
					if stream.Status != http.StatusOK || len(stream.Events) == 0 {
						t.Fatalf("%s: status %d, %d events", path, stream.Status, len(stream.Events))
					}
					var last struct {
						jobDoc
						Progress *struct {
							Stage   string         `json:"stage"`
							Message string         `json:"message"`
							Data    map[string]any `json:"data"`
						} `json:"progress"`
					}
					if err := json.Unmarshal([]byte(stream.Events[len(stream.Events)-1].Data), &last); err != nil {
						t.Fatal(err)
					}
					switch job.ID {
					case uriJob.ID:
						if !strings.Contains(last.Request.URI, encoded) || !strings.Contains(last.Request.URI, "%0Aid:%20999") {
							t.Errorf("the request URI did not reach the event as sent: %q", last.Request.URI)
						}
					case sayJob.ID:
						if last.Progress == nil || last.Progress.Message != evil || last.Progress.Stage != injections[0]+injections[2] ||
							last.Progress.Data[evil] != evil {
							t.Errorf("the report did not reach the event whole: %+v (the upstream's /say: %s)", last.Progress, cl.result(t, job.ID).body)
						}
					case rawJob.ID:
						if last.Error == nil || !strings.Contains(last.Error.Message, "id: 999") {
							t.Errorf("the upstream's malformed header did not reach the error message: %+v", last.Error)
						}
					case downJob.ID:
						if last.Error == nil || last.Error.Code != "upstream_unreachable" || !strings.Contains(last.Request.URI, encoded) {
							t.Errorf("unreachable upstream: error %+v, URI %q", last.Error, last.Request.URI)
						}
					}
				}
			}
		})
	}
}

// TestSecurityNoClientSecretOnDisk sends jobs carrying Authorization (also the owner
// expression), Cookie and Proxy-Authorization, with bodies small and large enough to spool and
// results small and large enough for the results folder, lets them finish, stops Caddy, then
// looks for each secret value, and for its unkeyed SHA-256, in every file Caddy wrote: the
// store file, its results folder, the temporary folder it spools to (spool files are unlinked
// as soon as they are made, so only a leftover would show there), its data and config
// folders. None may hold one. The access and debug logs are checked the same way (Caddy
// redacts these three headers in its logs).
func TestSecurityNoClientSecretOnDisk(t *testing.T) {
	spool := filepath.Join(t.TempDir(), "tmp")
	if err := os.Mkdir(spool, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TMPDIR", spool) // Caddy inherits it: spooled request bodies land where we look
	s := startSecureCaddy(t)
	cl := s.newClient(t, "h2")
	secrets := map[string]string{
		"Authorization":       randomText("Bearer auth-"),
		"Cookie":              "session=" + randomText("cookie-"),
		"Proxy-Authorization": "Basic " + randomText("proxy-"),
	}
	hdrs := []string{"Content-Type", "application/octet-stream"}
	for k, v := range secrets {
		hdrs = append(hdrs, k, v)
	}
	large := make([]byte, 3<<20) // past spool_above (1 MiB): spooled to a file
	rand.Read(large)
	var ids []string
	for _, req := range []struct {
		path string
		body []byte
		idem string
	}{
		{"/owned/echo", []byte("small body"), randomText("idem-")},
		{"/owned/echo", large, ""},
		{"/owned/large?size=300000", nil, ""}, // past 64 KiB: the result goes to the results folder
		{"/jobs/slow?ms=1", nil, ""},
		{"/jobs/echo", large, randomText("idem-")},
	} {
		h := hdrs
		if req.idem != "" {
			h = append(slices.Clone(h), "Idempotency-Key", req.idem)
		}
		method := http.MethodPost
		if req.body == nil {
			method = http.MethodGet
		}
		doc, _ := cl.startJob(t, method, req.path, req.body, h...)
		ids = append(ids, doc.ID)
		res := cl.get(t, "/_jobs/"+doc.ID+"/result?wait=25s", hdrs...)
		wantStatus(t, res, http.StatusOK)
	}
	// Plain proxying (no Prefer) with the same headers writes nothing; it is here so the logs
	// see the headers on that path too.
	wantStatus(t, cl.do(t, http.MethodGet, "/owned/slow?ms=1", nil, hdrs...), http.StatusOK)

	s.stop()
	needles := make(map[string]string)
	for k, v := range secrets {
		needles[k] = v
		_, bare, _ := strings.Cut(v, " ")
		if bare == "" {
			_, bare, _ = strings.Cut(v, "=")
		}
		needles[k+" (value without its scheme)"] = bare
		sum := sha256.Sum256([]byte(v))
		needles[k+" (unkeyed SHA-256, hex)"] = hex.EncodeToString(sum[:])
		needles[k+" (unkeyed SHA-256, raw)"] = string(sum[:])
	}
	files := filesUnder(t, s.dir, spool)
	results := filesUnder(t, s.storePath+".results")
	if len(results) == 0 {
		t.Fatalf("no file in %s.results: the large result did not go there, so that folder went unchecked", s.storePath)
	}
	if _, err := os.Stat(s.storePath); err != nil {
		t.Fatal(err)
	}
	for name, where := range grepFiles(t, files, needles) {
		t.Errorf("the client's %s is on disk in %v", name, where)
	}
	t.Logf("%d jobs with Authorization, Cookie and Proxy-Authorization; looked in %d files (store, %d result files, spool folder, Caddy's data, config and logs)",
		len(ids), len(files), len(results))
}

// TestSecurityCallbackOffThePublicListener: with Caddyfile.example's two lines (respond 404 for
// the callback path on the public site, bind 127.0.0.1 on the callback site), a report with a
// job's valid token is refused on the public site over HTTP/1.1, HTTP/2 and HTTP/3 and changes
// nothing, while the same report to the callback listener is taken; and the kernel's socket
// table shows the callback listener bound to 127.0.0.1 alone, not to every interface.
func TestSecurityCallbackOffThePublicListener(t *testing.T) {
	s := startSecureCaddy(t)
	signer := upstreamhook.NewSigner([]byte(testCallbackSecret))
	h2 := s.newClient(t, "h2")
	job, _ := h2.startJob(t, http.MethodGet, "/jobs/hang", nil)
	auth := []string{"Authorization", "Bearer " + signer.Token(job.ID), "Content-Type", "application/json"}
	path := "/_jobs/" + job.ID + "/progress"
	for _, proto := range protocols {
		cl := s.newClient(t, proto)
		r := cl.do(t, http.MethodPost, path, []byte(`{"percent": 13}`), auth...)
		if r.StatusCode != http.StatusNotFound {
			t.Errorf("%s: a callback on the public site got %d, want 404\n%s", proto, r.StatusCode, r.body)
		}
	}
	if d := h2.job(t, job.ID); d.Progress != nil {
		t.Errorf("a report refused on the public site changed the job: %+v", d.Progress)
	}
	internal := &client{proto: "h1", major: 1, base: "http://127.0.0.1:" + strconv.Itoa(s.callbackPort), hc: &http.Client{}}
	r := internal.do(t, http.MethodPost, path, []byte(`{"percent": 42}`), auth...)
	wantStatus(t, r, http.StatusNoContent)
	if d := h2.job(t, job.ID); d.Progress == nil || d.Progress.Percent == nil || *d.Progress.Percent != 42 {
		t.Errorf("the report on the callback listener did not land: %+v", d.Progress)
	}
	h2.do(t, http.MethodPost, "/_jobs/"+job.ID+"/cancel", nil)

	addrs := listenAddrs(t, s.callbackPort)
	if len(addrs) == 0 {
		t.Fatalf("no listening socket on port %d in /proc/net/tcp{,6}", s.callbackPort)
	}
	for _, a := range addrs {
		if a != "127.0.0.1" {
			t.Errorf("the callback listener (port %d) is bound to %s; want 127.0.0.1 only", s.callbackPort, a)
		}
	}
}

// listenAddrs reads the kernel's TCP socket tables for listening sockets on port and returns
// their local addresses. Linux only; elsewhere the test skips.
func listenAddrs(t *testing.T, port int) []string {
	t.Helper()
	var addrs []string
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(table)
		if os.IsNotExist(err) && table == "/proc/net/tcp" {
			t.Skip("no /proc/net/tcp: cannot see which address a listener is bound to")
		}
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(b)) {
			f := strings.Fields(line)
			if len(f) < 4 || f[3] != "0A" { // 0A: LISTEN
				continue
			}
			host, p, ok := strings.Cut(f[1], ":")
			if n, err := strconv.ParseUint(p, 16, 16); !ok || err != nil || int(n) != port {
				continue
			}
			raw, err := hex.DecodeString(host)
			if err != nil {
				t.Fatalf("%s: %q", table, line)
			}
			// The kernel prints each 32-bit word in host byte order (little-endian here).
			for i := 0; i+4 <= len(raw); i += 4 {
				raw[i], raw[i+1], raw[i+2], raw[i+3] = raw[i+3], raw[i+2], raw[i+1], raw[i]
			}
			addrs = append(addrs, net.IP(raw).String())
		}
	}
	return addrs
}
