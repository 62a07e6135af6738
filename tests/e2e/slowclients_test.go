package e2e

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddy-progress/progress/upstreamhook"
)

// TestStalledSubscribers: a thousand SSE subscribers that read their first event and then
// never read again do not slow the healthy subscribers of the same jobs, cost Caddy bounded
// memory, and are dropped once a write has waited write_timeout (at most 1.5 times it).
//
// The stalled subscribers are HTTP/2 streams with a receive window of 16 KiB, and the jobs
// publish progress documents of about 9 KiB, so Caddy's writes to them really block within
// two events: HTTP/2 flow control stops the writer, not a kernel socket buffer (which on
// loopback absorbs megabytes per connection before a write blocks). The jobs' progress is
// posted by the test itself, to the real callback endpoint with each job's token (derived from
// a callback_secret this Caddy is given), so each document carries the moment it was sent and
// every delivery's latency is known.
func TestStalledSubscribers(t *testing.T) {
	const (
		jobs         = 10   // running jobs, every one followed by healthy and stalled subscribers
		healthy      = 20   // healthy followers, half over HTTP/1.1, half over HTTP/2
		stalled      = 1000 // subscribers that stop reading
		interval     = 50 * time.Millisecond
		phase        = 3 * time.Second // publishing time of each measured phase
		writeTimeout = 2 * time.Second
		pad          = 8 << 10 // bytes of progress.data per document
		secret       = "stalled-subscribers-test-secret-0123456789"
	)
	c := startCaddyWith(t, caddyOptions{Heartbeat: "1s"}, withGlobal(t, "write_timeout "+writeTimeout.String(), "callback_secret "+secret))
	signer := upstreamhook.NewSigner([]byte(secret))
	h1, h2 := c.newClient(t, "h1"), c.newClient(t, "h2")
	goroutines0, fds0 := c.goroutineCount(), c.fdCount(t)

	ids := make([]string, jobs)
	for i := range ids {
		doc, _ := h1.startJob(t, http.MethodGet, "/jobs/hang", nil)
		ids[i] = doc.ID
	}

	// Healthy followers: each event's latency is now minus the send time in its message.
	var latMu sync.Mutex
	lat := map[string]durations{}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var following sync.WaitGroup
	var opened sync.WaitGroup
	results := make([]*sseResult, healthy)
	for i := range healthy {
		cl := h1
		if i%2 == 1 {
			cl = h2
		}
		following.Add(1)
		opened.Add(1)
		go func() {
			defer following.Done()
			var once sync.Once
			results[i] = cl.follow(ctx, "/_jobs/"+ids[i%jobs]+"/events", sseOptions{MaxConns: 1, OnEvent: func(ev sseEvent) {
				once.Do(opened.Done)
				name, sent, ok := sentAt(ev.Data)
				if ok {
					latMu.Lock()
					lat[name] = append(lat[name], ev.At.Sub(sent))
					latMu.Unlock()
				}
			}})
			once.Do(opened.Done)
		}()
	}
	opened.Wait()

	// Publishers: one per job, a report every interval, each waiting for its 204.
	publish := func(name string, d time.Duration, during func()) {
		t.Helper()
		stop := make(chan struct{})
		var wg sync.WaitGroup
		var refused atomic.Int64
		for _, id := range ids {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ticker := time.NewTicker(interval)
				defer ticker.Stop()
				for n := 0; ; n++ {
					body, _ := json.Marshal(map[string]any{
						"current": n, "total": 1 << 30,
						"message": name + "@" + strconv.FormatInt(time.Now().UnixNano(), 10),
						"data":    map[string]string{"pad": strings.Repeat("p", pad)},
					})
					r, err := h1.try(http.MethodPost, "/_jobs/"+id+"/progress", body,
						"Authorization", "Bearer "+signer.Token(id), "Content-Type", "application/json")
					if err != nil || r.StatusCode != http.StatusNoContent {
						refused.Add(1)
						if err == nil {
							err = fmt.Errorf("status %d: %s", r.StatusCode, r.body)
						}
						t.Errorf("%s: a progress report: %v", name, err)
					}
					select {
					case <-stop:
						return
					case <-ticker.C:
					}
				}
			}()
		}
		deadline := time.Now().Add(d)
		for time.Now().Before(deadline) {
			during()
			time.Sleep(200 * time.Millisecond) // the sampling period of during
		}
		close(stop)
		wg.Wait()
	}

	publish("baseline", phase, func() {})
	rss0 := c.rssKiB(t)
	goroutinesBase := c.goroutineCount()

	// The stalled subscribers: open, read up to the end of the first event, stop. Ten
	// connections of a hundred streams each, every connection with its own transport so that
	// the stalled streams' unread bytes (at most 16 KiB each) stay within its window.
	stalledCtx, stopStalled := context.WithCancel(context.Background())
	defer stopStalled()
	bodies := make([]io.ReadCloser, stalled)
	opening := time.Now()
	{
		var wg sync.WaitGroup
		for k := range 10 {
			tr := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: c.roots, ServerName: "127.0.0.1"}, DisableCompression: true,
				HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: 16 << 10, MaxReceiveBufferPerConnection: 4<<20 - 1}}
			tr.Protocols = new(http.Protocols)
			tr.Protocols.SetHTTP2(true)
			defer tr.CloseIdleConnections()
			hc := &http.Client{Transport: tr}
			for i := k; i < stalled; i += 10 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					body, err := openStalled(stalledCtx, hc, "https://"+c.tlsAddr()+"/_jobs/"+ids[i%jobs]+"/events")
					if err != nil {
						t.Errorf("stalled subscriber %d: %v", i, err)
						return
					}
					bodies[i] = body
				}()
			}
		}
		wg.Wait()
	}
	if t.Failed() {
		t.FailNow()
	}
	opened1000 := time.Since(opening)
	c.waitInFlight(healthy + stalled)
	goroutinesStalled := c.goroutineCount()
	rss1 := c.rssKiB(t)

	// Publish again with them stalled: sample memory, and when the first of them is dropped.
	rssPeak := rss1
	var firstDrop time.Time
	stalledStart := time.Now()
	publish("stalled", phase, func() {
		rssPeak = max(rssPeak, c.rssKiB(t))
		if firstDrop.IsZero() && c.inFlight() < healthy+stalled {
			firstDrop = time.Now()
		}
	})
	// Every stalled one goes within the write timeout of its blocked write (plus a generous
	// allowance for a loaded machine); the healthy ones stay.
	left := settle(30*time.Second, healthy, c.inFlight)
	dropped := time.Since(stalledStart)
	if firstDrop.IsZero() {
		firstDrop = time.Now()
	}
	goroutinesAfter := settle(10*time.Second, goroutinesBase+30, c.goroutineCount)
	rss2 := c.rssKiB(t)
	if left > healthy {
		t.Errorf("%d requests still in flight %v after the stalled subscribers' writes began, want the %d healthy ones only", left, dropped, healthy)
	}
	if early := firstDrop.Sub(opening); early < writeTimeout {
		t.Errorf("a stalled subscriber was dropped %v after it opened, before the write timeout (%v)", early, writeTimeout)
	}

	// From the client's side: every stalled stream was reset by the server. Reading now
	// drains what the client holds, then must meet the stream's end, not silence (bounded by
	// 20s for all of them together).
	var closedReset, closedEOF, notClosed atomic.Int64
	{
		var wg sync.WaitGroup
		timer := time.AfterFunc(20*time.Second, stopStalled)
		for _, body := range bodies {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, err := io.Copy(io.Discard, body)
				switch {
				case err == nil:
					closedEOF.Add(1)
				case stalledCtx.Err() != nil:
					notClosed.Add(1)
				default:
					closedReset.Add(1)
				}
			}()
		}
		wg.Wait()
		timer.Stop()
	}
	if notClosed.Load() > 0 || closedEOF.Load() > 0 {
		t.Errorf("of %d stalled streams, %d were still open and %d ended cleanly; want all reset by the server", stalled, notClosed.Load(), closedEOF.Load())
	}

	// End the jobs: the healthy followers see done.
	for _, id := range ids {
		wantStatus(t, h1.do(t, http.MethodPost, "/_jobs/"+id+"/cancel", nil), http.StatusOK)
	}
	following.Wait()
	for i, res := range results {
		checkStream(t, fmt.Sprintf("healthy follower %d", i), res)
	}

	base, slow := lat["baseline"], lat["stalled"]
	perStalled := float64(rssPeak-rss0) / stalled
	t.Logf("stalled subscribers: %d opened in %v; caddy goroutines %d before, %d with them, %d after; all dropped %v after publishing began (first %v after opening); reset by the server: %d, ended cleanly: %d",
		stalled, opened1000.Round(time.Millisecond), goroutinesBase, goroutinesStalled, goroutinesAfter, dropped.Round(time.Millisecond),
		firstDrop.Sub(opening).Round(time.Millisecond), closedReset.Load(), closedEOF.Load())
	t.Logf("caddy VmRSS: %d KiB before, %d KiB with them open, peak %d KiB while their writes blocked, %d KiB after: %.1f KiB per stalled subscriber",
		rss0, rss1, rssPeak, rss2, perStalled)
	t.Logf("healthy delivery latency (report sent -> event received), %d followers on %d jobs, a %d-byte document every %v per job:\n  baseline: %v\n  stalled:  %v\n  p95 ratio %.2f",
		healthy, jobs, pad, interval, base, slow, float64(slow.pct(95))/float64(max(base.pct(95), 1)))
	if len(base) < 100 || len(slow) < 100 {
		t.Fatalf("too few deliveries measured: %d baseline, %d stalled", len(base), len(slow))
	}
	if goroutinesStalled < goroutinesBase+stalled {
		t.Errorf("caddy has %d goroutines with %d subscribers open, %d before: the stalled streams were not all served", goroutinesStalled, stalled, goroutinesBase)
	}
	if goroutinesAfter > goroutinesBase+30 {
		t.Errorf("caddy has %d goroutines after the stalled subscribers were dropped, %d before", goroutinesAfter, goroutinesBase)
	}
	if perStalled > 200 {
		t.Errorf("caddy's memory grew %.1f KiB per stalled subscriber, want under 200", perStalled)
	}
	// A publisher or a healthy stream held up by a stalled one would wait out the write
	// timeout: the bound sits well below it, and well above the baseline.
	if bound := max(10*base.pct(95), base.pct(95)+time.Second); slow.pct(95) > bound {
		t.Errorf("healthy p95 latency %v with stalled subscribers, %v without: over the bound %v", slow.pct(95), base.pct(95), bound)
	}
	if p99 := slow.pct(99); p99 >= writeTimeout {
		t.Errorf("healthy p99 latency %v with stalled subscribers: someone waited out the write timeout", p99)
	}

	stopStalled()
	h1.hc.CloseIdleConnections()
	h2.hc.CloseIdleConnections()
	c.checkNoLeaks(t, "stalled subscribers", goroutines0, fds0, 10)
}

// sentAt reads the phase name and send time a test report put into the message of the job
// document (name@unixnano), without decoding the whole document.
func sentAt(data string) (string, time.Time, bool) {
	const key = `"message":"`
	i := strings.Index(data, key)
	if i < 0 {
		return "", time.Time{}, false
	}
	rest := data[i+len(key):]
	end := strings.IndexByte(rest, '"')
	if end < 0 {
		return "", time.Time{}, false
	}
	name, ns, ok := strings.Cut(rest[:end], "@")
	n, err := strconv.ParseInt(ns, 10, 64)
	if !ok || err != nil {
		return "", time.Time{}, false
	}
	return name, time.Unix(0, n), true
}

// openStalled opens a job's event stream, reads up to the end of the first event and returns
// the body, never to be read again until the test checks that the server reset it.
func openStalled(ctx context.Context, hc *http.Client, url string) (io.ReadCloser, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	req.Header.Set("Accept", "text/event-stream")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 {
		resp.Body.Close()
		return nil, fmt.Errorf("status %d over %s", resp.StatusCode, resp.Proto)
	}
	var got []byte
	buf := make([]byte, 4096)
	for {
		n, err := resp.Body.Read(buf)
		got = append(got, buf[:n]...)
		if i := bytes.Index(got, []byte("\nid: ")); i >= 0 && bytes.Contains(got[i:], []byte("\n\n")) {
			return resp.Body, nil
		}
		if err != nil {
			resp.Body.Close()
			return nil, fmt.Errorf("before the first event (%d bytes: %.200q): %v", len(got), got, err)
		}
	}
}
