package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestUpstreamFaults: upstreams that break in the ways TestFailures (refused connection, 5xx,
// hang past the timeout) does not cover end in the documented state and error code
// (README "Job API" and "Errors", DESIGN.md section 3): a response reset or cut short in the
// middle of its body, a connection reset before any answer, a response that stalls past the
// job timeout after its headers, a body over max_result_size, and an upstream that reports
// progress after it answered. No failed job leaves a spooled body behind.
func TestUpstreamFaults(t *testing.T) {
	const limit = 1 << 20 // max_result_size of this Caddy
	c := startCaddyWith(t, caddyOptions{}, withGlobal(t, "max_result_size 1MiB"))
	resultsDir := c.storePath + ".results"
	goroutines, fds := c.goroutineCount(), c.fdCount(t)

	type fault struct {
		name, path string
		code       string // error.code of the failed job
		status     int    // of the /result problem
	}
	faults := []fault{
		// Headers, a tenth of the promised body, then RST: spooled past the 64 KiB kept inline.
		{"reset mid-body", "/jobs/reset?size=1000000&send=100000&how=rst", "upstream_incomplete", http.StatusBadGateway},
		// The same while the body is still small enough to be kept inline.
		{"reset mid-body, small", "/jobs/reset?size=5000&send=1000&how=rst", "upstream_incomplete", http.StatusBadGateway},
		// A clean close (FIN) before Content-Length bytes came.
		{"closed mid-body", "/jobs/reset?size=1000000&send=300000&how=fin", "upstream_incomplete", http.StatusBadGateway},
		// Reset before a status line: the proxy has no response at all.
		{"reset before answering", "/jobs/reset?how=empty", "upstream_unreachable", http.StatusBadGateway},
		// Headers and part of the body, then silence: the 2s job timeout wins.
		{"stalls mid-body past the timeout", "/timed/reset?size=1000000&send=100000&how=hang", "upstream_timeout", http.StatusGatewayTimeout},
		// One byte over max_result_size.
		{"body over the limit", "/jobs/large?size=" + strconv.Itoa(limit+1), "result_too_large", http.StatusBadGateway},
		// Four times the limit: the proxy stops reading instead of draining it.
		{"body far over the limit", "/jobs/large?size=" + strconv.Itoa(4*limit), "result_too_large", http.StatusBadGateway},
	}
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		docs := make([]jobDoc, len(faults))
		for i, f := range faults {
			docs[i], _ = cl.startJob(t, http.MethodGet, f.path, nil)
		}
		exact, _ := cl.startJob(t, http.MethodGet, "/jobs/large?size="+strconv.Itoa(limit), nil)
		late, _ := cl.startJob(t, http.MethodGet, "/jobs/late", nil)

		for i, f := range faults {
			r := cl.result(t, docs[i].ID)
			p := wantProblem(t, r, f.status)
			d := cl.job(t, docs[i].ID)
			if d.State != "failed" || d.Error == nil || d.Error.Code != f.code || d.Error.Message == "" {
				t.Errorf("%s: state %q error %+v, want failed with %s", f.name, d.State, d.Error, f.code)
			} else {
				t.Logf("%s: %s, %d, %s", f.name, d.Error.Code, r.StatusCode, d.Error.Message)
			}
			if d.Response != nil {
				t.Errorf("%s: the job keeps a response %+v; a broken or refused body is no response to replay", f.name, d.Response)
			}
			if !strings.Contains(p.Title, f.code) {
				t.Errorf("%s: problem title %q does not name %s", f.name, p.Title, f.code)
			}
			if p.Type == "" || !strings.HasSuffix(p.Type, "job-failed") {
				t.Errorf("%s: problem type %q, want the job-failed type", f.name, p.Type)
			}
			// The upstream's request is over: the proxy did not keep reading or waiting.
			if s := upstreamSeen(t, docs[i].ID, "finished", 10*time.Second); !s.Finished {
				t.Errorf("%s: the upstream's handler still runs after the job ended: %+v", f.name, s)
			}
		}

		// Exactly max_result_size is kept and replayed byte for byte.
		r := cl.result(t, exact.ID)
		wantStatus(t, r, http.StatusOK)
		sum := sha256.Sum256(r.body)
		if len(r.body) != limit || hex.EncodeToString(sum[:]) != r.Header.Get("X-Checksum") {
			t.Errorf("a body of exactly max_result_size: %d bytes, sha256 %x, X-Checksum %q", len(r.body), sum, r.Header.Get("X-Checksum"))
		}

		// A client waiting with Prefer: wait gets the oversized response passed through as it
		// streams; the job still fails, as nothing could be kept to replay.
		pass := cl.get(t, "/jobs/large?size="+strconv.Itoa(2*limit), "Prefer", "wait=20")
		wantStatus(t, pass, http.StatusOK)
		sum = sha256.Sum256(pass.body)
		if len(pass.body) != 2*limit || hex.EncodeToString(sum[:]) != pass.Header.Get("X-Checksum") {
			t.Errorf("passthrough of an oversized body: %d bytes, checksum match %v", len(pass.body), hex.EncodeToString(sum[:]) == pass.Header.Get("X-Checksum"))
		}

		// A Prefer: wait client the breaking response passes through sees the break (a
		// reset stream or a short body), never a complete-looking response.
		if r, err := cl.try(http.MethodGet, "/jobs/reset?size=1000000&send=100000&how=rst", nil, "Prefer", "wait=20"); err == nil {
			t.Errorf("passthrough of a response reset mid-body ended cleanly: %d, %d bytes", r.StatusCode, len(r.body))
		}

		// An upstream that reports after it answered: 409 job-finished, and the job stays as
		// it ended, its event log included.
		wantStatus(t, cl.result(t, late.ID), http.StatusOK)
		before := cl.job(t, late.ID)
		poke := pokeLate(t, late.ID)
		if poke.Status != http.StatusConflict || poke.ContentType != "application/problem+json" || !strings.Contains(poke.Body, "job-finished") {
			t.Errorf("a report after the answer got %d %q %s, want 409 job-finished", poke.Status, poke.ContentType, poke.Body)
		}
		after := cl.job(t, late.ID)
		if after.State != "succeeded" || after.Seq != before.Seq || after.Progress != nil {
			t.Errorf("after a late report: state %q seq %d progress %+v; before: state %q seq %d", after.State, after.Seq, after.Progress, before.State, before.Seq)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
		defer cancel()
		replay := cl.follow(ctx, late.Links.Events, sseOptions{LastEventID: "0"})
		checkStream(t, "late job replay", replay)
		if n := len(replay.Events); n == 0 || replay.Events[n-1].seq() != before.Seq {
			t.Errorf("late job's event log %v, want it to end on done at seq %d", seqs(replay.Events), before.Seq)
		}

		// No spooled body of a failed job is left in the results folder.
		entries, err := os.ReadDir(resultsDir)
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range entries {
			for i, f := range faults {
				if strings.HasPrefix(e.Name(), docs[i].ID+"-") {
					t.Errorf("%s: spool file %s left in %s", f.name, e.Name(), resultsDir)
				}
			}
		}
	})
	c.checkNoLeaks(t, "upstream faults", goroutines, fds, 10)
}

// lateAnswer is what the upstream's /poke answers: the sidecar's answer to its report.
type lateAnswer struct {
	Status      int    `json:"status"`
	ContentType string `json:"content_type"`
	Body        string `json:"body"`
}

// pokeLate has the upstream report progress for a /late job it has already answered.
func pokeLate(t *testing.T, id string) lateAnswer {
	t.Helper()
	resp, err := http.Get("http://" + upstreamAddr + "/poke?id=" + id)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	var a lateAnswer
	if resp.StatusCode != http.StatusOK || json.Unmarshal(b, &a) != nil {
		t.Fatalf("upstream /poke: %d %s", resp.StatusCode, b)
	}
	return a
}
