package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestStartingJobs: Prefer: respond-async makes a job (202 with its headers and document), no
// Prefer proxies untouched, Prefer: wait passes a fast response through and answers 202 for a
// slow one.
func TestStartingJobs(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		// 202 at once, with everything DESIGN.md section 3 lists.
		doc, r := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=200", nil)
		h := r.Header
		if got, want := h.Get("Location"), "/_jobs/"+doc.ID; got != want {
			t.Errorf("Location %q, want %q", got, want)
		}
		if n, err := strconv.Atoi(h.Get("Retry-After")); err != nil || n < 1 {
			t.Errorf("Retry-After %q, want a whole number of seconds >= 1", h.Get("Retry-After"))
		}
		if got := h.Get("Preference-Applied"); got != "respond-async" {
			t.Errorf("Preference-Applied %q, want respond-async", got)
		}
		if got, want := h.Get("Link"), `</_jobs/`+doc.ID+`/events>; rel="monitor"`; got != want {
			t.Errorf("Link %q, want %q", got, want)
		}
		if got := h.Get("Content-Type"); got != "application/json" {
			t.Errorf("Content-Type %q, want application/json", got)
		}
		if doc.State != "queued" && doc.State != "running" || doc.Seq < 1 {
			t.Errorf("new job: state %q seq %d", doc.State, doc.Seq)
		}
		if doc.Request.Method != "GET" || doc.Request.URI != "/jobs/slow?ms=200" {
			t.Errorf("job request %+v", doc.Request)
		}
		if doc.Links.Events != "/_jobs/"+doc.ID+"/events" || doc.Links.Result != "/_jobs/"+doc.ID+"/result" || doc.Links.Cancel != "/_jobs/"+doc.ID+"/cancel" {
			t.Errorf("job links %+v", doc.Links)
		}
		// At once: the 202 came before the upstream (200ms) had answered.
		if seen := upstreamSeen(t, doc.ID, "finished", 10*time.Second); !r.end.Before(time.Unix(0, seen.FinishedAtUnixNano)) {
			t.Errorf("the 202 (after %v) came only after the upstream answered; it must come at once", r.elapsed)
		}
		// The upstream got the three progress headers, and no Prefer.
		res := cl.result(t, doc.ID)
		wantStatus(t, res, http.StatusOK)
		up := decodeJSON[slowBody](t, res)
		if up.ProgressJobID != doc.ID {
			t.Errorf("upstream saw Progress-Job-Id %q, want %q", up.ProgressJobID, doc.ID)
		}
		if want := fmt.Sprintf("http://127.0.0.1:%d/_jobs/%s/progress", c.httpPort, doc.ID); up.ProgressCallback != want {
			t.Errorf("upstream saw Progress-Callback %q, want %q", up.ProgressCallback, want)
		}
		if len(up.ProgressToken) < 20 {
			t.Errorf("upstream saw Progress-Token %q, want a secret", up.ProgressToken)
		}
		if up.Prefer != "" {
			t.Errorf("upstream saw Prefer %q; the proxy handles it and must not pass it on", up.Prefer)
		}
		if d := cl.job(t, doc.ID); d.State != "succeeded" || d.Response == nil || d.Response.Status != 200 || d.Response.ContentType != "application/json" {
			t.Errorf("finished job: %+v", d)
		}

		// No Prefer: the legacy behaviour, untouched: no job, nothing reaches the upstream.
		plain := cl.get(t, "/jobs/slow?ms=10")
		wantStatus(t, plain, http.StatusOK)
		if up := decodeJSON[slowBody](t, plain); up.ProgressJobID != "" || up.ProgressToken != "" || up.ProgressCallback != "" {
			t.Errorf("a request without Prefer reached the upstream as a job: %+v", up)
		}
		for _, k := range []string{"Location", "Preference-Applied", "Link"} {
			if v := plain.Header.Get(k); v != "" {
				t.Errorf("plain proxying answered %s: %q", k, v)
			}
		}
		if cl.proto == "h2" {
			// HTTP/3 is advertised on the same port number (UDP), where the h3 client goes.
			if want := fmt.Sprintf(`h3=":%d"`, c.httpsPort); !strings.Contains(plain.Header.Get("Alt-Svc"), want) {
				t.Errorf("Alt-Svc %q, want %s", plain.Header.Get("Alt-Svc"), want)
			}
		}
		// A path no progress handler matches is proxied even with Prefer.
		other := cl.get(t, "/slow?ms=10", "Prefer", "respond-async")
		wantStatus(t, other, http.StatusOK)
		if up := decodeJSON[slowBody](t, other); up.ProgressJobID != "" {
			t.Errorf("an unmatched path became a job: %+v", up)
		}

		// A request body reaches the upstream byte for byte, and comes back in the result.
		payload := []byte(strings.Repeat("caddy-progress ", 5000))
		echo, _ := cl.startJob(t, http.MethodPost, "/jobs/echo", payload, "Content-Type", "text/plain")
		er := cl.result(t, echo.ID)
		wantStatus(t, er, http.StatusOK)
		if string(er.body) != string(payload) || er.Header.Get("Content-Type") != "text/plain" {
			t.Errorf("echo job: got %d bytes of %q, want the %d bytes sent", len(er.body), er.Header.Get("Content-Type"), len(payload))
		}

		// Prefer: wait=5 and a fast upstream: its response passes through, no 202.
		fast := cl.get(t, "/jobs/slow?ms=100", "Prefer", "wait=5")
		wantStatus(t, fast, http.StatusOK)
		if up := decodeJSON[slowBody](t, fast); up.SleptMS != 100 || up.ProgressJobID == "" {
			t.Errorf("wait=5: passthrough body %s", fast.body)
		}
		if fast.Header.Get("Location") != "" || fast.Header.Get("Content-Type") != "application/json" {
			t.Errorf("wait=5 passthrough: Location %q, Content-Type %q", fast.Header.Get("Location"), fast.Header.Get("Content-Type"))
		}
		if fast.elapsed > 2*time.Second {
			t.Errorf("wait=5 with a 100ms upstream took %v", fast.elapsed)
		}

		// Prefer: wait=1 and a 3s upstream: 202 after about a second.
		slow := cl.get(t, "/jobs/slow?ms=3000", "Prefer", "wait=1")
		wantStatus(t, slow, http.StatusAccepted)
		sd := decodeJSON[jobDoc](t, slow)
		if slow.Header.Get("Location") != "/_jobs/"+sd.ID || slow.Header.Get("Preference-Applied") != "respond-async" {
			t.Errorf("wait=1: 202 with Location %q, Preference-Applied %q", slow.Header.Get("Location"), slow.Header.Get("Preference-Applied"))
		}
		if sd.State != "running" {
			t.Errorf("wait=1: job %s after a second, want running", sd.State)
		}
		if slow.elapsed < time.Second || slow.elapsed > 2500*time.Millisecond {
			t.Errorf("wait=1: 202 after %v, want about 1s", slow.elapsed)
		}
	})
}

// TestEventStream: an SSE subscriber gets the current document at once and then every change
// as it happens, ids increasing; done ends the stream. Resuming with Last-Event-ID leaves no
// gap and sends nothing twice; after done it gets 204.
func TestEventStream(t *testing.T) {
	// The heartbeat is shorter than the estimate interval (1s): once the route has run times
	// (after the first protocol), a running job gets an estimate a second after each event,
	// which with a 1s heartbeat raced the heartbeat timer.
	c := startCaddy(t, caddyOptions{Heartbeat: "600ms"})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		// /serial runs one job at a time: the two jobs ahead (750ms each) make ours wait about
		// 1.5s, moving up the queue half way, then it runs 1.5s: its events are spread over
		// about 3s.
		ahead1, _ := cl.startJob(t, http.MethodGet, "/serial/slow?ms=750", nil)
		ahead2, _ := cl.startJob(t, http.MethodGet, "/serial/slow?ms=750", nil)
		doc, _ := cl.startJob(t, http.MethodGet, "/serial/slow?ms=1500", nil)
		if doc.State != "queued" || doc.QueuePosition == nil || *doc.QueuePosition != 2 {
			t.Errorf("third job on a concurrency-1 route: state %q, queue_position %v; want queued at 2", doc.State, doc.QueuePosition)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		live := cl.follow(ctx, doc.Links.Events, sseOptions{})
		checkStream(t, "live", live)
		if len(live.Connects) != 1 {
			t.Fatalf("live stream needed %d connections: %+v", len(live.Connects), live.Connects)
		}
		if !live.ClosedAfterDone {
			t.Errorf("the server did not close the stream after done")
		}
		if live.Retry != 2*time.Second {
			t.Errorf("retry: %v, want 2s", live.Retry)
		}
		evs := live.Events
		if len(evs) < 4 {
			t.Fatalf("live stream: %d events (%v), want queued at 2, queued at 1, running and done", len(evs), seqs(evs))
		}
		start := live.Connects[0].Start
		first, end := evs[0].At.Sub(start), evs[len(evs)-1].At.Sub(start)
		t.Logf("%s: first event %v after connecting, done after %v; %d events %v, %d heartbeats",
			cl.proto, first.Round(time.Microsecond), end.Round(time.Millisecond), len(evs), seqs(evs), live.Heartbeats)
		if first > 500*time.Millisecond {
			t.Errorf("first event %v after connecting, want the current document at once (< 500ms)", first)
		}
		if end < 1500*time.Millisecond {
			t.Errorf("done %v after connecting; the job runs 1.5s after waiting for the one ahead", end)
		}
		if d := evs[0].doc(t); d.State != "queued" || d.QueuePosition == nil || *d.QueuePosition != 2 {
			t.Errorf("first event: state %q queue_position %v, want queued at 2", d.State, d.QueuePosition)
		}
		if d := evs[1].doc(t); d.State != "queued" || d.QueuePosition == nil || *d.QueuePosition != 1 {
			t.Errorf("second event: state %q queue_position %v, want queued at 1", d.State, d.QueuePosition)
		} else if gap := evs[1].At.Sub(evs[0].At); gap < 500*time.Millisecond {
			t.Errorf("moving up the queue came %v after the first event; the job ahead takes 750ms", gap)
		}
		// One by one, as they happen: running comes when the job ahead ends, done 1.5s later.
		var running *sseEvent
		for i := range evs {
			if evs[i].doc(t).State == "running" {
				running = &evs[i]
				break
			}
		}
		if running == nil {
			t.Fatalf("no running event among %v", seqs(evs))
		}
		if gap := evs[len(evs)-1].At.Sub(running.At); gap < time.Second {
			t.Errorf("done came %v after running; the upstream takes 1.5s, so events were held back", gap)
		}
		if gap := running.At.Sub(evs[0].At); gap < time.Second {
			t.Errorf("running came %v after the first event; the jobs ahead take 1.5s", gap)
		}
		if live.Heartbeats < 1 {
			t.Errorf("no heartbeat in %v of stream with heartbeat 600ms", end)
		}
		if d := evs[len(evs)-1].doc(t); d.State != "succeeded" {
			t.Errorf("done event: state %q", d.State)
		}

		// The full replay from id 0 (as ?last_event_id=0) holds every change; the live stream
		// is its tail.
		replay := cl.follow(ctx, doc.Links.Events, sseOptions{LastEventID: "0", Query: true})
		checkStream(t, "replay", replay)
		all := seqs(replay.Events)
		if all[0] != 1 {
			t.Errorf("replay from 0 starts at %d, want 1", all[0])
		}
		for i := 1; i < len(all); i++ {
			if all[i] != all[i-1]+1 {
				t.Errorf("replay from 0 has a gap: %v", all)
				break
			}
		}
		liveSeqs := seqs(evs)
		if !suffixOf(liveSeqs, all) {
			t.Errorf("live stream %v is not the tail of the replay %v", liveSeqs, all)
		}

		// Resume in the middle with Last-Event-ID: exactly the events after it.
		mid := all[(len(all)-1)/2]
		resumed := cl.follow(ctx, doc.Links.Events, sseOptions{LastEventID: strconv.FormatUint(mid, 10)})
		checkStream(t, "resumed", resumed)
		var want []uint64
		for _, s := range all {
			if s > mid {
				want = append(want, s)
			}
		}
		if got := seqs(resumed.Events); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("resumed after %d: got %v, want %v (full: %v)", mid, got, want, all)
		}
		for i := range resumed.Events {
			if resumed.Events[i].Data != replay.Events[len(all)-len(want)+i].Data {
				t.Errorf("resumed event %s differs from the replayed one", resumed.Events[i].ID)
			}
		}

		// Reconnecting after done with the done id: 204, so a browser stops.
		doneID := replay.Events[len(replay.Events)-1].ID
		after := cl.follow(ctx, doc.Links.Events, sseOptions{LastEventID: doneID})
		if after.Ended != "204" || len(after.Events) != 0 {
			t.Errorf("reconnect after done with id %s: ended %q with %d events, err %v; want 204", doneID, after.Ended, len(after.Events), after.Err)
		}
		r := cl.get(t, doc.Links.Events, "Last-Event-ID", doneID)
		wantStatus(t, r, http.StatusNoContent)

		for _, a := range []jobDoc{ahead1, ahead2} {
			if d := cl.job(t, a.ID); d.State != "succeeded" {
				t.Errorf("a job ahead: %s", d.State)
			}
		}
	})
}

func suffixOf(s, of []uint64) bool {
	if len(s) > len(of) {
		return false
	}
	return fmt.Sprint(s) == fmt.Sprint(of[len(of)-len(s):])
}

// TestLongPoll: GET /_jobs/{id}?after=<seq>&wait=10s answers as soon as the job changes; on a
// finished job, If-None-Match with its seq and Prefer: wait=1 answer 304 after the full wait.
func TestLongPoll(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		doc, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=1000", nil)
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()

		// An SSE subscriber (its own connection) marks when the job's end became visible.
		var sseDoneAt time.Time
		var sseDoneSeq uint64
		var mu sync.Mutex
		sseCl := c.newClient(t, cl.proto)
		streamDone := make(chan *sseResult, 1)
		go func() {
			streamDone <- sseCl.follow(ctx, doc.Links.Events, sseOptions{OnEvent: func(ev sseEvent) {
				if ev.Type == "done" {
					mu.Lock()
					sseDoneAt, sseDoneSeq = ev.At, ev.seq()
					mu.Unlock()
				}
			}})
		}()

		seq := doc.Seq
		var last *reply
		var lastDoc jobDoc
		for i := 0; i < 10 && !lastDoc.terminal(); i++ {
			last = cl.get(t, fmt.Sprintf("/_jobs/%s?after=%d&wait=10s", doc.ID, seq))
			wantStatus(t, last, http.StatusOK)
			lastDoc = decodeJSON[jobDoc](t, last)
			if lastDoc.Seq <= seq {
				t.Fatalf("long-poll after %d answered seq %d", seq, lastDoc.Seq)
			}
			if got, want := last.Header.Get("ETag"), `"`+strconv.FormatUint(lastDoc.Seq, 10)+`"`; got != want {
				t.Errorf("long-poll ETag %q, want %q", got, want)
			}
			seq = lastDoc.Seq
		}
		if !lastDoc.terminal() || lastDoc.State != "succeeded" {
			t.Fatalf("long-polling ended on state %q", lastDoc.State)
		}
		if last.elapsed > 5*time.Second {
			t.Errorf("the last long-poll took %v; the job ends 1s after it started", last.elapsed)
		}
		stream := <-streamDone
		checkStream(t, "sse", stream)
		mu.Lock()
		wake := last.end.Sub(sseDoneAt)
		doneSeq := sseDoneSeq
		mu.Unlock()
		if doneSeq != lastDoc.Seq {
			t.Errorf("long-poll returned seq %d, the SSE done event had %d", lastDoc.Seq, doneSeq)
		}
		seen := upstreamSeen(t, doc.ID, "finished", 5*time.Second)
		sinceUpstream := last.end.Sub(time.Unix(0, seen.FinishedAtUnixNano))
		t.Logf("%s: long-poll woke %v after the SSE done event arrived; %v after the upstream's handler returned (proxying + durable commit included)",
			cl.proto, wake.Round(time.Microsecond), sinceUpstream.Round(time.Microsecond))
		if wake > 50*time.Millisecond {
			t.Errorf("long-poll returned %v after the change was visible on the event stream, want within 50ms", wake)
		}
		if sinceUpstream > time.Second {
			t.Errorf("long-poll returned %v after the upstream answered", sinceUpstream)
		}

		// A finished job: the wait is served in full, then 304.
		r := cl.get(t, "/_jobs/"+doc.ID, "If-None-Match", `"`+strconv.FormatUint(seq, 10)+`"`, "Prefer", "wait=1")
		wantStatus(t, r, http.StatusNotModified)
		if r.elapsed < time.Second || r.elapsed > 2500*time.Millisecond {
			t.Errorf("304 on a finished job after %v, want after the full 1s wait", r.elapsed)
		}
		if got := r.Header.Get("ETag"); got != `"`+strconv.FormatUint(seq, 10)+`"` {
			t.Errorf("304 ETag %q", got)
		}
		// Without a wait, a plain conditional GET answers 304 at once.
		r = cl.get(t, "/_jobs/"+doc.ID, "If-None-Match", `"`+strconv.FormatUint(seq, 10)+`"`)
		wantStatus(t, r, http.StatusNotModified)
		if r.elapsed > 500*time.Millisecond {
			t.Errorf("conditional GET without a wait took %v", r.elapsed)
		}
		// And a stale seq answers the document at once.
		r = cl.get(t, fmt.Sprintf("/_jobs/%s?after=%d&wait=10s", doc.ID, seq-1))
		wantStatus(t, r, http.StatusOK)
		if r.elapsed > 500*time.Millisecond || decodeJSON[jobDoc](t, r).Seq != seq {
			t.Errorf("long-poll with an old seq: %v, %s", r.elapsed, r.body)
		}
		if r.Header.Get("Retry-After") != "" {
			t.Errorf("finished job answered Retry-After %q", r.Header.Get("Retry-After"))
		}
	})
}

// TestLargeResult: a 100 MiB upstream response goes through a job and is replayed at the
// result URL byte for byte, with its status and headers.
func TestLargeResult(t *testing.T) {
	const size = 100 << 20
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		start := time.Now()
		doc, _ := cl.startJob(t, http.MethodGet, "/jobs/large?size="+strconv.Itoa(size), nil)
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		resp, _, err := cl.send(ctx, http.MethodGet, doc.Links.Result+"?wait=25s", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		cl.checkProto(t, resp)
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			t.Fatalf("result: %d %s", resp.StatusCode, b)
		}
		finished := time.Now()
		h := sha256.New()
		n, err := io.Copy(h, resp.Body)
		if err != nil {
			t.Fatalf("reading the result after %d bytes: %v", n, err)
		}
		sum := hex.EncodeToString(h.Sum(nil))
		t.Logf("%s: 100 MiB job finished %v after it started; replay read in %v",
			cl.proto, finished.Sub(start).Round(time.Millisecond), time.Since(finished).Round(time.Millisecond))
		if n != size {
			t.Errorf("result body: %d bytes, want %d", n, size)
		}
		if want := resp.Header.Get("X-Checksum"); want == "" || sum != want {
			t.Errorf("result body sha256 %s, X-Checksum %q", sum, want)
		}
		if got := resp.Header.Get("Content-Type"); got != "application/octet-stream" {
			t.Errorf("result Content-Type %q", got)
		}
		if resp.ContentLength != size && resp.ContentLength != -1 {
			t.Errorf("result Content-Length %d", resp.ContentLength)
		}
		d := cl.job(t, doc.ID)
		if d.State != "succeeded" || d.Response == nil || d.Response.ContentLength != size || d.Response.Status != 200 {
			t.Errorf("job after a 100 MiB response: %+v %+v", d.State, d.Response)
		}
	})
}

// TestResultTheMomentItEnds: clients that fetch the result again and again while the job
// ends never get anything but 202 and then the result, also for a body large enough to be kept
// in a file (the store renames it into place just after the commit that records it).
func TestResultTheMomentItEnds(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	payload := []byte(strings.Repeat("0123456789", 7000)) // 70 kB: above the 64 KiB kept inline
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		var wg sync.WaitGroup
		for range 2 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for range 20 {
					r, err := cl.try(http.MethodPost, "/jobs/echo", payload, "Prefer", "respond-async", "Content-Type", "text/plain")
					var doc jobDoc
					if err == nil && r.StatusCode != http.StatusAccepted {
						err = fmt.Errorf("status %d: %s", r.StatusCode, r.body)
					}
					if err == nil {
						err = json.Unmarshal(r.body, &doc)
					}
					if err != nil {
						t.Errorf("starting a job: %v", err)
						return
					}
					// Ask as fast as the answers come until it is not 202 (for at most 20 s: a
					// loaded machine may take a while to run the job).
					deadline := time.Now().Add(20 * time.Second)
					for i := 0; ; i++ {
						res, err := cl.try(http.MethodGet, doc.Links.Result, nil)
						if err != nil {
							t.Error(err)
							return
						}
						if res.StatusCode == http.StatusAccepted && time.Now().Before(deadline) {
							continue
						}
						if res.StatusCode != http.StatusOK || len(res.body) != len(payload) {
							t.Errorf("result of job %s after %d answers of 202: %d, %d bytes: %.300s", doc.ID, i, res.StatusCode, len(res.body), res.body)
						}
						break
					}
				}
			}()
		}
		wg.Wait()
	})
}

// TestCancel: canceling a job on a hanging upstream ends the upstream's request, the job is
// canceled (idempotently), and its result is a 409 problem.
func TestCancel(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		doc, _ := cl.startJob(t, http.MethodGet, "/jobs/hang", nil)
		if s := upstreamSeen(t, doc.ID, "started", 10*time.Second); !s.Started {
			t.Fatalf("the upstream never got job %s's request", doc.ID)
		}
		r := cl.do(t, http.MethodPost, doc.Links.Cancel, nil)
		wantStatus(t, r, http.StatusOK)
		canceled := decodeJSON[jobDoc](t, r)
		if canceled.State != "canceled" {
			t.Errorf("cancel answered state %q", canceled.State)
		}
		if s := upstreamSeen(t, doc.ID, "ctx_done", 10*time.Second); !s.CtxDone {
			t.Errorf("the upstream's request context did not end after cancel: %+v", s)
		}
		res := cl.get(t, doc.Links.Result)
		wantProblem(t, res, http.StatusConflict)
		// Idempotent: the same answer again, nothing changes.
		again := cl.do(t, http.MethodPost, doc.Links.Cancel, nil)
		wantStatus(t, again, http.StatusOK)
		if d := decodeJSON[jobDoc](t, again); d.State != "canceled" || d.Seq != canceled.Seq {
			t.Errorf("second cancel: state %q seq %d, want canceled seq %d", d.State, d.Seq, canceled.Seq)
		}
		// A canceled job's stream is just its done event.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s := cl.follow(ctx, doc.Links.Events, sseOptions{})
		checkStream(t, "canceled job", s)
		if len(s.Events) != 1 || s.Events[0].doc(t).State != "canceled" {
			t.Errorf("stream of a canceled job: %v", seqs(s.Events))
		}
		// DELETE forgets it.
		del := cl.do(t, http.MethodDelete, doc.Links.Self, nil)
		wantStatus(t, del, http.StatusNoContent)
		wantProblem(t, cl.get(t, doc.Links.Self), http.StatusNotFound)
	})
}

// TestFailures: an upstream 500 is a failed job whose result replays the 500; an unreachable
// upstream and a job timeout fail with their error codes and 502/504 problems.
func TestFailures(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		failing, _ := cl.startJob(t, http.MethodGet, "/jobs/fail", nil)
		down, _ := cl.startJob(t, http.MethodGet, "/down/slow?ms=10", nil)
		timed, _ := cl.startJob(t, http.MethodGet, "/timed/hang", nil)

		// The upstream answered 500: failed, with the response kept and replayed.
		r := cl.result(t, failing.ID)
		wantStatus(t, r, http.StatusInternalServerError)
		if string(r.body) != "legacy app failed: the database is on fire\n" || r.Header.Get("X-Upstream") != "fail" ||
			r.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
			t.Errorf("replayed 500: %q %v", r.body, r.Header)
		}
		if d := cl.job(t, failing.ID); d.State != "failed" || d.Response == nil || d.Response.Status != 500 {
			t.Errorf("job with an upstream 500: state %q response %+v", d.State, d.Response)
		}

		// Nothing listens: failed, upstream_unreachable, 502.
		r = cl.result(t, down.ID)
		wantProblem(t, r, http.StatusBadGateway)
		if d := cl.job(t, down.ID); d.State != "failed" || d.Error == nil || d.Error.Code != "upstream_unreachable" || d.Response != nil {
			t.Errorf("job against a closed port: state %q error %+v response %+v", d.State, d.Error, d.Response)
		}

		// timeout 2s on a hanging upstream: failed, upstream_timeout, 504, request ended.
		r = cl.result(t, timed.ID)
		p := wantProblem(t, r, http.StatusGatewayTimeout)
		d := cl.job(t, timed.ID)
		if d.State != "failed" || d.Error == nil || d.Error.Code != "upstream_timeout" {
			t.Errorf("job past its timeout: state %q error %+v", d.State, d.Error)
		}
		if !strings.Contains(p.Title, "upstream_timeout") {
			t.Errorf("504 problem title %q does not name upstream_timeout", p.Title)
		}
		if s := upstreamSeen(t, timed.ID, "ctx_done", 5*time.Second); !s.CtxDone {
			t.Errorf("the upstream's request did not end at the job timeout: %+v", s)
		}
	})
}

// TestProblems: errors are problem documents a person can act on.
func TestProblems(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	forEachProtocol(t, c, func(t *testing.T, cl *client) {
		for _, path := range []string{"/_jobs/nosuchjob", "/_jobs/AAAAAAAAAAAAAAAAAAAAAA", "/_jobs/AAAAAAAAAAAAAAAAAAAAAA/events",
			"/_jobs/AAAAAAAAAAAAAAAAAAAAAA/result", "/_jobs/AAAAAAAAAAAAAAAAAAAAAA/nonsense"} {
			wantProblem(t, cl.get(t, path), http.StatusNotFound)
		}
		wantProblem(t, cl.do(t, http.MethodPost, "/_jobs/AAAAAAAAAAAAAAAAAAAAAA/cancel", nil), http.StatusNotFound)

		p := wantProblem(t, cl.get(t, "/jobs/slow?ms=10", "Prefer", "wait=abc"), http.StatusBadRequest)
		if !strings.Contains(p.Detail, "wait") {
			t.Errorf("400 for Prefer: wait=abc does not mention wait: %+v", p)
		}
		doc, _ := cl.startJob(t, http.MethodGet, "/jobs/slow?ms=10", nil)
		r := cl.do(t, http.MethodPost, doc.Links.Self, nil)
		wantProblem(t, r, http.StatusMethodNotAllowed)
		if r.Header.Get("Allow") == "" {
			t.Errorf("405 without Allow")
		}
		wantProblem(t, cl.get(t, doc.Links.Events, "Last-Event-ID", "abc"), http.StatusBadRequest)
		wantProblem(t, cl.get(t, doc.Links.Self+"?wait=forever&after=1"), http.StatusBadRequest)
	})
}

// TestReload: a config reload while jobs run and clients follow them does not deadlock, loses
// no job, and every client, resuming with Last-Event-ID after its stream ends, sees each
// event once and ends on done.
func TestReload(t *testing.T) {
	c := startCaddy(t, caddyOptions{Heartbeat: "1s"})
	heartbeats := []string{"2s", "3s", "4s"}
	for i, proto := range protocols {
		t.Run(proto, func(t *testing.T) {
			cl := c.newClient(t, proto)
			const n = 5
			docs := make([]jobDoc, n)
			for j := range docs {
				docs[j], _ = cl.startJob(t, http.MethodGet, "/jobs/slow?ms=3000", nil)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			var started sync.WaitGroup
			started.Add(n)
			results := make([]*sseResult, n)
			var wg sync.WaitGroup
			for j := range docs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					var once sync.Once
					results[j] = cl.follow(ctx, docs[j].Links.Events, sseOptions{
						OnEvent: func(sseEvent) { once.Do(started.Done) },
					})
					once.Do(started.Done) // a follower that failed at once must not block the wait
				}()
			}
			started.Wait() // every stream is open and has its first event
			took, err := c.reload(t, caddyOptions{Heartbeat: heartbeats[i]})
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("%s: reload with %d open event streams took %v", proto, n, took.Round(time.Millisecond))
			if took > 10*time.Second {
				t.Errorf("reload took %v", took)
			}
			wg.Wait()
			for j, res := range results {
				name := fmt.Sprintf("stream %d", j)
				checkStream(t, name, res)
				if len(res.Connects) < 2 {
					t.Errorf("%s: %d connection(s); the reload must end event streams so clients resume on the new config", name, len(res.Connects))
				}
				for k, conn := range res.Connects[1:] {
					if conn.LastEventID == "" {
						t.Errorf("%s: reconnection %d without Last-Event-ID", name, k+1)
					}
				}
				if len(res.Events) > 0 {
					if d := res.Events[len(res.Events)-1].doc(t); d.State != "succeeded" {
						t.Errorf("%s: job ended %q", name, d.State)
					}
				}
			}
			for _, d := range docs {
				if got := cl.job(t, d.ID); got.State != "succeeded" {
					t.Errorf("job %s after the reload: %s %+v", d.ID, got.State, got.Error)
				}
				if s := upstreamSeen(t, d.ID, "", 0); s.CtxDoneBeforeReturn {
					t.Errorf("the reload cut job %s's upstream request", d.ID)
				}
			}
		})
	}
}

// TestShutdownWithOpenStreams: SIGTERM ends Caddy promptly even while event streams,
// long-polls and Prefer: wait requests are open (Caddy's grace period is forever by default,
// and it stops its apps in random order, so this runs three rounds); every client gets a
// proper ending, and the job that was running ends as interrupted, as a restart shows.
func TestShutdownWithOpenStreams(t *testing.T) {
	c := startCaddy(t, caddyOptions{})
	for round := 1; round <= 3; round++ {
		if round > 1 {
			c.restart()
		}
		h1 := c.newClient(t, "h1")
		doc, _ := h1.startJob(t, http.MethodGet, "/jobs/hang", nil)
		if s := upstreamSeen(t, doc.ID, "started", 10*time.Second); !s.Started {
			t.Fatal("the upstream never got the job's request")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		type outcome struct {
			what   string
			status int
			err    error
		}
		ended := make(chan outcome, 9)
		var opened sync.WaitGroup
		for _, proto := range protocols {
			cl := c.newClient(t, proto)
			opened.Add(1)
			go func() {
				var once sync.Once
				res := cl.follow(ctx, doc.Links.Events, sseOptions{MaxConns: 1, OnEvent: func(sseEvent) { once.Do(opened.Done) }})
				once.Do(opened.Done)
				ended <- outcome{proto + " events", 0, res.Err}
			}()
			for _, req := range []struct{ what, path, prefer string }{
				{"long-poll", fmt.Sprintf("%s?after=%d&wait=25s", doc.Links.Self, doc.Seq+5), ""},
				{"Prefer: wait=25", "/jobs/hang", "wait=25"},
			} {
				go func() {
					var hdrs []string
					if req.prefer != "" {
						hdrs = []string{"Prefer", req.prefer}
					}
					resp, _, err := cl.send(ctx, http.MethodGet, req.path, nil, hdrs...)
					o := outcome{what: proto + " " + req.what, err: err}
					if err == nil {
						_, o.err = io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						o.status = resp.StatusCode
					}
					ended <- o
				}()
			}
		}
		opened.Wait()
		c.waitInFlight(9) // 3 event streams, 3 long-polls, 3 Prefer: wait
		took, err := c.stopWithin(8 * time.Second)
		if err != nil {
			cancel()
			t.Fatalf("round %d: %v", round, err)
		}
		t.Logf("round %d: caddy exited %v after SIGTERM with 3 event streams, 3 long-polls and 3 Prefer: wait requests open", round, took.Round(time.Millisecond))
		for range 9 {
			select {
			case o := <-ended:
				switch {
				case strings.HasSuffix(o.what, "long-poll") && o.status != http.StatusNotModified:
					t.Errorf("round %d: %s ended with %d %v, want 304 (the wait cut short)", round, o.what, o.status, o.err)
				case strings.HasSuffix(o.what, "wait=25") && o.status != http.StatusAccepted:
					t.Errorf("round %d: %s ended with %d %v, want 202", round, o.what, o.status, o.err)
				}
			case <-ctx.Done():
				t.Fatalf("round %d: a client was still connected after caddy exited", round)
			}
		}
		cancel()
		c.checkLog()

		c.restart()
		d := h1.job(t, doc.ID)
		if d.State != "failed" || d.Error == nil || d.Error.Code != "interrupted" {
			t.Errorf("round %d: the job that ran at shutdown, after a restart: state %q error %+v; want failed, interrupted", round, d.State, d.Error)
		}
		wantProblem(t, h1.get(t, doc.Links.Result), http.StatusServiceUnavailable)
		if round < 3 {
			if _, err := c.stopWithin(8 * time.Second); err != nil {
				t.Fatal(err)
			}
		}
	}
}
