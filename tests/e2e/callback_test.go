package e2e

import (
	"context"
	"net/http"
	"testing"
	"time"
)

// reportBody is what the upstream's /report answers.
type reportBody struct {
	Answers       []int  `json:"answers"`
	ProgressJobID string `json:"progress_job_id"`
	ProgressToken string `json:"progress_token"`
}

// TestUpstreamCallbacks: a legacy app posts progress through the callback URL it was given;
// subscribers see every report as it happens, each acknowledged with 204; the callback
// refuses the wrong token, another job's token, a malformed body and a finished job.
func TestUpstreamCallbacks(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		const steps = 5
		doc, _ := cl.startJob(t, http.MethodPost, "/jobs/report?steps=5&ms=150", nil)
		other, _ := cl.startJob(t, http.MethodGet, "/jobs/hang", nil)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		live := cl.follow(ctx, doc.Links.Events, sseOptions{})
		checkStream(t, "live", live)

		var percents []float64
		for _, ev := range live.Events {
			d := ev.doc(t)
			if d.Progress == nil || d.Progress.Percent == nil {
				continue
			}
			if d.Progress.Estimated {
				t.Errorf("event %s: estimated progress on a job that reports", ev.ID)
			}
			percents = append(percents, *d.Progress.Percent)
		}
		t.Logf("%s: percents seen %v over %d events", cl.proto, percents, len(live.Events))
		if len(percents) < steps {
			t.Errorf("saw %d progress reports, want all %d (each report waits for its 204)", len(percents), steps)
		}
		for i := 1; i < len(percents); i++ {
			if percents[i] < percents[i-1] {
				t.Errorf("percent went back: %v", percents)
			}
		}
		if len(percents) == 0 || percents[len(percents)-1] != 100 {
			t.Errorf("last percent %v, want 100", percents)
		}
		last := live.Events[len(live.Events)-1].doc(t)
		if last.Progress == nil || last.Progress.Stage != "step 5" || last.Progress.Message != "done 5 of 5" {
			t.Errorf("final document's progress: %+v", last.Progress)
		}

		res := cl.result(t, doc.ID)
		wantStatus(t, res, http.StatusOK)
		body := decodeJSON[reportBody](t, res)
		for i, a := range body.Answers {
			if a != http.StatusNoContent {
				t.Errorf("report %d answered %d, want 204", i+1, a)
			}
		}
		if body.ProgressJobID != doc.ID || body.ProgressToken == "" {
			t.Fatalf("upstream saw job %q token %q", body.ProgressJobID, body.ProgressToken)
		}

		callback := func(id, token, body string) *reply {
			return cl.do(t, http.MethodPost, "/_jobs/"+id+"/progress", []byte(body),
				"Authorization", "Bearer "+token, "Content-Type", "application/json")
		}
		wantProblem(t, callback(doc.ID, body.ProgressToken, `{"percent": 50}`), http.StatusConflict)
		wantProblem(t, callback(other.ID, body.ProgressToken, `{"percent": 50}`), http.StatusUnauthorized)
		wantProblem(t, callback(other.ID, "x"+body.ProgressToken, `{"percent": 50}`), http.StatusUnauthorized)
		wantProblem(t, callback("no-such-job", body.ProgressToken, `{"percent": 50}`), http.StatusUnauthorized)
		if d := cl.job(t, other.ID); d.Progress != nil {
			t.Errorf("a refused report changed the other job: %+v", d.Progress)
		}
		wantStatus(t, cl.do(t, http.MethodPost, other.Links.Cancel, nil), http.StatusOK)
	})
}

// TestEstimatedProgress: an upstream that never reports still shows life. After two jobs of
// the route took 3 s each, a third shows an estimated, rising percent and an ETA while it
// runs, from Caddy's memory of the route's run times.
func TestEstimatedProgress(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	cl := c.newClient(t, "h2")
	first, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=3000", nil)
	second, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=3000", nil)
	for _, id := range []string{first.ID, second.ID} {
		wantStatus(t, cl.result(t, id), http.StatusOK)
	}
	doc, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=3000", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	live := cl.follow(ctx, doc.Links.Events, sseOptions{})
	checkStream(t, "live", live)
	var percents []float64
	for _, ev := range live.Events[:len(live.Events)-1] {
		d := ev.doc(t)
		if d.Progress == nil {
			continue
		}
		if !d.Progress.Estimated || d.Progress.Percent == nil || d.ETASeconds == nil {
			t.Errorf("event %s: progress %+v eta %v, want an estimate with an ETA", ev.ID, d.Progress, d.ETASeconds)
			continue
		}
		percents = append(percents, *d.Progress.Percent)
		if *d.ETASeconds <= 0 || *d.ETASeconds > 3 {
			t.Errorf("eta %v s on a job expected to take 3 s", *d.ETASeconds)
		}
	}
	t.Logf("estimated percents %v over %d events", percents, len(live.Events))
	if len(percents) < 2 {
		t.Fatalf("saw %d estimates, want one a second for a 3 s job", len(percents))
	}
	for i := 1; i < len(percents); i++ {
		if percents[i] <= percents[i-1] {
			t.Errorf("estimates did not rise: %v", percents)
		}
	}
	if last := live.Events[len(live.Events)-1].doc(t); last.State != "succeeded" {
		t.Errorf("job ended %q", last.State)
	}
}
