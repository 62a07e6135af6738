// Package browser tests the demo in a real browser: headless Chromium, driven over the
// DevTools protocol by chromedp, loads the demo page (examples/site) from Caddy running
// examples/Caddyfile (the demo's own configuration) over HTTPS and HTTP/2, starts jobs with
// the page's buttons, and checks what the page shows as the job's events arrive through
// EventSource: the bar, the stage and message, the result, a cancel.
//
// Chromium is Debian's package (apt-get install -y chromium); PROGRESS_CHROMIUM may name
// another binary. Without one these tests skip, loudly, unless CI is set: then they fail, so
// CI cannot pass without having run them.
//
// The page records every job document it rendered in window.__progressSeen; the tests wait
// on that record and on the DOM with bounded polls, never on a fixed sleep.
package browser

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// Set up once by TestMain.
var (
	binDir          string // holds the built caddy and demoapp
	chromiumPath    string
	chromiumMissing string // why no Chromium was found; "" when one was
)

func TestMain(m *testing.M) {
	flag.Parse()
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	chromiumPath, chromiumMissing = findChromium()
	if chromiumMissing != "" {
		// Nothing to build for: every test skips (or, under CI, fails) in needBrowser.
		loud("NO CHROMIUM: the browser tests (tests/browser) will not run: " + chromiumMissing +
			". Install it with: apt-get install -y chromium")
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "progress-browser-bin-")
	if err != nil {
		loud("browser tests: " + err.Error())
		return 1
	}
	defer os.RemoveAll(dir)
	start := time.Now()
	if err := buildBinaries(dir); err != nil {
		loud("browser tests: building caddy and the demo app failed:\n" + err.Error())
		return 1
	}
	fmt.Fprintf(os.Stderr, "browser: built caddy and demoapp in %v; chromium is %s\n", time.Since(start).Round(time.Millisecond), chromiumPath)
	binDir = dir
	return m.Run()
}

func loud(msg string) {
	line := strings.Repeat("!", 78)
	fmt.Fprintf(os.Stderr, "\n%s\n!!! %s\n%s\n\n", line, msg, line)
}

// findChromium returns the browser binary, or why there is none.
func findChromium() (path, missing string) {
	if p := os.Getenv("PROGRESS_CHROMIUM"); p != "" {
		if found, err := exec.LookPath(p); err == nil {
			return found, ""
		}
		return "", "PROGRESS_CHROMIUM=" + p + " is not an executable"
	}
	for _, name := range []string{"chromium", "/usr/bin/chromium", "chromium-browser"} {
		if found, err := exec.LookPath(name); err == nil {
			return found, ""
		}
	}
	return "", "no chromium on PATH nor /usr/bin/chromium"
}

// needBrowser skips the test when there is no Chromium, or fails it under CI.
func needBrowser(t *testing.T) {
	t.Helper()
	if chromiumMissing == "" {
		return
	}
	msg := fmt.Sprintf("%s needs headless Chromium: %s. Install it with: apt-get install -y chromium", t.Name(), chromiumMissing)
	if os.Getenv("CI") != "" {
		t.Fatal("CI is set, so the browser test must run: " + msg)
	}
	t.Skip("SKIPPED: " + msg)
}

// shown is one job document as the page rendered it (window.__progressSeen in index.html).
type shown struct {
	Seq       uint64   `json:"seq"`
	State     string   `json:"state"`
	Bar       *float64 `json:"bar"`     // what the bar showed; nil when indeterminate
	Percent   *float64 `json:"percent"` // progress.percent of the document
	Estimated bool     `json:"estimated"`
	ETA       *float64 `json:"eta"` // eta_seconds of the document
	Stage     string   `json:"stage"`
	Message   string   `json:"message"`
}

// TestDemoPage runs the demo as a person would: it opens the page, presses the buttons and
// reads what the page shows.
func TestDemoPage(t *testing.T) {
	needBrowser(t)
	dir := t.TempDir()
	app, appAddr := startApp(t, filepath.Join(binDir, "demoapp"), dir, 3*time.Second)
	caddy := startCaddy(t, filepath.Join(binDir, "caddy"), dir, appAddr)
	defer caddy.checkLog(t)
	// The Caddyfile promises all three protocols; Chromium below only speaks HTTP/2 (QUIC off).
	for _, major := range []int{1, 2, 3} {
		if err := caddy.getPage(caddy.roots, major); err != nil {
			t.Errorf("HTTP/%d: %v", major, err)
		}
	}
	b := newBrowser(t, dir)

	b.do(t, 30*time.Second, "loading the page", chromedp.Navigate(caddy.base+"/"),
		chromedp.WaitVisible(chromedp.CSS("#job-generate .start")))
	// Screenshots are taken the moment a value is seen; the bar's width transition would
	// still be drawing the previous one.
	b.do(t, 10*time.Second, "turning transitions off", chromedp.Evaluate[chromedp.Void](
		`document.head.insertAdjacentHTML('beforeend', '<style>*, ::-webkit-progress-value { transition: none !important; }</style>')`))
	// The page asks the Navigation Timing API which protocol it came over.
	if proto := run(t, b, 10*time.Second, "reading the protocol", chromedp.Evaluate[string](`document.documentElement.dataset.proto`)); proto != "h2" {
		t.Errorf("the page came over %q, want h2 (HTTPS with HTTP/2)", proto)
	}

	t.Run("quiet", func(t *testing.T) {
		// The app says nothing and its route has no history yet: the page shows the job
		// running, then done with the result.
		quietJob(t, b, false)
	})

	t.Run("reporting", func(t *testing.T) {
		// The app reports stage, "page N of 8" and percent: the bar advances through at least
		// three distinct values to 100%, then the result appears.
		b.click(t, "#job-generate .start")
		// A picture of the bar under way (or of the end, if it was quicker than the poll).
		b.poll(t, 30*time.Second, "the bar past 30%", `(() => {
			const s = window.__progressSeen['job-generate'];
			return s.some(e => e.state === 'running' && e.bar >= 30) || (s.length > 0 && ['succeeded','failed','canceled'].includes(s[s.length-1].state));
		})()`)
		b.screenshot(t, "reporting-running.png")
		seen := b.waitEnd(t, "job-generate")
		last := seen[len(seen)-1]
		if last.State != "succeeded" || last.Bar == nil || *last.Bar != 100 {
			t.Fatalf("the job ended %q with the bar at %v, want succeeded at 100; the page showed %s", last.State, deref(last.Bar), fmtSeen(seen))
		}
		var bars []float64
		prev := -1.0
		pageMsg := regexp.MustCompile(`^page [1-8] of 8$`)
		sawPage := false
		reported := false
		for _, s := range seen[:len(seen)-1] {
			// Before the app's first report the sidecar may show an estimate (the route has
			// a history once the quiet job ran); after it, real reports always win.
			if s.Estimated {
				if reported {
					t.Errorf("the page showed an estimate (%v%%) after the app's own reports: %s", deref(s.Percent), fmtSeen(seen))
				}
				continue
			}
			if s.Bar == nil || s.State != "running" {
				continue
			}
			reported = true
			if *s.Bar < prev {
				t.Errorf("the bar went back from %v to %v: %s", prev, *s.Bar, fmtSeen(seen))
			}
			if *s.Bar != prev {
				bars = append(bars, *s.Bar)
			}
			prev = *s.Bar
			sawPage = sawPage || (s.Stage == "render" && pageMsg.MatchString(s.Message))
		}
		t.Logf("reporting job: the bar showed %v while running, %v at the end; %d documents", bars, *last.Bar, len(seen))
		if len(bars) < 3 {
			t.Errorf("the bar showed %v while running: want at least three distinct values; the page showed %s", bars, fmtSeen(seen))
		}
		if !sawPage {
			t.Errorf(`the page never showed stage "render" with a message "page N of 8": %s`, fmtSeen(seen))
		}
		// The app's last report (100%, "report ready") comes before its answer, so the final
		// document carries it: upstreamhook flushes before the handler returns.
		if last.Percent == nil || *last.Percent != 100 || last.Message != "report ready" {
			t.Errorf("the final document has percent %v and message %q, want the app's last report (100, %q)", deref(last.Percent), last.Message, "report ready")
		}
		if v := run(t, b, 10*time.Second, "reading the bar", chromedp.Evaluate[float64](`document.querySelector('#job-generate progress').value`)); v != 100 {
			t.Errorf("the <progress> element's value is %v after the end, want 100", v)
		}
		status, body := b.result(t, "job-generate")
		if status != "200" || !strings.Contains(body, `"report": "Quarterly sales"`) || !strings.Contains(body, `"pages": 8`) {
			t.Errorf("the result shows status %s:\n%s", status, body)
		}
		b.screenshot(t, "reporting-done.png")
	})

	t.Run("quiet-estimated", func(t *testing.T) {
		// The route now has a run time: while the quiet app works, the sidecar's estimate
		// moves the bar, marked estimated, with a time left.
		quietJob(t, b, true)
	})

	t.Run("cancel", func(t *testing.T) {
		// Start the quiet job (3s) and press Cancel as soon as the page has the job: the job
		// ends canceled, the result says 409, and the app's request ends early.
		b.click(t, "#job-quiet .start")
		id := b.poll(t, 20*time.Second, "the cancel button enabled", `(() => {
			const s = window.__progressSeen['job-quiet'];
			const btn = document.querySelector('#job-quiet .cancel');
			return !btn.disabled && s.length > 0 && !['succeeded','failed','canceled'].includes(s[s.length-1].state) &&
				document.querySelector('#job-quiet .job').textContent;
		})()`)
		mark := app.out.count()
		b.click(t, "#job-quiet .cancel")
		seen := b.waitEnd(t, "job-quiet")
		if last := seen[len(seen)-1]; last.State != "canceled" {
			t.Fatalf("after Cancel the job ended %q, want canceled: %s", last.State, fmtSeen(seen))
		}
		if status, body := b.result(t, "job-quiet"); status != "409" {
			t.Errorf("a canceled job's result shows status %s, want 409:\n%s", status, body)
		}
		if _, err := app.out.waitFor(mark, 10*time.Second, app.exited, func(l string) bool {
			return strings.Contains(l, id) && strings.Contains(l, "request ended")
		}); err != nil {
			t.Errorf("the demo app never saw job %s's request end after Cancel: %v\n%s", id, err, app.tail(20))
		}
		b.screenshot(t, "cancel-done.png")
	})

	b.checkExceptions(t)
}

// quietJob starts a job on the quiet endpoint and checks what the page showed: running, then
// the result, and any percent marked as the sidecar's estimate. With wantEstimates, at least one
// estimate with a time left must have been shown.
func quietJob(t *testing.T, b *browser, wantEstimates bool) {
	t.Helper()
	b.click(t, "#job-quiet .start")
	if wantEstimates {
		b.poll(t, 30*time.Second, "an estimate", `(() => {
			const s = window.__progressSeen['job-quiet'];
			return s.some(e => e.estimated && e.state === 'running') || (s.length > 0 && ['succeeded','failed','canceled'].includes(s[s.length-1].state));
		})()`)
		b.screenshot(t, "quiet-estimated-running.png")
	}
	seen := b.waitEnd(t, "job-quiet")
	last := seen[len(seen)-1]
	if last.State != "succeeded" {
		t.Fatalf("the quiet job ended %q, want succeeded; the page showed %s", last.State, fmtSeen(seen))
	}
	if !hasState(seen[:len(seen)-1], "running", "queued") {
		t.Errorf("the page never showed the quiet job before its end: %s", fmtSeen(seen))
	}
	var estimates []float64
	withETA := 0
	for _, s := range seen[:len(seen)-1] {
		if s.Percent == nil {
			continue
		}
		if !s.Estimated {
			t.Errorf("the quiet app reports nothing, yet the page showed %v%% not marked estimated", *s.Percent)
		}
		estimates = append(estimates, *s.Percent)
		if s.ETA != nil {
			withETA++
		}
	}
	t.Logf("quiet job: %d documents shown, estimated percents %v (%d with a time left)", len(seen), estimates, withETA)
	if wantEstimates && (len(estimates) == 0 || withETA == 0) {
		t.Errorf("the route has a run time, yet the page showed no estimate with a time left while the quiet job ran: %s", fmtSeen(seen))
	}
	status, body := b.result(t, "job-quiet")
	if status != "200" || !strings.Contains(body, `"report": "Inventory (quiet)"`) {
		t.Errorf("the quiet job's result shows status %s:\n%s", status, body)
	}
	b.screenshot(t, "quiet-done.png")
}

// ---------------------------------------------------------------------------------------------
// The browser

type browser struct {
	ctx context.Context

	mu         sync.Mutex
	exceptions []string // uncaught exceptions of the page: each fails the test
}

// newBrowser starts headless Chromium with a fresh profile in dir and opens a tab. The flags
// keep it off the network (the machine may have none, and background requests fail noisily)
// and accept the certificate of Caddy's local CA.
func newBrowser(t *testing.T, dir string) *browser {
	t.Helper()
	out := newLines(filepath.Join(dir, "chromium.log"))
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		// TCP only, so the page and its streams come over HTTP/2 even though Caddy offers
		// HTTP/3 in Alt-Svc.
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("ignore-certificate-errors", true),
		chromedp.UserDataDir(filepath.Join(dir, "chromium-profile")),
		chromedp.WindowSize(1200, 900),
		chromedp.CombinedOutput(out),
	)
	ctx, cancel := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancel()
		cancelAlloc() // waits for Chromium to exit
	})
	b := &browser{ctx: ctx}
	// The first action starts the browser, on a context without a deadline: a deadline there
	// would bound the browser's whole life.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting %s: %v\n%s", chromiumPath, err, strings.Join(out.all(), "\n"))
	}
	err := chromedp.Listen(ctx, func(ev any) {
		switch ev := ev.(type) {
		case *runtime.EventExceptionThrown:
			d := ev.ExceptionDetails
			msg := d.Text
			if d.Exception != nil && d.Exception.Description != "" {
				msg += " " + d.Exception.Description
			}
			b.mu.Lock()
			b.exceptions = append(b.exceptions, fmt.Sprintf("%s (%s:%d)", msg, d.URL, d.LineNumber+1))
			b.mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// run runs one action, bounded by timeout, and fails the test with what it was doing.
func run[T any](t *testing.T, b *browser, timeout time.Duration, what string, a chromedp.Action[T]) T {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, timeout)
	defer cancel()
	v, err := chromedp.Run(ctx, a)
	if err != nil {
		t.Fatalf("%s: %v%s", what, err, b.exceptionNote())
	}
	return v
}

func (b *browser) do(t *testing.T, timeout time.Duration, what string, steps ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, timeout)
	defer cancel()
	if err := chromedp.Do(ctx, steps...); err != nil {
		t.Fatalf("%s: %v%s", what, err, b.exceptionNote())
	}
}

func (b *browser) click(t *testing.T, selector string) {
	t.Helper()
	b.do(t, 10*time.Second, "clicking "+selector, chromedp.Click(chromedp.CSS(selector)))
}

// poll evaluates expression every 20ms in the page until it is truthy, for at most timeout,
// and returns its value as text.
func (b *browser) poll(t *testing.T, timeout time.Duration, what, expression string) string {
	t.Helper()
	raw := run(t, b, timeout+5*time.Second, "waiting for "+what,
		chromedp.Poll[[]byte](expression, chromedp.WithPollingInterval(20*time.Millisecond), chromedp.WithPollingTimeout(timeout)))
	return strings.Trim(string(raw), `"`)
}

// waitEnd waits (at most 60s) until the card has rendered a job in a terminal state, and
// returns every document it rendered for that job.
func (b *browser) waitEnd(t *testing.T, card string) []shown {
	t.Helper()
	expr := fmt.Sprintf(`(() => {
		const s = window.__progressSeen[%q];
		return s.length > 0 && ['succeeded','failed','canceled'].includes(s[s.length-1].state) ? s : null;
	})()`, card)
	ctx, cancel := context.WithTimeout(b.ctx, 65*time.Second)
	defer cancel()
	seen, err := chromedp.Run(ctx, chromedp.Poll[[]shown](expr,
		chromedp.WithPollingInterval(20*time.Millisecond), chromedp.WithPollingTimeout(60*time.Second)))
	if err != nil {
		so := b.seenNow(card)
		if errors.Is(err, chromedp.ErrPollingTimeout) {
			t.Fatalf("%s: the job did not end within 60s; the page showed %s%s", card, so, b.exceptionNote())
		}
		t.Fatalf("%s: waiting for the job's end: %v; the page showed %s%s", card, err, so, b.exceptionNote())
	}
	return seen
}

// result waits (at most 20s) until the card shows the job's result and returns the HTTP
// status the page got for it and the text it shows.
func (b *browser) result(t *testing.T, card string) (status, body string) {
	t.Helper()
	status = b.poll(t, 20*time.Second, card+"'s result", fmt.Sprintf(`document.querySelector('#%s .result-body').dataset.status`, card))
	body = run(t, b, 10*time.Second, "reading the result", chromedp.Evaluate[string](fmt.Sprintf(`document.querySelector('#%s .result-body').textContent`, card)))
	if hidden := run(t, b, 10*time.Second, "reading the result box", chromedp.Evaluate[bool](fmt.Sprintf(`document.querySelector('#%s .result').hidden`, card))); hidden {
		t.Errorf("%s: the result box is hidden", card)
	}
	return status, body
}

// seenNow is the card's record as text, for failure messages.
func (b *browser) seenNow(card string) string {
	ctx, cancel := context.WithTimeout(b.ctx, 5*time.Second)
	defer cancel()
	seen, err := chromedp.Run(ctx, chromedp.Evaluate[[]shown](fmt.Sprintf(`window.__progressSeen[%q]`, card)))
	if err != nil {
		return "(unreadable: " + err.Error() + ")"
	}
	return fmtSeen(seen)
}

// screenshot saves the page as a PNG into the test's artifact folder (kept with
// go test -artifacts) and logs where.
func (b *browser) screenshot(t *testing.T, name string) {
	t.Helper()
	png := run(t, b, 20*time.Second, "taking a screenshot", chromedp.FullScreenshot(100))
	path := filepath.Join(t.ArtifactDir(), name)
	if err := os.WriteFile(path, png, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)
}

func (b *browser) checkExceptions(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, e := range b.exceptions {
		t.Errorf("uncaught exception in the page: %s", e)
	}
}

func (b *browser) exceptionNote() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.exceptions) == 0 {
		return ""
	}
	return "\nexceptions in the page:\n" + strings.Join(b.exceptions, "\n")
}

func hasState(seen []shown, states ...string) bool {
	for _, s := range seen {
		for _, st := range states {
			if s.State == st {
				return true
			}
		}
	}
	return false
}

func fmtSeen(seen []shown) string {
	var sb strings.Builder
	for _, s := range seen {
		est := ""
		if s.Estimated {
			est = " est"
		}
		fmt.Fprintf(&sb, "\n  seq %d %s bar=%v pct=%v%s eta=%v stage=%q msg=%q", s.Seq, s.State, deref(s.Bar), deref(s.Percent), est, deref(s.ETA), s.Stage, s.Message)
	}
	if len(seen) == 0 {
		return "nothing"
	}
	return sb.String()
}

func deref(p *float64) any {
	if p == nil {
		return "none"
	}
	return *p
}
